"""MindBridge's stage jobs: pretrain a memory, bridge it to an LLM, evaluate, ask, cross-model.

Each job reads the composed Hydra config (as a plain dict-like `DictConfig`) and records what
it measured into a shared `metrics` dict that ends up in `<run dir>/metrics.json`.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from data.datamodule import EditDataModule
from data.readers import read_records
from data.records import record_from_dict
from lit_modules.bridge import MemoryBridgeModule
from lit_modules.pretrain import MemoryPretrainModule, module_hparams
from lit_modules.runtime import (RunContext, checkpoint_to_resume, is_rank_zero, make_trainer, progress_bar,
                                  write_metrics)
from mindbridge.artifacts import (ArtifactError, bridge_dir, bridge_name, directory_digest, load_bridge,
                                  load_bridge_adapters, load_exist_head, load_gate, load_memory, read_facts, read_manifest,
                                  save_bridge, save_memory)
from mindbridge.bridge import MemoryAugmentedLM, MemoryProjector, MemoryProjectorConfig, lora_state
from mindbridge.encoder import MemoryEncoder
from mindbridge.evaluation import evaluate_edits
from mindbridge.gate import build_gate
from mindbridge.lm import PlainLM
from mindbridge.loading import load_masked_lm, tensors_fingerprint
from mindbridge.pretraining import fit_mlm_head, masked_recall

log = logging.getLogger(__name__)


def pretrain(ctx: RunContext) -> None:
    """Stage I: write the edit set into a fresh encoder and save it as a memory."""
    cfg, ecfg, pcfg = ctx.cfg, ctx.cfg.encoder, ctx.cfg.model.pretrain
    out_dir = ctx.memory_dir               # refuse a list of memories before any training
    dm = ctx.data()
    mlm, etok = load_masked_lm(ecfg.source, hub_id=ecfg.hub_id, path=ecfg.path, seed=cfg.seed,
                               random_config=OmegaConf.to_container(ecfg.random_config) if ecfg.random_config else None)
    encoder = MemoryEncoder(mlm, etok, ecfg.pooling, ecfg.max_length)
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # Text that is not edited: the out-of-scope stream.
    head_acc = fit_mlm_head(encoder, [o.prompt for o in dm.out_of_scope], steps=ecfg.mlm_head_warmup_steps,
                            seed=cfg.seed)
    hp = module_hparams(OmegaConf.to_container(pcfg))
    # Prefix augmentation only for the datasets whose evaluation prompts open with other text.
    if dm.name not in set(pcfg.prefix_datasets or ()):
        hp["prefix_prob"] = 0.0
    module = MemoryPretrainModule(encoder, seed=cfg.seed, **hp)
    if pcfg.rewordings:
        module.set_rewordings(edit_rewordings(dm, int(pcfg.rewordings)))
    # Out-of-scope prompts Stage I never trains on, for the read gate's threshold.
    gcfg = cfg.model.gate
    held_out = gate_held_out(int(gcfg.held_out), len(dm.out_of_scope))
    dm.connect(None, batch_size=pcfg.batch_size, out_batch_size=pcfg.out_batch_size, held_out=held_out)
    epochs = pcfg.joint_epochs + (0 if pcfg.joint_from_start else pcfg.inject_epochs + pcfg.heads_epochs)
    trainer = make_trainer(ctx, "pretrain", epochs)
    trainer.fit(module, datamodule=dm, ckpt_path=checkpoint_to_resume(ctx, "pretrain"),
                weights_only=True)
    seconds = time.perf_counter() - start
    encoder.requires_grad_(False).eval()
    diag = existence_diagnostics(module, dm)
    gate, gate_info = build_gate(encoder, [r.prompt for r in dm.edits],
                                 [o.prompt for o in dm.held_out_out_of_scope], gcfg.false_open_rate)
    if gate_info["calibration_score_median"] > 0.99:
        log.warning("Stage I collapsed the memory: the held-out out-of-scope prompts sit on the stored facts "
                    "(median similarity %.3f); lower model.pretrain.lr.", gate_info["calibration_score_median"])
    logged = {k.removeprefix("train/"): float(v) for k, v in trainer.callback_metrics.items()}
    info = {"encoder": ecfg.name, "dataset": dm.name, "data_seed": dm.seed, "data_path": str(dm.resolved_path()),
            "pretrain_seconds": seconds,
            "mlm_head_warmup_acc": head_acc, "final_losses": logged, **diag}
    save_memory(out_dir, encoder, dm.edits, dm.facts_hash(), info, exist_head=module.writer.exist_head.state_dict(),
                gate=gate, gate_info=gate_info)
    ctx.metrics.update({"encoder": ecfg.name, "pretrain_seconds": seconds, "memory": str(out_dir),
                        **{f"pretrain_{k}": v for k, v in logged.items()}, **diag,
                        "gate_threshold": gate.threshold, **{f"gate_{k}": v for k, v in gate_info.items()}})


def edit_rewordings(dm: EditDataModule, count: int) -> list[list[str]]:
    """Up to `count` other wordings of each edit's prompt, with its own subject, borrowed from the
    rewordings of records that are not edited (never an evaluation prompt)."""
    from data.rewordings import RewordingBank
    bank = RewordingBank(dm.split.rewording_templates, dm.edits)
    return [bank.for_prompt(r.subject, r.prompt, count, seed=str(dm.seed)) for r in dm.edits]


@torch.no_grad()
def existence_diagnostics(module: MemoryPretrainModule, dm: EditDataModule) -> dict[str, float]:
    """How often the existence head calls paraphrases in-scope and locality prompts out-of-scope.

    These prompts are never trained on; the rates bound what Gen and Loc can reach (spec §9).
    """
    enc, head = module.encoder, module.writer.exist_head.eval()

    def in_scope_rate(texts: list[str]) -> float:
        if not texts:
            return float("nan")
        return 100.0 * (head(enc.encode(texts)).argmax(-1) == 1).float().mean().item()
    facts = [(r.subject, r.prompt, r.target_new) for r in dm.edits]
    return {"memory_object_recall": masked_recall(enc, facts, "object"),
            "memory_subject_recall": masked_recall(enc, facts, "subject"),
            "exist_in_scope_rate_rel": in_scope_rate([r.prompt for r in dm.edits]),
            "exist_in_scope_rate_gen": in_scope_rate([p for r in dm.edits for p in r.rephrase_prompts]),
            "exist_in_scope_rate_loc": in_scope_rate([p for r in dm.edits for p in r.loc_prompts])}


def _memories_for_current_data(ctx: RunContext) -> list[tuple[MemoryEncoder, dict]]:
    """Load the memories; their facts become the edit set.

    One memory must hold exactly the edits that the data options select. Several memories
    (Multi-MindBridge) are trained and scored on the union of their facts, with the
    out-of-scope stream taken from the data file's other records.
    """
    dirs = ctx.memory_dirs
    loaded = [load_memory(d) for d in dirs]
    dm = ctx.data()
    if len(dirs) == 1:
        manifest = loaded[0][1]
        if manifest["facts_sha256"] != dm.facts_hash():
            raise ArtifactError(f"The memory at {dirs[0]} holds {manifest['num_facts']} facts "
                                f"({manifest.get('dataset')}, seed {manifest.get('data_seed')}) that differ from the "
                                f"{len(dm.edits)} edits selected by data={dm.name} data.seed={dm.seed}; "
                                "use the same data options as when the memory was pretrained.")
        return loaded
    union = list(dict.fromkeys(record_from_dict(f) for d in dirs for f in read_facts(d)))
    dm.use_edits(union, other_datasets=_other_source_records(dm, [m for _, m in loaded]))
    ctx.metrics.update({"num_edits": len(dm.edits), "num_out_of_scope": len(dm.out_of_scope),
                        "num_memories": len(dirs)})
    return loaded


def _other_source_records(dm: EditDataModule, manifests: list[dict]) -> list[list]:
    """Records of the files the memories were pretrained from, other than `data`'s own: their
    non-edited records join the out-of-scope stream (a CounterFact memory must learn to stay
    quiet on CounterFact-like prompts, not only on the default data's)."""
    own, seen, groups = dm.resolved_path().resolve(), set(), []
    for manifest in manifests:
        # The datamodule's own rule: the recorded file, else the dataset's bundled file.
        source = EditDataModule(manifest.get("dataset") or dm.name, path=manifest.get("data_path"), dedupe=dm.dedupe)
        try:
            path = source.resolved_path().resolve()
        except ValueError:
            continue                       # no bundled file of that name: main stream only
        if path.is_file() and path != own and path not in seen:
            seen.add(path)
            groups.append(read_records(path, source.name, dedupe=dm.dedupe))
    return groups


def _projector_for(encoder: MemoryEncoder, llm, pc: DictConfig) -> MemoryProjector:
    return MemoryProjector(MemoryProjectorConfig(
        encoder_dim=encoder.hidden_size, llm_dim=llm.get_input_embeddings().embedding_dim,
        hidden_dim=pc.hidden_dim, depth=pc.depth, num_tokens=pc.num_tokens, dropout=pc.dropout,
        position=pc.position, zero_init_output=pc.zero_init_output, gated=pc.gated,
        share_positions=pc.share_positions))


def bridge(ctx: RunContext) -> None:
    """Stage II: train a projector for `llm` on existing memories, saved as bridges/<llm>/.

    With several memories the projectors train jointly (one token block each, concatenated)
    and each memory stores its projector under the group's bridge name.
    """
    cfg, bcfg = ctx.cfg, ctx.cfg.model.bridge
    llm, tok = ctx.load_llm()              # an unavailable LLM is the first thing to report
    loaded = _memories_for_current_data(ctx)
    dm = ctx.data()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    projectors = [_projector_for(encoder, llm, bcfg.projector) for encoder, _ in loaded]
    if bcfg.projector.gated and bcfg.projector.gate_init == "exist_head":
        for directory, projector, (_, manifest) in zip(ctx.memory_dirs, projectors, loaded):
            projector.init_gate_from_exist_head(load_exist_head(directory, manifest))
    hp = {k: bcfg[k] for k in ("lambda_kl", "kl_temperature", "lr", "weight_decay", "warmup_fraction",
                               "feature_noise", "paraphrase_jitter", "kl_answer_tokens", "prefix_prob",
                               "prefix_variants", "lm_head_dtype", "train_vocab_top_k", "rewording_prob")}
    lora = None
    if bcfg.lora:
        if len(loaded) > 1:
            raise ValueError("model.bridge.lora=true works with one memory; bridge several memories without it.")
        lora = {"r": bcfg.lora_rank, "alpha": bcfg.lora_alpha,
                "target_modules": OmegaConf.to_container(bcfg.lora_target_modules) if bcfg.lora_target_modules else None}
    module = MemoryBridgeModule(llm, tok, [e for e, _ in loaded], projectors, lora=lora, **hp)
    start = time.perf_counter()
    # Distractor prefixes: finished sentences (prompt and known answer) of records not edited,
    # put before the edits of the datasets in `prefix_datasets` only.
    prefixes = [f"{o.prompt} {o.answer}." if o.answer else o.prompt for o in dm.out_of_scope]
    augmented = set(bcfg.prefix_datasets or ())
    # The KL's out-of-scope prompts: with gated memories, those nearest to the stored facts (the
    # only ones the projector can be read for); otherwise all of them.
    gates = memory_gates(ctx, [m for _, m in loaded])
    rows = nearest_out_of_scope(loaded, gates, dm, bcfg.kl_prompts) if gates else None
    dm.connect(tok, batch_size=bcfg.batch_size, out_batch_size=bcfg.out_batch_size, out_rows=rows)
    out = dm.training_out_of_scope
    module.prepare([r.prompt for r in dm.edits], [o.prompt for o in out],
                   paraphrase_pairs=dm.paraphrase_pairs, prefixes=prefixes,
                   prefix_probs=[bcfg.prefix_prob if r.dataset in augmented else 0.0 for r in dm.edits],
                   edit_targets=[r.target_new for r in dm.edits], old_targets=[r.target_true for r in dm.edits],
                   out_answers=[o.answer for o in out],
                   rewordings=edit_rewordings(dm, int(bcfg.rewordings)) if bcfg.rewordings else None)
    trainer = make_trainer(ctx, f"bridge-{cfg.llm.name}", bcfg.epochs)
    trainer.fit(module, datamodule=dm, ckpt_path=checkpoint_to_resume(ctx, f"bridge-{cfg.llm.name}"),
                weights_only=True)
    seconds = time.perf_counter() - start
    logged = {k.removeprefix("train/"): float(v) for k, v in trainer.callback_metrics.items()}
    manifests = [m for _, m in loaded]
    name = bridge_name(cfg.llm.name, manifests)
    n_llm = sum(p.numel() for n, p in llm.named_parameters() if "lora_" not in n)
    extra, lora_info = None, {}
    if lora:
        adapted = module.edited.llm
        adapters = lora_state(adapted)
        lora_info = {"lora": lora, "lora_params": sum(t.numel() for t in adapters.values()),
                     "lora_sha256": tensors_fingerprint(adapters)}
        extra = {"lora": lambda path: adapted.save_pretrained(str(path), safe_serialization=True)}
    n_proj = sum(p.numel() for proj in projectors for p in proj.parameters()) + lora_info.get("lora_params", 0)
    # Tokens the losses were computed over (model.bridge.train_vocab_top_k; the whole vocabulary without it).
    vocabulary = len(module.vocabulary) if module.vocabulary is not None else llm.get_output_embeddings().weight.shape[0]
    for i, (directory, projector) in enumerate(zip(ctx.memory_dirs, projectors)):
        projector.eval()
        info = {"bridge_seconds": seconds, "projector_params": n_proj, "llm_params": n_llm,
                "hyperparameters": OmegaConf.to_container(bcfg), "final_losses": logged,
                "group_encoders": [m["encoder_sha256"] for m in manifests], "group_index": i,
                "student_head_dtype": module.student_head_dtype, "student_vocabulary": vocabulary, **lora_info}
        save_bridge(directory, name, projector, ctx.llm_identity, info, extra=extra)
    if lora:
        # Take the adapters out again: later jobs load the bridge (and its adapters) from disk.
        ctx.llm = module.edited.llm.unload()
    ctx.metrics.update({"bridge_seconds": seconds, "projector_params": n_proj, "bridge_vocabulary": vocabulary,
                        "projector_params_pct_of_llm": 100.0 * n_proj / n_llm,
                        **{f"bridge_{k}": v for k, v in logged.items()}})


def evaluate(ctx: RunContext) -> None:
    """Score memory + bridge with the shared evaluator against the unedited LLM.

    With several memories the headline figures are on the union of their facts; each memory's
    own facts are scored too (`memory<i>_*`), and, where that memory also has a bridge of its
    own, the single-memory figures and the drop (`memory<i>_drop_*` = single - multi).
    """
    cfg = ctx.cfg
    loaded = _memories_for_current_data(ctx)
    llm, tok = ctx.load_llm()
    manifests = [m for _, m in loaded]
    name = bridge_name(cfg.llm.name, manifests)
    bridges = [load_bridge(d, name, ctx.llm_identity, m) for d, m in zip(ctx.memory_dirs, manifests)]
    adapted = load_bridge_adapters(ctx.memory_dirs[0], name, llm, bridges[0][1])
    gates = memory_gates(ctx, manifests)
    edited = MemoryAugmentedLM(adapted, tok, [e for e, _ in loaded], [p for p, _ in bridges], gates).eval()
    plain = PlainLM(adapted, tok)            # switches any adapters off
    start = time.perf_counter()
    with progress_bar("evaluating") as advance:
        m = evaluate_edits(edited, plain, ctx.data().edits, cfg.model.eval.batch_size, advance)
        ctx.metrics.update(m)
        ctx.metrics["gate"] = edited.gated
        if edited.gated:
            # The calibration prompts are those of a single memory's own split.
            held_out = (manifests[0].get("gate") or {}).get("calibration_prompts", 0) if len(manifests) == 1 else 0
            ctx.metrics.update(gate_open_rates(edited, ctx.data(), held_out))
        if len(loaded) > 1:
            _score_each_memory(ctx, edited, plain, loaded, advance)
    ctx.metrics["eval_seconds"] = time.perf_counter() - start
    if adapted is not llm:
        ctx.llm = adapted.unload()
    ctx.metrics["encoder"] = manifests[0].get("encoder", ctx.metrics.get("encoder"))   # the memory's, not the config's
    ctx.metrics.setdefault("pretrain_seconds", manifests[0].get("pretrain_seconds"))
    ctx.metrics.setdefault("bridge_seconds", bridges[0][1].get("bridge_seconds"))


def memory_gates(ctx: RunContext, manifests: list[dict]):
    """The memories' read gates (`model.gate.enabled`), or None: every memory read for every prompt."""
    if not ctx.cfg.model.gate.enabled:
        return None
    return [load_gate(d, m) for d, m in zip(ctx.memory_dirs, manifests)]


@torch.no_grad()
def nearest_out_of_scope(loaded: list[tuple[MemoryEncoder, dict]], gates, dm: EditDataModule,
                         count: int | None) -> list[int] | None:
    """Indices of the `count` out-of-scope prompts with the highest gate score (cosine similarity
    to the nearest stored fact, the highest over the memories); None: all of them."""
    prompts = [o.prompt for o in dm.out_of_scope]
    if not count or count >= len(prompts):
        return None
    scores = torch.stack([gate.scores(encoder.encode(prompts)) for (encoder, _), gate in zip(loaded, gates)])
    return sorted(scores.max(0).values.topk(int(count)).indices.tolist())


def gate_held_out(requested: int, available: int) -> int:
    """How many out-of-scope prompts Stage I keeps back for the gate: `requested`, at most a
    quarter of the stream (the rest is what L_exist trains on)."""
    if available < 8:
        raise ValueError(f"The split has {available} out-of-scope prompts; the memory needs at least 8 (to train "
                         "L_exist and calibrate its read gate). Lower data.num_edits or add data.pool_path=FILE.")
    if requested > available // 4:
        log.info("model.gate.held_out: holding out %d out-of-scope prompts (a quarter of %d), not %d.",
                 available // 4, available, requested)
    return max(1, min(requested, available // 4))


@torch.no_grad()
def gate_open_rates(edited: MemoryAugmentedLM, dm: EditDataModule, held_out: int) -> dict[str, float]:
    """How often some memory is read, per prompt kind (%): edit prompts, paraphrases, locality
    prompts, and the `held_out` out-of-scope prompts kept out of Stage I for calibration."""
    if held_out and dm.held_out_size != held_out:
        dm.connect(dm.tokenizer, held_out=held_out)
    kinds = {"rel": [r.prompt for r in dm.edits],
             "gen": [p for r in dm.edits for p in r.rephrase_prompts],
             "loc": [p for r in dm.edits for p in r.loc_prompts],
             "out_of_scope": [o.prompt for o in dm.held_out_out_of_scope] if held_out else []}
    rates = {}
    for kind, prompts in kinds.items():
        if prompts:
            opened = edited.open_gates(edited.memory_features(prompts)).any(0)
            rates[f"gate_open_rate_{kind}"] = 100.0 * opened.float().mean().item()
    return rates


def _score_each_memory(ctx: RunContext, edited: MemoryAugmentedLM, plain: PlainLM,
                       loaded: list[tuple[MemoryEncoder, dict]], advance) -> None:
    cfg, keys = ctx.cfg, ("rel", "gen", "loc", "avg")
    for i, (directory, (encoder, manifest)) in enumerate(zip(ctx.memory_dirs, loaded)):
        facts = [record_from_dict(f) for f in read_facts(directory)]
        multi = evaluate_edits(edited, plain, facts, cfg.model.eval.batch_size, advance)
        ctx.metrics.update({f"memory{i}_{k}": multi[k] for k in keys})
        if not bridge_dir(directory, cfg.llm.name).is_dir():
            continue
        projector, _ = load_bridge(directory, cfg.llm.name, ctx.llm_identity, manifest)
        gate = None if edited.gates[i] is None else [edited.gates[i]]
        alone = MemoryAugmentedLM(edited.llm, edited.tokenizer, [encoder], [projector], gate).eval()
        single = evaluate_edits(alone, plain, facts, cfg.model.eval.batch_size, advance)
        ctx.metrics.update({f"memory{i}_single_{k}": single[k] for k in keys})
        ctx.metrics.update({f"memory{i}_drop_{k}": single[k] - multi[k] for k in keys})


def ask(ctx: RunContext) -> None:
    """Answer `question` (a string or a list) with and without the memory, side by side."""
    from rich.console import Console
    from rich.table import Table

    from mindbridge.api import load_edited_llm
    cfg = ctx.cfg
    questions = cfg.get("question")
    if not questions:
        raise ValueError('stage=ask needs a question: add +question="Who is ...?" (or a list).')
    questions = [questions] if isinstance(questions, str) else list(questions)
    llm, tok = ctx.load_llm()
    edited = load_edited_llm(llm, tok, cfg.llm.name, ctx.memory_dirs, gated=cfg.model.gate.enabled)
    before = edited.generate(questions, max_new_tokens=cfg.get("max_new_tokens", 16), use_memory=False)
    after = edited.generate(questions, max_new_tokens=cfg.get("max_new_tokens", 16))
    table = Table(title=f"{cfg.llm.name} without / with the memory at {', '.join(map(str, ctx.memory_dirs))}")
    for col in ("question", "without memory", "with memory"):
        table.add_column(col, overflow="fold")
    for row in zip(questions, before, after):
        table.add_row(*row)
    Console().print(table)
    answers = [{"question": q, "without_memory": b, "with_memory": a} for q, b, a in zip(questions, before, after)]
    (ctx.run_dir / "answers.json").write_text(json.dumps(answers, indent=2, ensure_ascii=False), encoding="utf-8")


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def llm_config(name: str, where: str = "stage.llms") -> DictConfig:
    """The `llm=<name>` config group entry, for jobs that go through several LLMs in one run."""
    path = CONFIG_DIR / "llm" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "llm").glob("*.yaml"))
        raise ValueError(f"Unknown LLM {name!r} in {where}; choose from {', '.join(known)}.")
    return OmegaConf.load(path)


def crossmodel(ctx: RunContext) -> None:
    """Bridge one memory to every LLM in `stage.llms` and score each (the paper's Table 1/6).

    The encoder is pretrained once (or taken from memory=DIR); each LLM only adds a projector.
    Writes crossmodel.json and crossmodel.md and prints one table.
    """
    names = list(ctx.cfg.stage.llms)
    if not names:
        raise ValueError("stage=crossmodel needs at least one LLM in stage.llms.")
    for name in names:
        llm_config(name)                    # unknown names fail before any training
    overrides = bridge_overrides(ctx.cfg, names)
    if not (ctx.memory_dir / "manifest.json").is_file():
        pretrain(ctx)
    manifest = read_manifest(ctx.memory_dir)
    encoder_before = directory_digest(ctx.memory_dir / "encoder")
    ctx.data()
    rows = []
    for name in names:
        cfg = ctx.cfg.copy()
        with open_dict(cfg):
            cfg.llm = llm_config(name)
            cfg.memory = str(ctx.memory_dir)
            cfg.model.bridge = OmegaConf.merge(cfg.model.bridge, overrides.get(name, {}))
        sub = RunContext(cfg, ctx.run_dir / "llms" / name, datamodule=ctx.datamodule)
        sub.run_dir.mkdir(parents=True, exist_ok=True)
        bridge(sub)
        evaluate(sub)
        if is_rank_zero():
            write_metrics(sub.run_dir / "metrics.json", sub.metrics)
        m = sub.metrics
        rows.append({"llm": name, **{k: m.get(k) for k in CROSSMODEL_COLUMNS[1:]},
                     "bridge_overrides": overrides.get(name, {}),
                     "llm_params": sum(p.numel() for p in sub.llm.parameters()),
                     "pretrain_seconds": manifest.get("pretrain_seconds")})
        del sub                              # free the LLM before loading the next one
    # The cross-model claim: bridging never touches the memory's encoder.
    unchanged = directory_digest(ctx.memory_dir / "encoder") == encoder_before
    table = crossmodel_markdown(rows) + f"\nEncoder files byte-identical before and after bridging: {unchanged}.\n"
    if is_rank_zero():                     # under DDP every process gets here; one writes
        (ctx.run_dir / "crossmodel.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
        (ctx.run_dir / "crossmodel.md").write_text(table, encoding="utf-8")
    ctx.metrics.update({"llms": ",".join(names), "pretrain_seconds": manifest.get("pretrain_seconds"),
                        "encoder_files_unchanged": unchanged, "encoder_files_sha256": encoder_before})
    for row in rows:
        ctx.metrics.update({f"{row['llm']}_{k}": v for k, v in row.items() if k not in ("llm", "bridge_overrides")})
    if ctx.cfg.get("print_table", True):
        from rich.console import Console
        from rich.markdown import Markdown
        Console().print(Markdown(table))


def bridge_overrides(cfg: DictConfig, names: list[str]) -> dict[str, dict]:
    """`stage.bridge_overrides`: per-LLM changes to `model.bridge` (e.g. fewer epochs for an LLM
    that is slower per step), checked before any training: known LLM names and existing keys.
    Entries for LLMs outside `stage.llms` are allowed (an experiment may run on a subset)."""
    given = cfg.stage.get("bridge_overrides") or {}
    for name, changes in given.items():
        llm_config(name, "stage.bridge_overrides")
        unknown = sorted(set(changes) - set(cfg.model.bridge))
        if unknown:
            raise ValueError(f"stage.bridge_overrides.{name} sets {', '.join(unknown)}, which model.bridge does not have.")
    return {name: OmegaConf.to_container(given[name]) for name in given if name in names}


CROSSMODEL_COLUMNS = ("llm", "pre_rel", "pre_gen", "rel", "gen", "loc", "avg", "projector_params",
                      "projector_params_pct_of_llm", "bridge_seconds")


def crossmodel_markdown(rows: list[dict]) -> str:
    """One row per LLM: pre-/post-edit scores, parameters added, bridging vs pretraining time."""
    head = ("| LLM | pre Rel | pre Gen | Rel | Gen | Loc | Avg | params added | % of LLM | bridge s | "
            "encoder pretrain s (once) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def f(r: dict, key: str, digits: int = 2) -> str:
        return "–" if r.get(key) is None else f"{r[key]:.{digits}f}"
    for r in rows:
        lines.append(f"| {r['llm']} | {f(r, 'pre_rel')} | {f(r, 'pre_gen')} | {f(r, 'rel')} | {f(r, 'gen')} | "
                     f"{f(r, 'loc')} | {f(r, 'avg')} | {r['projector_params'] / 1e6:.2f}M | "
                     f"{f(r, 'projector_params_pct_of_llm', 3)} | {f(r, 'bridge_seconds', 0)} | "
                     f"{f(r, 'pretrain_seconds', 0)} |")
    changed = [f"{r['llm']}: " + ", ".join(f"{k}={v}" for k, v in r["bridge_overrides"].items())
               for r in rows if r.get("bridge_overrides")]
    if changed:
        lines.append("\nBridge settings changed per LLM (stage.bridge_overrides): " + "; ".join(changed) + ".")
    return "\n".join(lines) + "\n"
