"""Pieces every module shares: the LR schedule and the trainable-only checkpoint policy."""
from __future__ import annotations

import math
import random

import lightning as L
import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up then cosine decay to zero, stepped every optimizer step."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TrainableOnlyCheckpoint(L.LightningModule):
    """Checkpoints hold only parameters that train; frozen models are rebuilt from config.

    Frozen LLMs and encoders are hundreds of MB and identical to their source, so saving them
    would only make checkpoints slow and large. `strict_loading=False` lets a resumed run load
    the trainable part into a freshly built module.
    """

    def __init__(self):
        super().__init__()
        self.strict_loading = False

    def trainable_prefixes(self) -> tuple[str, ...]:
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Modules that train (with their buffers), plus trainable tensors inside frozen models
        # (e.g. LoRA adapters in the LLM).
        keep = self.trainable_prefixes()
        training = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k.startswith(keep) or k in training}
        # Random state, so a resumed run draws the same masks, dropout and noise as an
        # uninterrupted one (plain tensors and tuples: loadable with weights_only=True).
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(),
                                    **{name: rng.getstate() for name, rng in self._python_rngs().items()}}
        facts = self._facts_sha256()
        if facts:
            checkpoint["facts_sha256"] = facts

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, facts = checkpoint.get("facts_sha256"), self._facts_sha256()
        if saved and facts and saved != facts:
            from mindbridge.artifacts import ArtifactError
            raise ArtifactError(f"The checkpoint being resumed was trained on other facts (sha256 {saved[:12]}) "
                                f"than this run's edits ({facts[:12]}); resume with the data options it was "
                                "started with, or start without ckpt_path.")
        states = checkpoint.get("rng_states") or {}
        if "torch" in states:
            torch.set_rng_state(states["torch"])
        for name, rng in self._python_rngs().items():
            if name in states:
                rng.setstate(_as_tuples(states[name]))

    def on_train_start(self) -> None:
        # Resumed mid-epoch, Lightning skips `on_train_epoch_start`; a module that sets up its
        # epoch there (e.g. which parameters train in this curriculum phase) needs it anyway.
        if self.trainer.fit_loop.restarted_mid_epoch:
            self.on_train_epoch_start()

    def _python_rngs(self) -> dict[str, random.Random]:
        return {name: value for name, value in vars(self).items() if isinstance(value, random.Random)}

    def _facts_sha256(self) -> str | None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return datamodule.facts_hash() if hasattr(datamodule, "facts_hash") else None

    def epoch_steps(self) -> tuple[int, int]:
        """(total optimizer steps, steps per epoch) as the trainer will run them."""
        # Counted from the datamodule's loader, not `trainer.estimated_stepping_batches`: that sets
        # Lightning's data up before a checkpoint is restored, so a resumed run would fetch its
        # first batch from the wrong place in the epoch.
        trainer = self.trainer
        loader = trainer.datamodule.train_dataloader()
        batches = min(len(dl) for dl in getattr(loader, "flattened", [loader]))     # CombinedLoader "min_size"
        per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
        total = per_epoch * max(1, trainer.max_epochs or 1)
        if trainer.max_steps and trainer.max_steps > 0:
            total = min(total, trainer.max_steps)
        return total, per_epoch


def _as_tuples(value):
    """`random.Random.setstate` wants the nested tuples `getstate` gave (a checkpoint may hold lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
