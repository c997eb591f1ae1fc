"""The memory read gate: does a memory hold a fact that a prompt asks about?

Stage I trains the encoder to tell in-scope prompts from out-of-scope ones (L_exist pushes the
out-of-scope features away from the edits'). The gate reads that decision in the encoder's own
space: a prompt's score is the cosine similarity of its memory vector to the nearest stored
fact (each fact's prompt, encoded by the final encoder), and the memory is read only when the
score reaches the memory's threshold. Below it the LLM runs without any memory token, exactly
as it does unedited.

The threshold is calibrated once per memory, on out-of-scope prompts that Stage I never trained
on: the `1 - false_open_rate` quantile of their scores, so that about that fraction of prompts
like them still open the gate. Every LLM bridged to the memory inherits it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GATE_SCORE = "max_cosine"


def nearest_similarity(features: torch.Tensor, keys: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine similarity to the nearest key, its index) for each row of `features` `(B, d)`.

    `keys` `(N, d)` must be unit-normalised. An exact scan, in chunks of keys so that a large
    memory does not need a `(B, N)` matrix at once.
    """
    q = F.normalize(features.float(), dim=-1)
    best = torch.full((len(q),), -math.inf, device=q.device)
    where = torch.zeros(len(q), dtype=torch.long, device=q.device)
    for start in range(0, len(keys), chunk):
        sims = q @ keys[start:start + chunk].to(q.device, q.dtype).T
        value, index = sims.max(dim=1)
        better = value > best
        best = torch.where(better, value, best)
        where = torch.where(better, index + start, where)
    return best, where


def calibrate_threshold(scores: torch.Tensor, false_open_rate: float) -> float:
    """The score that at most `false_open_rate` of these out-of-scope prompts exceed.

    The gate opens at `score >= threshold`, so the threshold sits just above the
    `1 - false_open_rate` quantile of the held-out scores (the largest one for a rate of 0).
    """
    if not 0.0 <= false_open_rate < 1.0:
        raise ValueError(f"false_open_rate must lie in [0, 1) (got {false_open_rate}).")
    if scores.numel() == 0:
        raise ValueError("The gate needs held-out out-of-scope prompts to calibrate on; there are none.")
    ordered = scores.float().sort().values
    # The k highest held-out scores may stay at or above the threshold; the (k+1)-th must not.
    allowed = int(math.floor(false_open_rate * len(ordered)))
    edge = ordered[len(ordered) - 1 - allowed].item()
    return float(torch.nextafter(torch.tensor(edge), torch.tensor(math.inf)).item())


class MemoryGate(nn.Module):
    """Open for prompts whose memory vector lies near a stored fact's (`score >= threshold`)."""

    def __init__(self, keys: torch.Tensor, threshold: float):
        super().__init__()
        if keys.dim() != 2 or not len(keys):
            raise ValueError("a memory gate needs one key per stored fact, shape (facts, width)")
        self.register_buffer("keys", F.normalize(keys.float(), dim=-1), persistent=False)
        self.threshold = float(threshold)

    @torch.no_grad()
    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity `(B,)` of each memory vector to its nearest stored fact."""
        return nearest_similarity(features, self.keys)[0]

    @torch.no_grad()
    def is_open(self, features: torch.Tensor) -> torch.Tensor:
        """`(B,)` bool: True where the memory holds a fact near the prompt."""
        return self.scores(features) >= self.threshold

    def extra_repr(self) -> str:
        return f"facts={len(self.keys)}, threshold={self.threshold:.4f}"


def build_gate(encoder, fact_prompts: list[str], held_out_prompts: list[str],
               false_open_rate: float) -> tuple[MemoryGate, dict[str, float]]:
    """A trained memory's gate: its facts' prompts as keys, the threshold calibrated on
    `held_out_prompts` (out-of-scope prompts that Stage I never trained on).

    Returns the gate and what the calibration saw (for the manifest)."""
    keys = encoder.encode(fact_prompts)
    held = nearest_similarity(encoder.encode(held_out_prompts), F.normalize(keys.float(), dim=-1))[0] \
        if held_out_prompts else torch.empty(0)
    threshold = calibrate_threshold(held, false_open_rate)
    info = {"false_open_rate": false_open_rate, "calibration_prompts": len(held_out_prompts),
            "calibration_open_rate": 100.0 * float((held >= threshold).float().mean()),
            "calibration_score_median": float(held.median())}
    return MemoryGate(keys, threshold), info
