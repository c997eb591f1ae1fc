"""The one evaluator every method is scored with (EasyEdit-style teacher forcing).

Protocol (named in every result as `protocol`): tokenise `prompt + " " + target`, one forward
pass, and score the fraction of target tokens whose argmax prediction is right (`rel`, `gen`),
plus exact match (all target tokens right). `loc` is the token agreement between the edited and
the unedited model on `loc_prompt + " " + loc_answer` at the answer positions; `loc_correct`
is the other definition in the literature (agreement with the gold answer).

CounterFact records are also scored with the probability comparison of ROME/MEMIT/NeuralDB
(`rel_prob`, `gen_prob`, `loc_prob`; NeuralDB Eqs. 13-15): per prompt, is the per-token mean NLL
of the new object below that of the true one (for locality: is the true answer still preferred
over the new object)? This asks less than token accuracy: the new object need only beat the old.
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


@dataclass(frozen=True)
class TargetScore:
    pred: torch.Tensor   # argmax token at each target position
    gold: torch.Tensor   # the target's tokens
    nll: float           # mean negative log-likelihood of the target's tokens


def score_targets(lm: ScorableLM, items: Sequence[ScoringItem], batch_size: int,
                  progress: Callable[[int], None] | None = None) -> list[TargetScore]:
    """Teacher-forced argmax and mean target NLL of every item, one forward pass per batch."""
    out: list[TargetScore] = [None] * len(items)  # type: ignore[list-item]
    # Batches of similar length waste less padding.
    order = sorted(range(len(items)), key=lambda k: len(items[k].prompt) + len(items[k].target))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = teacher_forced_batch(lm.tokenizer, [items[k].prompt for k in idx], [items[k].target for k in idx])
        with torch.no_grad():
            logits = lm.logits([items[k].prompt for k in idx], batch.input_ids, batch.attention_mask, batch.keep,
                               batch.target_mask.sum(1))[:, :-1]
        # Only the target positions, all rows at once (a log-softmax over the whole window would
        # not fit for 262k-word vocabularies); one device-to-host copy per batch.
        mask = batch.target_mask
        at = logits[mask].float()
        gold = batch.target_ids[mask]
        token_nll = at.logsumexp(-1) - at.gather(-1, gold.to(at.device)[:, None]).squeeze(-1)
        counts = mask.sum(1).tolist()
        preds = at.argmax(-1).cpu().split(counts)
        golds = gold.split(counts)
        nlls = torch.stack([t.mean() for t in token_nll.split(counts)]).tolist()
        for row, k in enumerate(idx):
            out[k] = TargetScore(preds[row], golds[row], nlls[row])
        if progress is not None:
            progress(len(idx))
    return out


def token_predictions(lm: ScorableLM, items: Sequence[ScoringItem], batch_size: int,
                      progress: Callable[[int], None] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Argmax predictions at the target positions and the target tokens, per item."""
    return [(s.pred, s.gold) for s in score_targets(lm, items, batch_size, progress)]


def is_counterfactual(records: Sequence) -> bool:
    """CounterFact records: each has a true object the new one must beat (probability comparison)."""
    return bool(records) and all(str(r.dataset).startswith("counterfact") and r.target_true for r in records)


def rival_items(records: Sequence, items: Sequence[ScoringItem]) -> list[ScoringItem]:
    """For each item, the same prompt with the answer it is compared against: the true object for
    edit and paraphrase prompts, the new object for locality prompts."""
    return [ScoringItem(it.record, it.kind, it.prompt,
                        records[it.record].target_new if it.kind == "loc" else records[it.record].target_true)
            for it in items]


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
    post_scores = score_targets(edited, items, batch_size, progress)
    pre_scores = score_targets(base, items, batch_size, progress)
    post = [(s.pred, s.gold) for s in post_scores]
    pre = [(s.pred, s.gold) for s in pre_scores]

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
    if is_counterfactual(records):
        rivals = rival_items(records, items)
        for prefix, lm, scores in (("", edited, post_scores), ("pre_", base, pre_scores)):
            rival = score_targets(lm, rivals, batch_size, progress)
            # rel/gen: the new object is more likely than the true one; loc: the true answer still
            # wins over the new object (NeuralDB's Specificity).
            wins = [float(s.nll < r.nll) for s, r in zip(scores, rival)]
            for kind in ("rel", "gen", "loc"):
                metrics[f"{prefix}{kind}_prob"] = _mean(_per_record(items, wins, kind).values())
    metrics["num_scored_prompts"] = len(items)
    metrics["protocol"] = PROTOCOL
    return metrics
