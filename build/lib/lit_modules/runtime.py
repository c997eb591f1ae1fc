"""What every stage job shares: the run's context, the Trainer, resuming, progress, and the record
of a run (metrics.json with the command and code commit). Nothing here imports a stage."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from data.datamodule import EditDataModule
from mindbridge.artifacts import ArtifactError
from mindbridge.loading import load_causal_lm, model_identity


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
    def memory_dirs(self) -> list[Path]:
        """`memory=DIR` or `memory=[DIR1,DIR2,...]` (Multi-MindBridge); default <run dir>/memory."""
        memory = self.cfg.memory
        if not memory:
            return [self.run_dir / "memory"]
        return [Path(str(m)).expanduser() for m in ([memory] if isinstance(memory, str) else memory)]

    @property
    def memory_dir(self) -> Path:
        dirs = self.memory_dirs
        if len(dirs) != 1:
            raise ValueError(f"stage={self.cfg.stage.name} works on one memory, but memory= lists {len(dirs)}.")
        return dirs[0]

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
            moe = {k: c[k] for k in ("num_experts", "top_k") if c.get(k) is not None}   # smollm2_moe
            self.llm, self.tokenizer = load_causal_lm(
                c.source, hub_id=c.hub_id, path=c.path, dtype=c.dtype, seed=self.cfg.seed,
                random_config=OmegaConf.to_container(c.random_config, resolve=True) if c.random_config else None,
                **moe)
            self.llm_identity = model_identity(self.llm, c.name)
        return self.llm, self.tokenizer


def make_trainer(ctx: RunContext, stage: str, max_epochs: int) -> L.Trainer:
    """A Trainer from the `trainer`, `logger` and `callbacks` groups, one checkpoint dir per stage."""
    cfg = ctx.cfg
    callbacks = []
    for name, cb in (cfg.get("callbacks") or {}).items():
        if cb is None:                      # a callback switched off with callbacks.NAME=null
            continue
        if issubclass(hydra.utils.get_class(cb._target_), ModelCheckpoint):    # every one writes to the stage's dir
            callbacks.append(hydra.utils.instantiate(cb, dirpath=str(ctx.run_dir / "checkpoints" / stage)))
        else:
            callbacks.append(hydra.utils.instantiate(cb))
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") and "_target_" in cfg.logger else False
    args = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(args.get("strategy"), dict):            # a strategy with arguments (trainer=fsdp)
        args["strategy"] = hydra.utils.instantiate(cfg.trainer.strategy)
    try:
        return L.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=logger,
                         default_root_dir=str(ctx.run_dir), enable_checkpointing=any(
                             isinstance(c, ModelCheckpoint) for c in callbacks), **args)
    except (MisconfigurationException, ImportError, ValueError) as exc:
        # A strategy or accelerator this machine cannot run (no GPU, DeepSpeed not installed).
        first = str(exc).strip().splitlines()[0]
        strategy = args.get("strategy")
        strategy = strategy if isinstance(strategy, str) else type(strategy).__name__
        raise ValueError(f"The trainer configuration (accelerator={args.get('accelerator')}, strategy={strategy}) "
                         f"cannot run here: {first}") from None


def checkpoint_to_resume(ctx: RunContext, stage: str) -> str | None:
    """The checkpoint to resume `stage` from. `ckpt_path=last` is the automatic resume: the stage's
    newest `last.ckpt` in this run directory if there is one, else a fresh start."""
    path = ctx.cfg.get("ckpt_path")
    if path == "last":
        last = ctx.run_dir / "checkpoints" / stage / "last.ckpt"
        return str(last) if last.is_file() else None
    if path and not Path(str(path)).is_file():
        raise ArtifactError(f"No checkpoint at {path}; pass an existing .ckpt file or ckpt_path=last.")
    return path


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


def provenance() -> dict[str, Any]:
    """What produced a run's figures: the command (under `train.py`) and the code's git commit,
    with the tracked files that differed from it. `code_dirty` counts code only: documentation
    (`*.md`, `docs/`) and recorded results (`benchmarks/results/`) do not change a figure."""
    info: dict[str, Any] = {}
    try:
        from hydra.core.hydra_config import HydraConfig
        info["command"] = " ".join(["python train.py", *HydraConfig.get().overrides.task])
    except ValueError:                       # composed in-process (tests): no command line
        pass
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            changed = sorted(line[3:] for line in status.stdout.splitlines() if line.strip())
            info["code_commit"] = commit.stdout.strip()
            info["uncommitted_files"] = ", ".join(changed)
            info["code_dirty"] = any(not is_documentation(path) for path in changed)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def is_documentation(path: str) -> bool:
    """A tracked file that no run reads: Markdown, docs/ and recorded results."""
    return path.endswith(".md") or path.startswith(("docs/", "benchmarks/results/"))


def log_final_metrics(cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Put the run's final figures into its W&B run: sweeps (`metric: {name: avg}`) read the summary.

    Lightning only logs what happens inside `fit`; evaluation runs after it. Other loggers keep
    metrics.json as the record (a second CSVLogger would only open another version folder).
    """
    from lightning.pytorch.loggers import WandbLogger
    target = cfg.logger.get("_target_") if cfg.get("logger") else None
    if not target or not issubclass(hydra.utils.get_class(target), WandbLogger):
        return
    run = hydra.utils.instantiate(cfg.logger).experiment     # the fit's W&B run if one is open
    flat = {k: v for k, v in metrics.items() if isinstance(v, (str, int, float, bool))}
    run.log({k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    run.summary.update(flat)
    run.finish()


def is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """metrics.json: one flat JSON object, written atomically."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, (str, int, float, bool)) or v is None}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(flat, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
