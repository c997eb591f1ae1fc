"""Choose the edit set and the training-time out-of-scope stream from a list of records.

Contract: out-of-scope records come only from records that are NOT edited, and no prompt used to
evaluate an edit (edit prompt, rephrase, loc prompt) ever appears among them. A non-edited record
about an edited subject contributes no question of its own (its loc prompts are still used): ZsRE
asks the same fact several times in other words, so such a question is often a paraphrase of an
edit, which the methods would otherwise be trained to leave unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from data.records import EditRecord, IrrelevantRecord

OUT_OF_SCOPE_SOURCES: tuple[str, ...] = ("prompt", "loc", "rephrase")
ORDERS: tuple[str, ...] = ("random", "head")


@dataclass(frozen=True)
class EditSplit:
    """The edited records and the out-of-scope prompts a method may train on."""

    edits: tuple[EditRecord, ...]  # the records that are edited and evaluated
    out_of_scope: tuple[IrrelevantRecord, ...]  # training-time out-of-scope prompts
    seed: int
    # (question, rephrase) of non-edited records about non-edited subjects: how rewording moves
    # a prompt, learnt from facts that are never evaluated (MindBridge's bridge jitter).
    paraphrase_pairs: tuple[tuple[str, str], ...] = ()
    # (prompt template, rephrase template), "{}" where the subject was, of the same records: how a
    # relation is worded otherwise, for methods that fill in an edit's own subject (NeuralDB).
    rewording_templates: tuple[tuple[str, str], ...] = ()


def _normalize(text: str) -> str:
    """Key for prompt-text comparison: case-insensitive, surrounding whitespace ignored."""
    return text.strip().casefold()


def _check_arguments(
    available: int, num_edits: int, sources: Sequence[str], max_out_of_scope: int | None, order: str
) -> None:
    """Reject bad split arguments with one clear sentence each."""
    if isinstance(num_edits, bool) or not isinstance(num_edits, int) or num_edits <= 0:
        raise ValueError(f"num_edits must be a positive integer (got {num_edits!r}).")
    if num_edits > available:
        raise ValueError(f"num_edits={num_edits} is larger than the {available} records available.")
    unknown = sorted(set(sources) - set(OUT_OF_SCOPE_SOURCES))
    if unknown:
        raise ValueError(f"Unknown out_of_scope_sources {unknown}; choose from {list(OUT_OF_SCOPE_SOURCES)}.")
    if max_out_of_scope is not None and (isinstance(max_out_of_scope, bool) or max_out_of_scope < 0):
        raise ValueError(f"max_out_of_scope must be None or a non-negative integer (got {max_out_of_scope!r}).")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {list(ORDERS)} (got {order!r}).")


def _choose_edit_indices(count: int, num_edits: int, seed: int, order: str) -> list[int]:
    """Indices of the edited records: a seeded random sample (in sampled order) or the file head."""
    if order == "head":
        return list(range(num_edits))
    return random.Random(seed).sample(range(count), num_edits)


def _eval_prompt_keys(edits: Iterable[EditRecord]) -> set[str]:
    """Every prompt text used to evaluate the edits, normalized."""
    keys: set[str] = set()
    for rec in edits:
        keys.add(_normalize(rec.prompt))
        keys.update(_normalize(p) for p in rec.rephrase_prompts)
        keys.update(_normalize(p) for p in rec.loc_prompts)
    return keys


def _candidates(rec: EditRecord, sources: Sequence[str]) -> list[IrrelevantRecord]:
    """Out-of-scope pairs one non-edited record contributes, in `sources` order."""
    pairs: list[IrrelevantRecord] = []
    for source in sources:
        if source == "prompt":
            pairs.append(IrrelevantRecord(rec.prompt, rec.target_true))
        elif source == "loc":
            pairs.extend(IrrelevantRecord(p, a) for p, a in zip(rec.loc_prompts, rec.loc_answers))
        elif source == "rephrase":
            pairs.extend(IrrelevantRecord(p, rec.target_true) for p in rec.rephrase_prompts)
    return pairs


def _out_of_scope(
    non_edited: Iterable[EditRecord], sources: Sequence[str], forbidden: set[str],
    edited_subjects: set[str] = frozenset(),
) -> list[IrrelevantRecord]:
    """Candidates without evaluation prompts and without repeated prompt texts (first one kept);
    records about an edited subject contribute only their locality prompts."""
    seen = set(forbidden)
    kept: list[IrrelevantRecord] = []
    for rec in non_edited:
        own = [x for x in sources if x == "loc"] if _normalize(rec.subject) in edited_subjects else sources
        for item in _candidates(rec, own):
            key = _normalize(item.prompt)
            if key not in seen:
                seen.add(key)
                kept.append(item)
    return kept


def _paraphrase_pairs(non_edited: Iterable[EditRecord], forbidden: set[str],
                      edited_subjects: set[str]) -> list[tuple[str, str]]:
    """(prompt, rephrase) pairs of non-edited records: none about an edited subject, none with an
    evaluation prompt on either side, each prompt once."""
    seen = set(forbidden)
    pairs: list[tuple[str, str]] = []
    for rec in non_edited:
        if _normalize(rec.subject) in edited_subjects or _normalize(rec.prompt) in seen:
            continue
        for rephrase in rec.rephrase_prompts:
            if _normalize(rephrase) not in seen and _normalize(rephrase) != _normalize(rec.prompt):
                seen.update((_normalize(rec.prompt), _normalize(rephrase)))
                pairs.append((rec.prompt, rephrase))
                break
    return pairs


def subject_template(text: str, subject: str) -> str | None:
    """`text` with its one occurrence of `subject` replaced by "{}" (None: absent, repeated, or braces)."""
    if not subject or "{" in text or "}" in text or text.count(subject) != 1:
        return None
    return text.replace(subject, "{}")


def _rewording_templates(non_edited: Iterable[EditRecord], forbidden: set[str],
                         edited_subjects: set[str]) -> list[tuple[str, str]]:
    """(prompt template, rephrase template) of non-edited records (none about an edited subject,
    no evaluation prompt on either side), each pair once, in file order."""
    pairs: dict[tuple[str, str], None] = {}
    for rec in non_edited:
        if _normalize(rec.subject) in edited_subjects or _normalize(rec.prompt) in forbidden:
            continue
        prompt = subject_template(rec.prompt, rec.subject)
        for rephrase in rec.rephrase_prompts:
            reworded = subject_template(rephrase, rec.subject)
            if prompt and reworded and reworded != prompt and _normalize(rephrase) not in forbidden:
                pairs[(prompt, reworded)] = None
    return list(pairs)


def make_split(
    records: Sequence[EditRecord],
    num_edits: int,
    seed: int = 0,
    out_of_scope_sources: Sequence[str] = ("prompt", "loc"),
    max_out_of_scope: int | None = None,
    order: str = "random",
    *,
    pool: Sequence[EditRecord] = (),
) -> EditSplit:
    """Pick ``num_edits`` edits from ``records`` and build the out-of-scope stream from the rest.

    ``order="random"``: a ``random.Random(seed)`` sample, kept in sampled order; ``order="head"``:
    the first ``num_edits`` records in file order. Out-of-scope pairs come from the non-edited
    records plus ``pool`` (records that are never edited, e.g. ``counterfact-train.json``), using
    ``out_of_scope_sources``: "prompt" -> (prompt, target_true), "loc" -> each (loc prompt, loc
    answer), "rephrase" -> (rephrase, target_true). Pairs whose prompt text (stripped,
    case-insensitive) equals any edit, rephrase or loc prompt of an edit are removed; repeated
    prompt texts are kept once. The result is shuffled with the seed and cut to
    ``max_out_of_scope``. The same arguments always give the same split.
    """
    _check_arguments(len(records), num_edits, out_of_scope_sources, max_out_of_scope, order)
    edit_indices = _choose_edit_indices(len(records), num_edits, seed, order)
    chosen = set(edit_indices)
    non_edited = [rec for i, rec in enumerate(records) if i not in chosen] + list(pool)
    return _split(tuple(records[i] for i in edit_indices), non_edited, seed, out_of_scope_sources,
                  max_out_of_scope)


def split_with_edits(
    records: Sequence[EditRecord],
    edits: Sequence[EditRecord],
    seed: int = 0,
    out_of_scope_sources: Sequence[str] = ("prompt", "loc"),
    max_out_of_scope: int | None = None,
    *,
    pool: Sequence[EditRecord] = (),
    other_datasets: Sequence[Sequence[EditRecord]] = (),
) -> EditSplit:
    """A split whose edit set is given (e.g. the union of several memories' facts).

    The out-of-scope stream is built as in `make_split`, from the records (and `pool`) that
    are not among `edits`, minus every evaluation prompt of the edits. Each of
    `other_datasets` (the records of the other files the edits were drawn from) adds a stream
    of its own, capped the same way, so edits from every file meet out-of-scope prompts like
    their own neighbours.
    """
    if not edits:
        raise ValueError("split_with_edits needs at least one edit.")
    _check_arguments(len(edits), len(edits), out_of_scope_sources, max_out_of_scope, "random")
    edited = set(edits)
    groups = [list(records) + list(pool), *(list(g) for g in other_datasets)]
    parts = [_split(tuple(edits), [rec for rec in group if rec not in edited], seed, out_of_scope_sources,
                    max_out_of_scope) for group in groups]
    if len(parts) == 1:
        return parts[0]
    out_of_scope = list(dict.fromkeys(o for part in parts for o in part.out_of_scope))
    pairs = list(dict.fromkeys(p for part in parts for p in part.paraphrase_pairs))
    rewordings = tuple(dict.fromkeys(t for part in parts for t in part.rewording_templates))
    random.Random(f"out_of_scope:{seed}").shuffle(out_of_scope)
    random.Random(f"paraphrase_pairs:{seed}").shuffle(pairs)
    return EditSplit(edits=tuple(edits), out_of_scope=tuple(out_of_scope), seed=seed,
                     paraphrase_pairs=tuple(pairs), rewording_templates=rewordings)


def _split(edits: tuple[EditRecord, ...], non_edited: Sequence[EditRecord], seed: int,
           sources: Sequence[str], max_out_of_scope: int | None) -> EditSplit:
    forbidden, subjects = _eval_prompt_keys(edits), {_normalize(rec.subject) for rec in edits}
    out_of_scope = _out_of_scope(non_edited, sources, forbidden, subjects)
    pairs = _paraphrase_pairs(non_edited, forbidden, subjects)
    # A separate, string-seeded generator: reproducible across runs and independent of the edit sample.
    random.Random(f"out_of_scope:{seed}").shuffle(out_of_scope)
    random.Random(f"paraphrase_pairs:{seed}").shuffle(pairs)
    if max_out_of_scope is not None:
        out_of_scope, pairs = out_of_scope[:max_out_of_scope], pairs[:max_out_of_scope]
    return EditSplit(edits=edits, out_of_scope=tuple(out_of_scope), seed=seed, paraphrase_pairs=tuple(pairs),
                     rewording_templates=tuple(_rewording_templates(non_edited, forbidden, subjects)))


def split_stats(split: EditSplit) -> dict[str, int]:
    """Counts describing a split, for logging and run metadata."""
    return {
        "seed": split.seed,
        "num_edits": len(split.edits),
        "num_rephrase_prompts": sum(len(r.rephrase_prompts) for r in split.edits),
        "num_loc_prompts": sum(len(r.loc_prompts) for r in split.edits),
        "num_out_of_scope": len(split.out_of_scope),
        "num_out_of_scope_with_answer": sum(1 for r in split.out_of_scope if r.answer is not None),
        "num_subjects": len({r.subject for r in split.edits}),
    }
