"""UniKE as stages: `stage=unike` (text, shared datamodules), `stage=unike_ablation` (the paper's
Table 4 rows side by side) and `stage=unike_mm` (BLIP-2 style vision-language model on MMEdit).

The method is `mindbridge.unike`; here the run's config is mapped onto it, the two trained parts
run as Lightning loops (the disentangling encoders' contrastive pre-training, and editing, one
training step = one batch of edits) and what was measured is recorded.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from lit_modules.editing import editing_trainer, method_config
from lit_modules.runtime import progress_bar
from mindbridge.evaluation import evaluate_edits
from mindbridge.unike import (ABLATIONS, DisentanglingEncoders, KnowledgePool, Request, UniKE, UniKEHParams,
                              mean_metrics, pool_triples)

def hparams_from(hp: DictConfig) -> UniKEHParams:
    return UniKEHParams.from_dict(OmegaConf.to_container(hp, resolve=True))


# --------------------------------------------------------------------------- Lightning modules


class _Indices(Dataset):
    """0..n-1: pool rows for the encoders, edit indices for the multimodal editor."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    @staticmethod
    def as_edits(rows: list[int]) -> dict:
        """Collate into the `{"edit": {"index": ...}}` batches `UniKEEditorModule` reads."""
        return {"edit": {"index": torch.tensor(rows)}}


class UniKEEncoderModule(L.LightningModule):
    """Contrastive pre-training of Enc^Sem / Enc^Tru on the knowledge pool (spec §4 Offline B)."""

    def __init__(self, encoders: DisentanglingEncoders, h_sem: torch.Tensor, h_pos: torch.Tensor,
                 h_neg: torch.Tensor, lr: float):
        super().__init__()
        self.encoders, self.lr = encoders, lr
        self.h_sem, self.h_pos, self.h_neg = h_sem, h_pos, h_neg        # (layers, N, d), centred, frozen

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        losses = self.encoders.loss(self.h_sem[:, batch], self.h_pos[:, batch], self.h_neg[:, batch])
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=True, on_epoch=True,
                      batch_size=len(batch))
        return losses["loss"]

    def configure_optimizers(self):
        return torch.optim.Adam(self.encoders.parameters(), lr=self.lr)


class UniKEEditorModule(L.LightningModule):
    """Editing as a Lightning loop: each training step writes one batch of edits (manual
    optimisation: the new neurons are optimised inside `UniKE.edit`, against the frozen LLM)."""

    def __init__(self, editor: UniKE, requests: list[Request], sequential: bool):
        super().__init__()
        self.automatic_optimization = False
        self.editor, self.requests, self.sequential = editor, requests, sequential   # not nn.Modules
        self.edit_id: dict[int, int] = {}
        self.reports: list[dict] = []

    def training_step(self, batch: dict, batch_idx: int) -> None:
        index = batch["edit"]["index"].tolist()
        first = self.editor.num_edits
        report = self.editor.edit([self.requests[i] for i in index], sequential=self.sequential)
        self.edit_id.update({rec: first + k for k, rec in enumerate(index)})
        self.reports.append({**report, "n": len(index)})
        self.log_dict({f"train/{k}": float(v) for k, v in report.items()}, on_step=True, on_epoch=False,
                      batch_size=len(index))

    def configure_optimizers(self):
        return None





def train_encoders(ctx, editor: UniKE, pool: KnowledgePool, hp: DictConfig) -> dict:
    """Fit the disentangling encoders with Lightning and install them (ζ′, W_ζ, Enc^Sem)."""
    enc_cfg = hp.encoders
    encoders = editor.new_encoders()
    sem, pos, neg = editor.centred(pool)
    module = UniKEEncoderModule(encoders, sem, pos, neg, float(enc_cfg.lr))
    loader = DataLoader(_Indices(len(pool)), batch_size=int(enc_cfg.batch_size), shuffle=True, drop_last=len(pool) > int(enc_cfg.batch_size))
    start = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(ctx.cfg.seed)
        trainer = editing_trainer(ctx, "unike-encoders", int(enc_cfg.epochs), len(loader))
        trainer.fit(module, train_dataloaders=loader)
    with torch.no_grad():
        final = {k: float(v) for k, v in encoders.loss(sem, pos, neg).items()}
    info = editor.set_encoders(encoders, pool)
    info.update({f"encoder_{k}": v for k, v in final.items()})
    info.update(probe_encoders(encoders, sem, pos, neg))
    info["encoder_seconds"] = time.perf_counter() - start
    return info


@torch.no_grad()
def probe_encoders(encoders: DisentanglingEncoders, sem, pos, neg) -> dict:
    """Spec §10: a linear probe on Enc^Tru separates pos from neg (held-out half), and Enc^Sem
    puts a sample's pos and neg encodings closer to its own question than to others'."""
    from sklearn.linear_model import LogisticRegression
    n = pos.shape[1]
    half = n // 2
    accs, own = [], []
    for i in range(len(encoders.tru)):
        z = torch.cat([encoders.tru[i](pos[i]), encoders.tru[i](neg[i])]).numpy()
        y = [1] * n + [0] * n
        train = list(range(half)) + list(range(n, n + half))
        test = list(range(half, n)) + list(range(n + half, 2 * n))
        if half < 2:
            continue
        clf = LogisticRegression(max_iter=500).fit(z[train], [y[j] for j in train])
        accs.append(clf.score(z[test], [y[j] for j in test]))
        s = torch.nn.functional.normalize(encoders.sem[i](pos[i]), dim=-1)
        a = torch.nn.functional.normalize(sem[i], dim=-1)
        own.append(float(((a @ s.T).argmax(1) == torch.arange(n)).float().mean()))
    return {"encoder_truth_probe_acc": 100.0 * sum(accs) / len(accs) if accs else float("nan"),
            "encoder_semantic_top1_pct": 100.0 * sum(own) / len(own) if own else float("nan")}


# --------------------------------------------------------------------------- the text stages


def _text_llm_only(cfg: DictConfig) -> None:
    if cfg.llm.get("kind", "text") != "text":
        raise ValueError(f"llm={cfg.llm.name} is a vision-language model; run it with stage=unike_mm.")


@dataclass
class CalibrationSets:
    """Never-evaluated prompts for the knowledge-weight ramp (`UniKE.calibrate_weights`):
    pseudo-edits with another wording of each, and unrelated prompts."""

    pseudo_edits: list[Request]
    rewordings: list[Request]
    unrelated: list[Request]


def text_calibration_sets(dm, pool_prompts: set[str], hp: DictConfig) -> CalibrationSets:
    """From the split's non-edited records: pseudo-edits are (question, its answer) of the
    paraphrase pairs, reworded by the pair's rephrase; unrelated prompts are out-of-scope prompts.
    Neither is in the knowledge pool (a stored question would retrieve itself)."""
    answers = {o.prompt: o.answer for o in dm.out_of_scope if o.answer and o.answer.strip()}
    pairs = [(q, r) for q, r in dm.paraphrase_pairs if q in answers and q not in pool_prompts]
    pairs = pairs[:int(hp.calibration_pairs)]
    used = {q for q, _ in pairs}
    unrelated = [Request(o.prompt, "") for o in dm.out_of_scope if o.prompt not in pool_prompts and o.prompt not in used]
    return CalibrationSets([Request(q, answers[q]) for q, _ in pairs], [Request(r, "") for _, r in pairs],
                           unrelated[:int(hp.calibration_prompts)])


def prepare(ctx, editor: UniKE, hp: DictConfig, pairs: list[tuple[str, str]], memory: list[Request],
            encoders: bool, triples: list[Request] | None = None, calibration=None) -> dict:
    """Offline parts: knowledge pool (wrong answers generated unless given), encoders, the
    knowledge-weight calibration (`calibration(pool prompts) -> CalibrationSets`), memory queries."""
    start = time.perf_counter()
    info: dict = {}
    if triples is None:
        pairs = pairs[:int(hp.pool.max_size)]
        with editor.configured(intrinsic=False, latent=False):
            triples, info = pool_triples(editor.model, editor.tokenizer, pairs, int(hp.pool.wrong_max_tokens))
    pool = editor.build_pool(triples)
    info.update(pool.stats, pool_seconds=time.perf_counter() - start)
    if encoders:                       # only the full method uses them
        info.update(train_encoders(ctx, editor, pool, hp))
        if hp.weight_calibration == "out_of_scope" and calibration is not None:
            sets = calibration({t.prompt for t in triples})
            info.update(editor.calibrate_weights(sets.pseudo_edits, sets.rewordings, sets.unrelated))
    info["memory_queries"] = editor.set_memory_queries(memory[:int(hp.memory_prompts)])
    info["offline_seconds"] = time.perf_counter() - start
    return info


def edit_all(ctx, editor: UniKE, requests: list[Request], sequential: bool, batch_size: int, dm) -> tuple[dict[int, int], dict]:
    """Write every edit through the datamodule's edit loader; returns record -> edit id and timings."""
    dm.connect(None, batch_size=batch_size, out_batch_size=1)
    steps = -(-len(requests) // batch_size)
    module = UniKEEditorModule(editor, requests, sequential)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*configure_optimizers.*returned `None`.*")
        editing_trainer(ctx, "unike", 1, steps).fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    reps = module.reports
    n = sum(r["n"] for r in reps) or 1
    return module.edit_id, {
        "edit_seconds": seconds, "edit_facts_per_second": len(requests) / seconds if seconds else float("nan"),
        "edit_steps_mean": sum(r["steps"] * r["n"] for r in reps) / n,
        "edit_train_correct_pct": sum(r["edit_correct_pct"] * r["n"] for r in reps) / n,
        "extra_params": editor.added_params,
        "extra_params_pct_of_llm": 100.0 * editor.added_params / sum(p.numel() for p in editor.model.parameters()),
    }


def score(editor: UniKE, records, edit_id: dict[int, int], sequential: bool, batch_size: int, advance=None) -> dict:
    """The shared evaluator: one-step = each record with only its own edit on; sequential = all on."""
    if sequential:
        with editor.active_edits(None):
            return evaluate_edits(editor, editor.unedited, records, batch_size, advance)
    rows = []
    for i, rec in enumerate(records):
        with editor.active_edits([edit_id[i]]):
            rows.append(evaluate_edits(editor, editor.unedited, [rec], batch_size, advance))
    return mean_metrics(rows)


def diagnostics(editor: UniKE, records, edit_id: dict[int, int], limit: int = 50) -> dict:
    """Spec §10: mean knowledge weight and extra-neuron firing on edit / paraphrase / unrelated
    prompts (each with its own record's edit on), and retrieval recall@K of paraphrases."""
    recs = list(enumerate(records))[:limit]
    rel = [(Request(r.prompt, ""), edit_id[i]) for i, r in recs]
    gen = [(Request(p, ""), edit_id[i]) for i, r in recs for p in r.rephrase_prompts[:1]]
    loc = [(Request(p, ""), edit_id[i]) for i, r in recs for p in r.loc_prompts[:1]]
    out = {}
    for kind, items in (("rel", rel), ("gen", gen), ("loc", loc)):
        if not items:
            continue
        p = editor.probe([q for q, _ in items], [o for _, o in items])
        out[f"knowledge_weight_{kind}_pct"] = p["w_mean"]
        out[f"knowledge_weight_on_{kind}_pct"] = p["w_on_pct"]
        out[f"extra_neurons_fire_{kind}_pct"] = p["fire_pct"]
    out["retrieval_recall_gen_pct"] = editor.retrieval_recall([q for q, _ in gen], [o for _, o in gen])
    return out


def _text_setup(ctx):
    cfg = ctx.cfg
    _text_llm_only(cfg)
    hp = method_config(cfg, "unike")
    llm, tok = ctx.load_llm()
    dm = ctx.data()
    out = [o for o in dm.out_of_scope]
    pairs = [(o.prompt, o.answer) for o in out if o.answer and o.answer.strip()]
    memory = [Request(o.prompt, "") for o in out]
    reworded = rewordings_for(dm, hp)
    requests = [Request(r.prompt, r.target_new, rewordings=tuple(words)) for r, words in zip(dm.edits, reworded)]
    return hp, llm, tok, dm, pairs, memory, requests


def rewordings_for(dm, hp: DictConfig) -> list[list[str]]:
    """`hp.rewordings_per_edit` other wordings of each edit's prompt, from the split's non-edited
    records (never an evaluation prompt; `data.rewordings.RewordingBank`)."""
    count = int(hp.rewordings_per_edit)
    if count <= 0:
        return [[] for _ in dm.edits]
    from data.rewordings import RewordingBank
    bank = RewordingBank(getattr(dm.split, "rewording_templates", ()), dm.edits)
    return [bank.for_prompt(r.subject, r.prompt, count, float(hp.rewording_min_similarity), str(dm.seed))
            for r in dm.edits]


def _run_mode(ctx, editor: UniKE, hp: DictConfig, dm, requests) -> dict:
    sequential = bool(hp.sequential)
    editor.clear_edits()
    L.seed_everything(ctx.cfg.seed, workers=True, verbose=False)
    edit_id, timing = edit_all(ctx, editor, requests, sequential, int(hp.batch_size), dm)
    start = time.perf_counter()
    with progress_bar("evaluating") as advance:
        m = score(editor, dm.edits, edit_id, sequential, int(hp.eval.batch_size), advance)
    m["eval_seconds"] = time.perf_counter() - start
    m.update(timing)
    m.update(diagnostics(editor, dm.edits, edit_id, int(hp.eval.diagnostics_records)))
    m["unike_protocol"] = "sequential" if sequential else "one_step"
    return m


def unike(ctx) -> None:
    """Pool + encoders + edits of `data` in `llm`, scored with the shared evaluator."""
    hp, llm, tok, dm, pairs, memory, requests = _text_setup(ctx)
    editor = UniKE(llm, tok, hparams_from(hp))
    try:
        ctx.metrics.update({"method": "unike", "encoder": "none", **editor.describe()})
        info = prepare(ctx, editor, hp, pairs, memory, encoders=hp.mode == "full",
                       calibration=lambda pool: text_calibration_sets(dm, pool, hp))
        m = _run_mode(ctx, editor, hp, dm, requests)
        ctx.metrics.update({**info, **m, "train_seconds": info["offline_seconds"] + m["edit_seconds"]})
    finally:
        editor.remove()


ABLATION_KEYS = ("rel", "gen", "loc", "avg", "rel_em", "gen_em", "loc_em", "edit_seconds", "eval_seconds",
                 "knowledge_weight_rel_pct", "knowledge_weight_gen_pct", "knowledge_weight_loc_pct",
                 "knowledge_weight_on_gen_pct", "knowledge_weight_on_loc_pct",
                 "extra_neurons_fire_rel_pct", "extra_neurons_fire_gen_pct", "extra_neurons_fire_loc_pct")


def unike_ablation(ctx) -> None:
    """The paper's Table 4 on text: each row of `model.ablation_rows` with the same pool and
    encoders, scored with the shared evaluator; writes unike_ablation.json / .md."""
    hp, llm, tok, dm, pairs, memory, requests = _text_setup(ctx)
    rows_wanted = list(hp.get("ablation_rows") or ABLATIONS)
    editor = UniKE(llm, tok, hparams_from(hp))
    rows = []
    try:
        ctx.metrics.update({"method": "unike", "encoder": "none", **editor.describe()})
        unknown = [r for r in rows_wanted if r not in ABLATIONS]
        if unknown:
            raise ValueError(f"Unknown UniKE ablation rows {unknown}; choose from {', '.join(ABLATIONS)}.")
        if "full" in rows_wanted:
            editor.set_mode("full")            # calibrates the adaptive weight the full row uses
        info = prepare(ctx, editor, hp, pairs, memory, encoders="full" in rows_wanted,
                       calibration=lambda pool: text_calibration_sets(dm, pool, hp))
        ctx.metrics.update(info)
        for mode in rows_wanted:
            editor.set_mode(mode)
            m = _run_mode(ctx, editor, hp, dm, requests)
            rows.append({"mode": mode, **{k: m.get(k) for k in ABLATION_KEYS}})
            ctx.metrics.update({f"{mode}_{k}": m.get(k) for k in ABLATION_KEYS})
            if mode == "full":
                ctx.metrics.update(m)
    finally:
        editor.remove()
    table = ablation_markdown(rows, ctx.metrics.get("unike_protocol", ""))
    (ctx.run_dir / "unike_ablation.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    (ctx.run_dir / "unike_ablation.md").write_text(table, encoding="utf-8")
    ctx.metrics["train_seconds"] = info["offline_seconds"] + sum(r["edit_seconds"] for r in rows)
    ctx.metrics["edit_seconds"] = sum(r["edit_seconds"] for r in rows)
    if ctx.cfg.get("print_table", True):
        from rich.console import Console
        from rich.markdown import Markdown
        Console().print(Markdown(table))


ROW_NAMES = {"intrinsic": "only intrinsic", "latent": "only latent IKE", "both": "intrinsic + latent IKE",
             "full": "intrinsic + latent IKE + disentangling (UniKE)"}


def ablation_markdown(rows: list[dict], protocol: str) -> str:
    head = "| row | Rel | Gen | Loc | Avg | w rel | w loc | fire rel | fire loc | edit s |"
    lines = [f"UniKE ablation ({protocol}); w = mean knowledge weight (%), fire = extra neurons firing (%).", "",
             head, "|" + "---|" * (head.count("|") - 1)]

    def f(v, digits=1):
        return "–" if v is None or v != v else f"{v:.{digits}f}"
    for r in rows:
        lines.append(f"| {ROW_NAMES.get(r['mode'], r['mode'])} | {f(r['rel'])} | {f(r['gen'])} | {f(r['loc'])} | "
                     f"{f(r['avg'])} | {f(r['knowledge_weight_rel_pct'])} | {f(r['knowledge_weight_loc_pct'])} | "
                     f"{f(r['extra_neurons_fire_rel_pct'])} | {f(r['extra_neurons_fire_loc_pct'])} | "
                     f"{f(r['edit_seconds'], 0)} |")
    return "\n".join(lines) + "\n"



# --------------------------------------------------------------------------- the multimodal stage


def unike_mm(ctx) -> None:
    """UniKE on a BLIP-2 model with MMEdit: Rel / T-Gen / M-Gen / T-Loc / M-Loc (spec §9)."""
    from data.mmedit import read_mmedit, split_mmedit
    from mindbridge.unike_mm import (ImageFeatures, calibration_requests, edit_requests, load_vision_lm,
                                     memory_requests, score_mm)
    cfg = ctx.cfg
    c, mm = cfg.llm, cfg.stage.mmedit
    if c.get("kind", "text") != "vision_language":
        raise ValueError(f"stage=unike_mm needs a vision-language model (llm=tiny_blip2 or llm=blip2_opt), "
                         f"not llm={c.name}.")
    hp = method_config(cfg, "unike")
    records = read_mmedit(mm.path, mm.task)
    edits, rest = split_mmedit(records, int(mm.num_edits), int(mm.seed))
    vlm, tok = load_vision_lm(c.source, hub_id=c.hub_id, path=c.path, dtype=c.dtype, seed=cfg.seed,
                              random_config=OmegaConf.to_container(c.random_config, resolve=True)
                              if c.random_config else None)
    features = ImageFeatures(vlm, mm.image_root)
    requests = edit_requests(features, edits)     # every missing image is reported before any training
    pool = [r for r in edit_requests(features, rest[:int(mm.max_pool)]) if r.wrong]
    memory = memory_requests(features, rest[:int(hp.memory_prompts)])
    # Calibration records: non-edited ones after the pool's (never evaluated, not in the pool).
    held_out = rest[int(mm.max_pool):int(mm.max_pool) + int(hp.calibration_pairs)]
    editor = UniKE(vlm.language_model, tok, hparams_from(hp))
    try:
        ctx.metrics.update({"method": "unike", "encoder": "none", "llm": c.name, "dataset": f"mmedit_{mm.task}",
                            "num_edits": len(edits), "data_seed": int(mm.seed), **editor.describe()})
        info = prepare(ctx, editor, hp, [], memory, encoders=hp.mode == "full", triples=pool,
                       calibration=lambda _: CalibrationSets(*calibration_requests(features, held_out)))
        sequential = bool(hp.sequential)
        module = UniKEEditorModule(editor, requests, sequential)
        loader = DataLoader(_Indices(len(requests)), batch_size=int(hp.batch_size), collate_fn=_Indices.as_edits)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*configure_optimizers.*returned `None`.*")
            editing_trainer(ctx, "unike-mm", 1, len(loader)).fit(module, train_dataloaders=loader)
        edit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        m = score_mm(editor, features, edits, module.edit_id, sequential, int(hp.eval.batch_size))
        ctx.metrics.update({**info, **m, "eval_seconds": time.perf_counter() - start, "edit_seconds": edit_seconds,
                            "train_seconds": info["offline_seconds"] + edit_seconds,
                            "extra_params": editor.added_params,
                            "unike_protocol": "sequential" if sequential else "one_step"})
    finally:
        editor.remove()
