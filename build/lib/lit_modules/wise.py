"""WISE as a stage (`stage=wise`): lifelong editing through the shared datamodule, scored with the
shared evaluator after the last edit.

The method itself is `mindbridge.wise`; this file maps the run's config onto it, drives the edit
stream as a Lightning loop (one training step = one batch of `batch_size` edits, each paired
with irrelevant texts from records that are not edited) and records what was measured.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from lit_modules.editing import editing_trainer, method_config, facts_for, resolve_layer
from lit_modules.runtime import progress_bar
from mindbridge.evaluation import evaluate_edits
from mindbridge.facts import Fact
from mindbridge.wise import WISE, WISEHParams

MODEL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "wise.yaml"
log = logging.getLogger(__name__)


def irrelevant_texts(out: dict, with_answers: bool = True) -> list[str]:
    """Out-of-scope records as the margin loss's irrelevant texts: `prompt + " " + answer`
    (upstream pairs NQ question + answer) or the prompt alone (what the router reads)."""
    return [f"{p} {a}" if a and with_answers else p for p, a in zip(out["prompt"], out["answer"])]


class WISEModule(L.LightningModule):
    """The edit stream as a Lightning loop: each step writes one batch of edits into the side memory.

    Optimisation is manual (one SGD per batch of edits inside `WISE.edit`, on the side memory
    only); `on_train_batch_end` stores full shards and merges them, as upstream does after each
    edit. The side memories, not a checkpoint, are the artifact.
    """

    def __init__(self, wise: WISE, facts: list[Fact]):
        super().__init__()
        self.automatic_optimization = False
        self.wise, self.facts = wise, facts      # WISE is not an nn.Module: the LLM stays outside

    def training_step(self, batch: dict, batch_idx: int) -> None:
        edit = batch["edit"]
        irrelevant = irrelevant_texts(batch["out"], self.wise.hparams.irrelevant_answers)
        report = self.wise.edit([self.facts[i] for i in edit["index"].tolist()], irrelevant)
        self.log_dict({f"train/{k}": float(report[k]) for k in ("final_loss", "final_nll", "steps", "act")},
                      on_step=True, on_epoch=False, batch_size=len(edit["index"]))
        self.log("edits", float(self.wise.total_edits), prog_bar=True, on_step=True, batch_size=1)
        # Lifelong runs are long: a line in <run dir>/train.log every 10 batches.
        if batch_idx % 10 == 0:
            log.info("WISE: %d edits, last batch %.1fs, %.1f steps, loss %.3f, nll %.3f, act %.2f",
                     self.wise.total_edits, report["seconds"], report["steps"], report["final_loss"],
                     report["final_nll"], report["act"])

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.wise.commit()

    def configure_optimizers(self):
        return None


def wise(ctx) -> None:
    """Edit `data`'s edits into `llm` with WISE, save the side memories, evaluate after the last edit.

    Writes `<run dir>/wise/` (wise.safetensors, manifest.json, edits.jsonl) and adds the routing
    rates, thresholds, per-edit optimisation statistics and throughput to the metrics.
    """
    cfg = ctx.cfg
    hp_cfg = method_config(cfg, "wise")
    hp = WISEHParams.from_dict(OmegaConf.to_container(hp_cfg, resolve=True))
    llm, tok = ctx.load_llm()
    dm = ctx.data()
    ctx.metrics.update({"method": f"wise-{hp.variant}", "encoder": "none"})
    layer = resolve_layer(hp_cfg, cfg.llm.name, llm)
    editor = WISE(llm, tok, layer, hparams=hp, llm_identity=ctx.llm_identity)
    try:
        facts = facts_for(dm.edits)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        start = time.perf_counter()
        templates = editor.templates                 # generated once per model, counted as editing
        # eps_quantile's floor is measured on out-of-scope prompts that L_a never trains against; at
        # most a quarter of them, so that small splits keep most for the irrelevant stream.
        held_out = int(hp_cfg.get("calibration_prompts", 0)) if hp.eps_quantile is not None else 0
        if held_out > len(dm.out_of_scope) // 4:
            log.warning("WISE: %d calibration prompts held out instead of %d (a quarter of the %d out-of-scope "
                        "prompts).", len(dm.out_of_scope) // 4, held_out, len(dm.out_of_scope))
            held_out = len(dm.out_of_scope) // 4
        dm.connect(None, batch_size=hp.batch_size, out_batch_size=hp.batch_size * hp.irrelevant_per_edit,
                   held_out=held_out)
        editor.calibrate([o.prompt for o in dm.held_out_out_of_scope])
        batches = -(-len(facts) // hp.batch_size)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*configure_optimizers.*returned `None`.*")
            editing_trainer(ctx, "wise", 1, batches).fit(WISEModule(editor, facts), datamodule=dm)
        editor.finish()
        edit_seconds = time.perf_counter() - start

        edits_log = editor.edit_log
        oos = [o.prompt for o in dm.training_out_of_scope][:300]
        ctx.metrics.update({
            "wise_variant": hp.variant, "wise_layer": layer, "wise_site": editor.site.path,
            "wise_site_kind": editor.site.kind, "wise_value_matrices": ",".join(editor.wrapper.value_names),
            "wise_batch_size": hp.batch_size, "wise_irrelevant_per_edit": hp.irrelevant_per_edit,
            "wise_replay_per_edit": hp.replay_per_edit, "wise_irrelevant_answers": hp.irrelevant_answers,
            "wise_calibration_prompts": len(editor.calibration_texts),
            "wise_save_freq": hp.save_freq, "wise_merge_freq": hp.merge_freq,
            "wise_merges": editor.merges, "wise_memories": len(editor.wrapper.candidates),
            "wise_thresholds": ",".join(f"{e:.4g}" for _, e in editor.wrapper.candidates),
            "wise_min_act": min(e["act"] for e in edits_log), "wise_num_templates": len(templates),
            "wise_steps_mean": sum(e["steps"] for e in edits_log) / len(edits_log),
            "wise_final_loss_mean": sum(e["final_loss"] for e in edits_log) / len(edits_log),
            "wise_final_nll_mean": sum(e["final_nll"] for e in edits_log) / len(edits_log),
            "wise_early_stopped_pct": 100.0 * sum(e["steps"] < hp.n_iter for e in edits_log) / len(edits_log),
            "edit_seconds": edit_seconds, "train_seconds": edit_seconds,
            "edits_per_minute": 60.0 * len(facts) / edit_seconds if edit_seconds > 0 else float("nan"),
            **routing_rates(editor, dm.edits, facts, oos),
        })
        out_dir = editor.save(ctx.run_dir / "wise", info={"dataset": dm.name, "data_seed": dm.seed,
                                                          "edit_seconds": edit_seconds})
        ctx.metrics["wise_dir"] = str(out_dir)

        start = time.perf_counter()
        with progress_bar("evaluating") as advance:
            ctx.metrics.update(evaluate_edits(editor, editor.unedited, dm.edits, int(hp_cfg.eval.batch_size), advance))
            ctx.metrics.update(rel_by_stream_position(editor, dm.edits, facts, int(hp_cfg.eval.batch_size)))
        ctx.metrics["eval_seconds"] = time.perf_counter() - start
        (ctx.run_dir / "wise_edit_log.json").write_text(json.dumps(edits_log, indent=1), encoding="utf-8")
    finally:
        editor.remove()                              # later jobs get the unedited LLM back


def routing_rates(editor: WISE, edits, facts: list[Fact], oos: list[str]) -> dict[str, float]:
    """% of prompts the router sends to a side memory (spec §8.3), and to the one holding the edit.

    route_rel / route_gen: edit prompts / paraphrases routed to any side memory (`_own`: to the
    memory that holds that edit, i.e. retrieval precision); route_loc: locality prompts of the
    edited records (unrelated) routed to a side memory; route_oos: out-of-scope training prompts.
    """
    holder = editor.memory_of_edit()
    owner = [holder[f.id] for f in facts]
    para = [(p, owner[i]) for i, r in enumerate(edits) for p in r.rephrase_prompts]
    groups = {"rel": ([r.prompt for r in edits], owner), "gen": ([p for p, _ in para], [o for _, o in para]),
              "loc": ([p for r in edits for p in r.loc_prompts], None), "oos": (oos, None)}
    out: dict[str, float] = {}
    for name, (prompts, owners) in groups.items():
        if not prompts:
            continue
        route, gaps = editor.routes(prompts)
        out[f"route_{name}_pct"] = 100.0 * float((route >= 0).float().mean())
        if owners is not None:
            out[f"route_{name}_own_pct"] = 100.0 * float((route == torch.tensor(owners)).float().mean())
        if gaps.numel():
            out[f"gap_{name}_median"] = float(gaps.max(dim=1).values.median())
    return out


def rel_by_stream_position(editor: WISE, edits, facts: list[Fact], batch_size: int, parts: int = 4) -> dict[str, float]:
    """Rel of the edits grouped by when they were made (q1 = the oldest quarter of the stream).

    Scores are taken after the last edit, so q1 shows how well the earliest edits survive the
    later ones (the lifelong question); only the edit prompts are scored here.
    """
    position = {e["id"]: e["position"] for e in editor.edit_log}
    order = sorted(range(len(facts)), key=lambda i: position[facts[i].id])
    out: dict[str, float] = {}
    size = -(-len(order) // parts)
    for q in range(parts):
        chunk = [dataclasses.replace(edits[i], rephrase_prompts=(), loc_prompts=(), loc_answers=())
                 for i in order[q * size:(q + 1) * size]]
        if chunk:
            m = evaluate_edits(editor, editor.unedited, chunk, batch_size)
            out[f"rel_stream_q{q + 1}"] = m["rel"]
    return out
