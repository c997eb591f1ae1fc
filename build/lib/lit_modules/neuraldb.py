"""NeuralDB as a stage (`stage=neuraldb`): edit through the shared datamodule, score with the shared evaluator.

The method itself is `mindbridge.neuraldb`; this file maps the run's config onto it, drives the
editing as a Lightning loop (one training step = one batch of facts written into the database)
and records what was measured.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from lit_modules.editing import editing_trainer, method_config, facts_for, resolve_layer
from lit_modules.runtime import progress_bar
from mindbridge.artifacts import ArtifactError
from mindbridge.evaluation import evaluate_edits
from mindbridge.facts import Fact
from mindbridge.neuraldb import EditHParams, NeuralDB

MODEL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "neuraldb.yaml"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class NeuralDBModule(L.LightningModule):
    """Editing as a Lightning loop: each training step writes one batch of edits into the database.

    Nothing here has parameters: the residuals are optimised inside `NeuralDB.add` (one Adam
    per batch of facts, against the frozen LLM), so optimisation is manual and the database,
    not a checkpoint, is the artifact.
    """

    def __init__(self, db: NeuralDB, facts: list[Fact], rewordings: dict[str, list[str]] | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.db, self.facts = db, facts      # NeuralDB is not an nn.Module: the LLM stays outside
        self.rewordings = rewordings or {}

    def training_step(self, batch: dict, batch_idx: int) -> None:
        edit = batch["edit"]
        report = self.db.add([self.facts[i] for i in edit["index"].tolist()], self.rewordings)
        self.log_dict({f"train/{k}": float(report[k]) for k in ("final_loss", "final_nll", "steps", "residual_norm")},
                      on_step=True, on_epoch=False, batch_size=len(edit["index"]))
        self.log("facts", float(len(self.db)), prog_bar=True, on_step=True, batch_size=1)

    def configure_optimizers(self):
        return None


def rewordings_for(dm, facts: list[Fact], hp: EditHParams) -> dict[str, list[str]]:
    """`hp.rewordings` other wordings of each edit's prompt, from the split's non-edited records."""
    if hp.rewordings <= 0:
        return {}
    from data.rewordings import RewordingBank
    bank = RewordingBank(dm.split.rewording_templates, dm.edits)
    return {f.id: bank.for_prompt(f.subject, f.prompt, hp.rewordings, hp.rewording_min_similarity, str(dm.seed))
            for f in facts}


def neuraldb(ctx) -> None:
    """Build the database of `data`'s edits in `llm`, calibrate γ, save it, evaluate it.

    Writes `<run dir>/neuraldb/` (database.safetensors, facts.jsonl, manifest.json) and adds
    γ, its calibration, gate fire rates and edit throughput to the metrics.
    """
    cfg = ctx.cfg
    hp = method_config(cfg, "neuraldb")
    llm, tok = ctx.load_llm()
    dm = ctx.data()
    ctx.metrics.update({"method": "neuraldb", "encoder": "none"})
    edit_hp = EditHParams.from_dict(OmegaConf.to_container(hp, resolve=True))
    layer = resolve_layer(hp, cfg.llm.name, llm)
    facts = facts_for(dm.edits)
    if hp.get("database"):
        db, edit_seconds = _existing_database(ctx, hp, llm, tok, facts), 0.0
        ctx.metrics["neuraldb_reused"] = str(hp.database)
    else:
        db = NeuralDB(llm, tok, layer, llm_identity=ctx.llm_identity, gamma=hp.gamma, hparams=edit_hp,
                      key_dtype=_DTYPES[hp.get("key_dtype", "float32")], chunk_size=hp.get("chunk_size"))
    try:
        start = time.perf_counter()
        templates = db.templates                     # generated once per model, counted as editing
        if not hp.get("database"):
            rewordings = rewordings_for(dm, facts, edit_hp)
            if rewordings:
                (ctx.run_dir / "neuraldb_rewordings.json").write_text(
                    json.dumps(rewordings, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
                ctx.metrics["rewordings_per_fact_mean"] = sum(map(len, rewordings.values())) / len(facts)
            L.seed_everything(cfg.seed, workers=True, verbose=False)
            dm.connect(None, batch_size=edit_hp.batch_size, out_batch_size=1)
            batches = -(-len(facts) // edit_hp.batch_size)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*configure_optimizers.*returned `None`.*")
                editing_trainer(ctx, "neuraldb", 1, batches).fit(NeuralDBModule(db, facts, rewordings), datamodule=dm)
            edit_seconds = time.perf_counter() - start
        layer = db.layer

        start = time.perf_counter()
        oos = [o.prompt for o in dm.out_of_scope][:int(hp.calibration.max_prompts)]
        if hp.gamma is None:
            c = hp.calibration
            db.calibrate(oos, c.in_scope, c.in_quantile, c.out_quantile, c.position, c.get("relaxed_out_quantile"))
        calibration_seconds = time.perf_counter() - start

        diag = _fire_rates(db, dm.edits, facts, oos)
        stats = db.stats
        ctx.metrics.update({
            "gamma": db.gamma, "gamma_source": db.gamma_source, **db.calibration, **diag,
            "neuraldb_layer": layer, "neuraldb_site": db.site.path, "neuraldb_site_kind": db.site.kind,
            "num_facts": len(db), "num_templates": len(templates), "db_bytes": db.nbytes,
            "db_mb": db.nbytes / 2**20, "key_dim": int(db.gate.keys_hat.shape[1]),
            "residual_dim": int(db.gate.residuals.shape[1]), "key_collisions": db.collisions,
            "subject_not_found": int((stats["subject_found"] == 0).sum()),
            "residual_steps_mean": float(stats["steps"].mean()),
            "residual_final_loss_mean": float(stats["final_loss"].mean()),
            "residual_final_nll_mean": float(stats["final_nll"].mean()),
            "residual_early_stopped_pct": 100.0 * float((stats["final_loss"] < edit_hp.early_stop_loss).float().mean()),
            "residual_norm_mean": float(db.gate.residuals.norm(dim=-1).mean()),
            "key_cos_subject_mean": float(stats["cos_subject"].mean()),
            "key_cos_templates_mean": float(stats["cos_loo"].mean()),
            "edit_seconds": edit_seconds, "calibration_seconds": calibration_seconds,
            "train_seconds": edit_seconds + calibration_seconds,
            "edit_facts_per_second": len(facts) / edit_seconds if edit_seconds > 0 else float("nan"),
        })
        out_dir = db.save(ctx.run_dir / "neuraldb", info={"dataset": dm.name, "data_seed": dm.seed,
                                                          "edit_seconds": edit_seconds})
        ctx.metrics["neuraldb_dir"] = str(out_dir)

        start = time.perf_counter()
        db.gate.positions_seen = db.gate.positions_fired = 0
        with progress_bar("evaluating") as advance:
            ctx.metrics.update(evaluate_edits(db, db.unedited, dm.edits, int(hp.eval.batch_size), advance))
        ctx.metrics["eval_seconds"] = time.perf_counter() - start
        ctx.metrics["gate_fired_positions_eval_pct"] = (
            100.0 * db.gate.positions_fired / max(1, db.gate.positions_seen))
    finally:
        db.remove()                                  # later jobs get the unedited LLM back


def _existing_database(ctx, hp, llm, tok, facts: list[Fact]) -> NeuralDB:
    """`model.database=DIR`: a saved database of exactly these edits for this LLM."""
    db = NeuralDB.load(hp.database, llm, tok, llm_name=ctx.cfg.llm.name, llm_identity=ctx.llm_identity,
                       chunk_size=hp.get("chunk_size"))
    if sorted(f.id for f in db.facts) != sorted(f.id for f in facts) or set(db.facts) != set(facts):
        db.remove()
        raise ArtifactError(f"The NeuralDB at {hp.database} holds {len(db.facts)} facts that differ from the "
                            f"{len(facts)} edits selected by the data options; use the run's data options or "
                            "build a database with stage=neuraldb.")
    if hp.gamma is not None:
        db.gamma, db.gamma_source = float(hp.gamma), "config"
    return db


def _fire_rates(db: NeuralDB, edits, facts: list[Fact], oos: list[str]) -> dict[str, float]:
    """How often the gate fires, from the keys alone (spec §9's diagnostic; nothing is tuned on it).

    rel / gen: % of edit prompts / paraphrases on which the gate fires with the edit's own fact
    (and `_other`: with some other fact); loc: % of locality prompts on which it fires at all;
    oos: the same on the out-of-scope prompts used for calibration.
    """
    row = {fid: i for i, fid in enumerate(db.ids)}          # the database keeps insertion order
    owner = [row[f.id] for f in facts]
    rel = db.fire_rates([r.prompt for r in edits], owner)
    para = [(p, owner[i]) for i, r in enumerate(edits) for p in r.rephrase_prompts]
    gen = db.fire_rates([p for p, _ in para], [i for _, i in para])
    loc = db.fire_rates([p for r in edits for p in r.loc_prompts], [None] * sum(len(r.loc_prompts) for r in edits))
    out = db.fire_rates(oos, [None] * len(oos))
    return {"gate_fire_rel_pct": rel["own"], "gate_fire_rel_other_pct": rel["other"],
            "gate_fire_gen_pct": gen["own"], "gate_fire_gen_other_pct": gen["other"],
            "gate_fire_loc_pct": loc["any"], "gate_fire_oos_pct": out["any"],
            "gate_fired_positions_loc_pct": loc["positions"]}
