"""The one evaluator every method is scored with (EasyEdit-style teacher forcing).

Protocol (named in every result as `protocol`): tokenise `prompt + " " + target`, one forward
pass, and score the fraction of target tokens whose argmax prediction is right (`rel`, `gen`),
plus exact match (all target tokens right). `loc` is the token agreement between the edited and
the unedited model on `loc_prompt + " " + loc_answer` at the answer positions; `loc_correct`
is the other definition in the literature (agreement with the gold answer).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from mindbridge.lm import ScorableLM
from mindbridge.tokenization import teacher_forced_batch

PROTOCOL = "easyedit_teacher_forced_token_accuracy"


@dataclass(frozen=True)
class ScoringItem:
    record: int        # index of the edit record it belongs to
    kind: str          # "rel" | "gen" | "loc"
    prompt: str
    target: str


def scoring_items(records: Sequence) -> list[ScoringItem]:
    """Every (prompt, target) pair the protocol scores, tagged with its record and metric."""
    items = []
    for i, r in enumerate(records):
        items.append(ScoringItem(i, "rel", r.prompt, r.target_new))
        items.extend(ScoringItem(i, "gen", p, r.target_new) for p in r.rephrase_prompts)
        items.extend(ScoringItem(i, "loc", p, a) for p, a in zip(r.loc_prompts, r.loc_answers))
    return items


def token_predictions(lm: ScorableLM, items: Sequence[ScoringItem], batch_size: int,
                      progress: Callable[[int], None] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Argmax predictions at the target positions and the target tokens, per item."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(items)  # type: ignore[list-item]
    # Batches of similar length waste less padding.
    order = sorted(range(len(items)), key=lambda k: len(items[k].prompt) + len(items[k].target))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = teacher_forced_batch(lm.tokenizer, [items[k].prompt for k in idx], [items[k].target for k in idx])
        with torch.no_grad():
            logits = lm.logits([items[k].prompt for k in idx], batch.input_ids, batch.attention_mask, batch.keep,
                               batch.target_mask.sum(1))
        pred = logits[:, :-1].argmax(-1)
        for row, k in enumerate(idx):
            m = batch.target_mask[row]
            out[k] = (pred[row][m].cpu(), batch.target_ids[row][m])
        if progress is not None:
            progress(len(idx))
    return out


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else float("nan")


def _per_record(items: Sequence[ScoringItem], scores: Sequence[float], kind: str) -> dict[int, float]:
    """Average the item scores of one kind within each record (records weigh equally)."""
    acc: dict[int, list[float]] = defaultdict(list)
    for it, s in zip(items, scores):
        if it.kind == kind:
            acc[it.record].append(s)
    return {r: sum(v) / len(v) for r, v in acc.items()}


def evaluate_edits(edited: ScorableLM, base: ScorableLM, records: Sequence, batch_size: int = 32,
                   progress: Callable[[int], None] | None = None) -> dict[str, float | str]:
    """Score `edited` against `base` on the records' edit, paraphrase and locality prompts."""
    items = scoring_items(records)
    post = token_predictions(edited, items, batch_size, progress)
    pre = token_predictions(base, items, batch_size, progress)

    def acc(pred, gold):
        return (pred == gold).float().mean().item()

    def em(pred, gold):
        return float(bool((pred == gold).all()))

    metrics: dict[str, float | str] = {}
    for kind in ("rel", "gen"):
        for prefix, preds in (("", post), ("pre_", pre)):
            tok = _per_record(items, [acc(p, g) for p, g in preds], kind)
            exact = _per_record(items, [em(p, g) for p, g in preds], kind)
            metrics[f"{prefix}{kind}"] = _mean(tok.values())
            metrics[f"{prefix}{kind}_em"] = _mean(exact.values())
    agree = [acc(p, b) for (p, _), (b, _) in zip(post, pre)]
    agree_em = [em(p, b) for (p, _), (b, _) in zip(post, pre)]
    metrics["loc"] = _mean(_per_record(items, agree, "loc").values())
    metrics["loc_em"] = _mean(_per_record(items, agree_em, "loc").values())
    metrics["loc_correct"] = _mean(_per_record(items, [acc(p, g) for p, g in post], "loc").values())
    metrics["pre_loc_correct"] = _mean(_per_record(items, [acc(p, g) for p, g in pre], "loc").values())
    metrics["avg"] = (metrics["rel"] + metrics["gen"] + metrics["loc"]) / 3
    metrics["num_scored_prompts"] = len(items)
    metrics["protocol"] = PROTOCOL
    return metrics
