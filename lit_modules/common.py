"""Pieces every module shares: the LR schedule and the trainable-only checkpoint policy."""
from __future__ import annotations

import math

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

    def epoch_steps(self) -> tuple[int, int]:
        """(total optimizer steps, steps per epoch) as the trainer will run them."""
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        return total, per_epoch
