"""The jobs behind `train.py`: pretrain a memory, bridge it to an LLM, evaluate.

Each job reads the composed Hydra config (as a plain dict-like `DictConfig`) and records what
it measured into a shared `metrics` dict that ends up in `<run dir>/metrics.json`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from data.datamodule import EditDataModule
from lit_modules.bridge import MemoryBridgeModule
from lit_modules.pretrain import MemoryPretrainModule
from mindbridge.artifacts import ArtifactError, load_bridge, load_memory, save_bridge, save_memory
from mindbridge.bridge import MemoryAugmentedLM, MemoryProjector, MemoryProjectorConfig
from mindbridge.encoder import MemoryEncoder
from mindbridge.evaluation import evaluate_edits
from mindbridge.lm import PlainLM
from mindbridge.loading import load_causal_lm, load_masked_lm, model_identity
from mindbridge.pretraining import fit_mlm_head


@dataclass
class RunContext:
    """What one `train.py` invocation shares between its jobs."""

    cfg: DictConfig
    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    datamodule: EditDataModule | None = None
    llm: Any = None
    tokenizer: Any = None
    llm_identity: dict | None = None

    @property
    def memory_dir(self) -> Path:
        return Path(self.cfg.memory).expanduser() if self.cfg.memory else self.run_dir / "memory"

    def data(self) -> EditDataModule:
        if self.datamodule is None:
            args = OmegaConf.to_container(self.cfg.data, resolve=True)
            self.datamodule = EditDataModule(**args)
            self.datamodule.setup()
            self.metrics.update({"dataset": self.datamodule.name, "num_edits": len(self.datamodule.edits),
                                 "num_out_of_scope": len(self.datamodule.out_of_scope),
                                 "data_seed": self.datamodule.seed,
                                 "data_path": str(self.datamodule.resolved_path())})
        return self.datamodule

    def load_llm(self):
        if self.llm is None:
            c = self.cfg.llm
            self.llm, self.tokenizer = load_causal_lm(
                c.source, hub_id=c.hub_id, path=c.path, dtype=c.dtype, seed=self.cfg.seed,
                random_config=OmegaConf.to_container(c.random_config, resolve=True) if c.random_config else None)
            self.llm_identity = model_identity(self.llm, c.name)
        return self.llm, self.tokenizer


def make_trainer(ctx: RunContext, stage: str, max_epochs: int) -> L.Trainer:
    """A Trainer from the `trainer`, `logger` and `callbacks` groups, one checkpoint dir per stage."""
    cfg = ctx.cfg
    callbacks = []
    for name, cb in (cfg.get("callbacks") or {}).items():
        if cb is None:                      # a callback switched off with callbacks.NAME=null
            continue
        if name == "checkpoint":
            callbacks.append(hydra.utils.instantiate(cb, dirpath=str(ctx.run_dir / "checkpoints" / stage)))
        else:
            callbacks.append(hydra.utils.instantiate(cb))
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") and "_target_" in cfg.logger else False
    args = OmegaConf.to_container(cfg.trainer, resolve=True)
    return L.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=logger,
                     default_root_dir=str(ctx.run_dir), enable_checkpointing=any(
                         type(c).__name__ == "ModelCheckpoint" for c in callbacks), **args)


def _ckpt_path(ctx: RunContext, stage: str) -> str | None:
    path = ctx.cfg.get("ckpt_path")
    if path == "last":
        last = ctx.run_dir / "checkpoints" / stage / "last.ckpt"
        return str(last) if last.is_file() else None
    return path


def pretrain(ctx: RunContext) -> None:
    """Stage I: write the edit set into a fresh encoder and save it as a memory."""
    cfg, ecfg, pcfg = ctx.cfg, ctx.cfg.encoder, ctx.cfg.model.pretrain
    dm = ctx.data()
    mlm, etok = load_masked_lm(ecfg.source, hub_id=ecfg.hub_id, path=ecfg.path, seed=cfg.seed,
                               random_config=OmegaConf.to_container(ecfg.random_config) if ecfg.random_config else None)
    encoder = MemoryEncoder(mlm, etok, ecfg.pooling, ecfg.max_length)
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # Text that is not edited: the out-of-scope stream.
    head_acc = fit_mlm_head(encoder, [o.prompt for o in dm.out_of_scope], steps=ecfg.mlm_head_warmup_steps,
                            seed=cfg.seed)
    hp = {k: v for k, v in OmegaConf.to_container(pcfg).items() if k != "batch_size"}
    module = MemoryPretrainModule(encoder, seed=cfg.seed, **hp)
    dm.connect(None, batch_size=pcfg.batch_size, out_batch_size=pcfg.batch_size)
    epochs = pcfg.joint_epochs + (0 if pcfg.joint_from_start else pcfg.inject_epochs + pcfg.heads_epochs)
    trainer = make_trainer(ctx, "pretrain", epochs)
    trainer.fit(module, datamodule=dm, ckpt_path=_ckpt_path(ctx, "pretrain"))
    seconds = time.perf_counter() - start
    encoder.requires_grad_(False).eval()
    diag = existence_diagnostics(module, dm)
    logged = {k.removeprefix("train/"): float(v) for k, v in trainer.callback_metrics.items()}
    info = {"encoder": ecfg.name, "dataset": dm.name, "data_seed": dm.seed, "pretrain_seconds": seconds,
            "mlm_head_warmup_acc": head_acc, "final_losses": logged, **diag}
    save_memory(ctx.memory_dir, encoder, dm.edits, dm.facts_hash(), info)
    ctx.metrics.update({"encoder": ecfg.name, "pretrain_seconds": seconds, "memory": str(ctx.memory_dir),
                        **{f"pretrain_{k}": v for k, v in logged.items()}, **diag})


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
    return {"exist_in_scope_rate_rel": in_scope_rate([r.prompt for r in dm.edits]),
            "exist_in_scope_rate_gen": in_scope_rate([p for r in dm.edits for p in r.rephrase_prompts]),
            "exist_in_scope_rate_loc": in_scope_rate([p for r in dm.edits for p in r.loc_prompts])}


def _memory_for_current_data(ctx: RunContext) -> tuple[MemoryEncoder, dict]:
    encoder, manifest = load_memory(ctx.memory_dir)
    dm = ctx.data()
    if manifest["facts_sha256"] != dm.facts_hash():
        raise ArtifactError(f"The memory at {ctx.memory_dir} holds {manifest['num_facts']} facts "
                            f"({manifest.get('dataset')}, seed {manifest.get('data_seed')}) that differ from the "
                            f"{len(dm.edits)} edits selected by data={dm.name} data.seed={dm.seed}; "
                            "use the same data options as when the memory was pretrained.")
    return encoder, manifest


def bridge(ctx: RunContext) -> None:
    """Stage II: train a projector for `llm` on an existing memory, saved as bridges/<llm>/."""
    cfg, bcfg = ctx.cfg, ctx.cfg.model.bridge
    llm, tok = ctx.load_llm()              # an unavailable LLM is the first thing to report
    encoder, manifest = _memory_for_current_data(ctx)
    dm = ctx.data()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    pc = bcfg.projector
    projector = MemoryProjector(MemoryProjectorConfig(
        encoder_dim=encoder.hidden_size, llm_dim=llm.get_input_embeddings().embedding_dim,
        hidden_dim=pc.hidden_dim, depth=pc.depth, num_tokens=pc.num_tokens, dropout=pc.dropout,
        position=pc.position, zero_init_output=pc.zero_init_output))
    hp = {k: bcfg[k] for k in ("lambda_kl", "kl_temperature", "lr", "weight_decay", "warmup_fraction",
                               "feature_noise")}
    module = MemoryBridgeModule(llm, tok, encoder, projector, **hp)
    start = time.perf_counter()
    module.prepare([r.prompt for r in dm.edits], [o.prompt for o in dm.out_of_scope])
    dm.connect(tok, batch_size=bcfg.batch_size, out_batch_size=bcfg.out_batch_size)
    trainer = make_trainer(ctx, f"bridge-{cfg.llm.name}", bcfg.epochs)
    trainer.fit(module, datamodule=dm, ckpt_path=_ckpt_path(ctx, f"bridge-{cfg.llm.name}"))
    seconds = time.perf_counter() - start
    projector.eval()
    n_llm = sum(p.numel() for p in llm.parameters())
    n_proj = sum(p.numel() for p in projector.parameters())
    logged = {k.removeprefix("train/"): float(v) for k, v in trainer.callback_metrics.items()}
    info = {"bridge_seconds": seconds, "projector_params": n_proj, "llm_params": n_llm,
            "hyperparameters": OmegaConf.to_container(bcfg), "final_losses": logged}
    save_bridge(ctx.memory_dir, cfg.llm.name, projector, ctx.llm_identity, info)
    ctx.metrics.update({"bridge_seconds": seconds, "projector_params": n_proj,
                        "projector_params_pct_of_llm": 100.0 * n_proj / n_llm,
                        **{f"bridge_{k}": v for k, v in logged.items()}})


def evaluate(ctx: RunContext) -> None:
    """Score memory + bridge with the shared evaluator against the unedited LLM."""
    cfg = ctx.cfg
    encoder, manifest = _memory_for_current_data(ctx)
    llm, tok = ctx.load_llm()
    projector, meta = load_bridge(ctx.memory_dir, cfg.llm.name, ctx.llm_identity, manifest)
    edited = MemoryAugmentedLM(llm, tok, [encoder], [projector]).eval()
    start = time.perf_counter()
    with progress_bar("evaluating") as advance:
        m = evaluate_edits(edited, PlainLM(llm, tok), ctx.data().edits, cfg.model.eval.batch_size, advance)
    ctx.metrics.update(m)
    ctx.metrics["eval_seconds"] = time.perf_counter() - start
    ctx.metrics["encoder"] = manifest.get("encoder", ctx.metrics.get("encoder"))   # the memory's, not the config's
    ctx.metrics.setdefault("pretrain_seconds", manifest.get("pretrain_seconds"))
    ctx.metrics.setdefault("bridge_seconds", meta.get("bridge_seconds"))


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
    edited = load_edited_llm(llm, tok, cfg.llm.name, [ctx.memory_dir])
    before = edited.generate(questions, max_new_tokens=cfg.get("max_new_tokens", 16), use_memory=False)
    after = edited.generate(questions, max_new_tokens=cfg.get("max_new_tokens", 16))
    table = Table(title=f"{cfg.llm.name} without / with the memory at {ctx.memory_dir}")
    for col in ("question", "without memory", "with memory"):
        table.add_column(col, overflow="fold")
    for row in zip(questions, before, after):
        table.add_row(*row)
    Console().print(table)
    answers = [{"question": q, "without_memory": b, "with_memory": a} for q, b, a in zip(questions, before, after)]
    (ctx.run_dir / "answers.json").write_text(json.dumps(answers, indent=2, ensure_ascii=False), encoding="utf-8")


class progress_bar:
    """A rich progress bar for long loops that are not Lightning loops (evaluation)."""

    def __init__(self, description: str):
        self.description = description

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), transient=True, disable=not os.isatty(1))
        self.progress.__enter__()
        self.task = self.progress.add_task(self.description, total=None)
        return lambda n: self.progress.advance(self.task, n)

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


JOBS = {"pretrain": pretrain, "bridge": bridge, "eval": evaluate, "ask": ask}


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run the stage's jobs in order and write `<run_dir>/metrics.json`."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    ctx = RunContext(cfg, Path(run_dir))
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    ctx.metrics.update({"method": cfg.model.name, "llm": cfg.llm.name, "encoder": cfg.encoder.name,
                        "stage": cfg.stage.name, "seed": cfg.seed})
    for job in cfg.stage.jobs:
        JOBS[job](ctx)
    m = ctx.metrics
    m["train_seconds"] = sum(m.get(k) or 0.0 for k in ("pretrain_seconds", "bridge_seconds"))
    m["edit_seconds"] = m["train_seconds"]     # MindBridge edits by training the memory and bridge
    write_metrics(ctx.run_dir / "metrics.json", m)
    return m


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """metrics.json: one flat JSON object, written atomically."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, (str, int, float, bool)) or v is None}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(flat, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
