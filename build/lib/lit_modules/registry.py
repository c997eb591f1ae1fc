"""The registry of stage jobs: the one list a new method is added to, and `run`, which runs a
stage's jobs and writes `<run dir>/metrics.json`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lit_modules import stages
from lit_modules.neuraldb import neuraldb
from lit_modules.runtime import RunContext, is_rank_zero, log_final_metrics, provenance, write_metrics
from lit_modules.unike import unike, unike_ablation, unike_mm
from lit_modules.wise import wise

JOBS = {"pretrain": stages.pretrain, "bridge": stages.bridge, "eval": stages.evaluate, "ask": stages.ask,
        "crossmodel": stages.crossmodel,
        "neuraldb": neuraldb, "wise": wise, "unike": unike, "unike_ablation": unike_ablation, "unike_mm": unike_mm}


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run the stage's jobs in order and write `<run_dir>/metrics.json`."""
    start = time.perf_counter()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    ctx = RunContext(cfg, Path(run_dir))
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    ctx.metrics.update({"method": cfg.model.name, "llm": cfg.llm.name, "encoder": cfg.encoder.name,
                        "stage": cfg.stage.name, "seed": cfg.seed, **provenance()})
    for job in cfg.stage.jobs:
        JOBS[job](ctx)
    m = ctx.metrics
    # MindBridge edits by training the memory and the bridge; other methods set their own.
    m.setdefault("train_seconds", sum(m.get(k) or 0.0 for k in ("pretrain_seconds", "bridge_seconds")))
    m.setdefault("edit_seconds", m["train_seconds"])
    # Wall clock from the composed config to the figures (interpreter start-up and imports excluded).
    m["run_seconds"] = time.perf_counter() - start
    if is_rank_zero():                     # under DDP every process runs the jobs; one writes
        write_metrics(ctx.run_dir / "metrics.json", m)
    log_final_metrics(cfg, m)
    return m
