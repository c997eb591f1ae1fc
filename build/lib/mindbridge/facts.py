"""Facts as the editing methods see them (subject, prompt, target), the subject's last token, and
the model-written context prefixes MEMIT-style methods average keys over."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mindbridge.tokenization import prompt_batch

PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class Fact:
    """One edit: `prompt` contains `subject`; the model should answer `target`."""

    id: str
    subject: str
    prompt: str
    target: str

    @classmethod
    def from_record(cls, record: Any) -> "Fact":
        """From an `EditRecord` (or anything with subject / prompt / target_new / case_id)."""
        return cls(str(record.case_id), record.subject, record.prompt, record.target_new)


def facts_hash(facts: Sequence[Fact]) -> str:
    h = hashlib.sha256()
    for f in facts:
        h.update((json.dumps(dataclasses.asdict(f), sort_keys=True, ensure_ascii=False) + "\n").encode())
    return h.hexdigest()


def subject_last_token(tokenizer: PreTrainedTokenizerBase, text: str, subject: str,
                       start: int = 0) -> tuple[list[int], int, bool]:
    """Token ids of `text` (with special tokens), the index of the subject's last token, found?

    The subject is searched case-insensitively from character `start` (after a template's
    prefix); its last token is the last one whose character span overlaps the subject's. If the
    subject is not in the text, the last token stands in (and `found` is False).
    """
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    match = re.search(re.escape(subject.strip()), text[start:], re.IGNORECASE) if subject.strip() else None
    if match is None:
        return ids, len(ids) - 1, False
    lo, hi = start + match.start(), start + match.end()
    hits = [i for i, (a, b) in enumerate(offsets) if a < hi and b > lo]
    if not hits:
        return ids, len(ids) - 1, False
    return ids, max(hits), True


@torch.no_grad()
def generate_prefixes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, count: int = 5,
                      max_tokens: int = 10, seeds: Sequence[str] = PREFIX_SEEDS) -> list[str]:
    """`count` short texts the model writes after the seed words (greedy, ≤ `max_tokens` tokens).

    MEMIT's context templates: averaging keys over a few contexts makes them less specific to
    the exact edit prompt.
    """
    if count <= 0:
        return []
    if count > len(seeds):
        raise ValueError(f"num_prefixes={count}, but there are only {len(seeds)} seed words ({', '.join(seeds)}).")
    ids, mask = prompt_batch(tokenizer, list(seeds[:count]))
    new = max(1, max_tokens - ids.shape[1])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    prefixes = []
    for seed, row in zip(seeds[:count], out[:, ids.shape[1]:]):
        text = seed + tokenizer.decode(row, skip_special_tokens=True)
        prefixes.append(" ".join(text.replace("{", " ").replace("}", " ").split()))
    return prefixes


def context_templates(prefixes: Sequence[str]) -> list[str]:
    return ["{}"] + [f"{p}. {{}}" for p in prefixes]
