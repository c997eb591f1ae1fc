"""Batch builders shared by training and evaluation.

Everything is left-padded: the positions that matter (the last prompt token and the target
tokens) then sit at the end of every row, so a causal LM only has to compute the last
`keep` logits (`logits_to_keep`) instead of a full vocabulary projection per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class TeacherForcedBatch:
    """`prompt + " " + target`, left-padded.

    `target_ids[b, t]` is the t-th target token of row b (right-aligned, so rows with shorter
    targets are padded on the left and masked by `target_mask`). The logits that predict those
    tokens are the last `keep` positions of the sequence minus the final one: a model called with
    `logits_to_keep=keep` returns `(B, keep, V)` and `logits[:, :-1]` lines up with `target_ids`.
    """

    input_ids: torch.Tensor        # (B, L)
    attention_mask: torch.Tensor   # (B, L)
    target_ids: torch.Tensor       # (B, T)
    target_mask: torch.Tensor      # (B, T) bool

    @property
    def keep(self) -> int:
        return self.target_ids.shape[1] + 1

    def to(self, device: torch.device | str) -> "TeacherForcedBatch":
        return TeacherForcedBatch(*(t.to(device) for t in
                                    (self.input_ids, self.attention_mask, self.target_ids, self.target_mask)))


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def encode_target(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Tokens of `" " + target` without special tokens (no BOS inside the answer)."""
    ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"] if target.strip() else []
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return ids


def encode_answer_tokens(tokenizer: PreTrainedTokenizerBase, answer: str | None) -> list[int]:
    """An answer's tokens as the losses see them (`encode_target`); none for a missing answer."""
    return encode_target(tokenizer, answer) if answer and answer.strip() else []


def teacher_forced_batch(tokenizer: PreTrainedTokenizerBase, prompts: list[str], targets: list[str],
                         max_prompt_tokens: int = 256, max_target_tokens: int = 32) -> TeacherForcedBatch:
    """Tokenise prompt and target separately (so the boundary never merges) and left-pad."""
    rows, tgts = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"][-max_prompt_tokens:]
        t = encode_target(tokenizer, target)[:max_target_tokens]
        rows.append(p + t)
        tgts.append(t)
    input_ids, attention_mask = _left_pad(rows, tokenizer.pad_token_id)
    width = max(len(t) for t in tgts)
    target_ids = torch.zeros((len(tgts), width), dtype=torch.long)
    target_mask = torch.zeros((len(tgts), width), dtype=torch.bool)
    for i, t in enumerate(tgts):
        target_ids[i, width - len(t):] = torch.tensor(t)
        target_mask[i, width - len(t):] = True
    return TeacherForcedBatch(input_ids, attention_mask, target_ids, target_mask)


def answer_batch(tokenizer: PreTrainedTokenizerBase, answers: list[str | None],
                 max_tokens: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer tokens right-aligned like `TeacherForcedBatch.target_ids` `(B, T)` and their mask;
    a missing or empty answer is a row of no tokens."""
    rows = [encode_answer_tokens(tokenizer, a)[:max_tokens] for a in answers]
    width = max((len(r) for r in rows), default=0)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = True
    return ids, mask


def first_answer_tokens(ids: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` tokens of each right-aligned answer row, right-aligned again."""
    rows = [row[m][:n] for row, m in zip(ids, mask)]
    width = max((len(r) for r in rows), default=0)
    out_ids = torch.zeros((len(rows), width), dtype=ids.dtype)
    out_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if len(r):
            out_ids[i, width - len(r):] = r
            out_mask[i, width - len(r):] = True
    return out_ids, out_mask


def prompt_batch(tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                 max_prompt_tokens: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts; the last position of every row is its last prompt token."""
    rows = [tokenizer(p, add_special_tokens=True)["input_ids"][-max_prompt_tokens:] for p in prompts]
    return _left_pad(rows, tokenizer.pad_token_id)


def position_ids_for(attention_mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Positions that ignore left padding, so a padded row sees the same positions as alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + offset
