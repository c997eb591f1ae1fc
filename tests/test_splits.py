"""Tests for data.splits: edit-set choice and the out-of-scope training stream contract."""

from __future__ import annotations

import functools
import random

import pytest

from data import EditRecord, EditSplit, IrrelevantRecord, bundled_path, make_split, read_records, split_stats


def make_record(i: int, **changes: object) -> EditRecord:
    """A small synthetic record whose prompts are unique per index unless overridden."""
    fields: dict[str, object] = {
        "case_id": str(i),
        "dataset": "synthetic",
        "subject": f"Subject {i}",
        "prompt": f"Prompt {i} is",
        "target_new": f"New {i}",
        "target_true": f"True {i}",
        "rephrase_prompts": (f"Rephrase {i} is",),
        "loc_prompts": (f"Loc {i} a is", f"Loc {i} b is"),
        "loc_answers": (f"LocAns {i} a", f"LocAns {i} b"),
    }
    fields.update(changes)
    return EditRecord(**fields)  # type: ignore[arg-type]


def norm(text: str) -> str:
    return text.strip().casefold()


def eval_prompts(split: EditSplit) -> set[str]:
    """Every evaluation prompt of the edited records, normalized."""
    keys: set[str] = set()
    for rec in split.edits:
        keys |= {norm(rec.prompt), *map(norm, rec.rephrase_prompts), *map(norm, rec.loc_prompts)}
    return keys


RECORDS = [make_record(i) for i in range(50)]


@functools.cache
def counterfact() -> tuple[EditRecord, ...]:
    return tuple(read_records(bundled_path("counterfact/counterfact-edit.json")))


# --- edit set ------------------------------------------------------------------------------


def test_sizes_and_seed() -> None:
    split = make_split(RECORDS, 10, seed=3)
    assert len(split.edits) == 10 and split.seed == 3
    # 40 non-edited records x (1 prompt + 2 loc prompts), all distinct.
    assert len(split.out_of_scope) == 40 * 3


def test_deterministic_for_a_seed() -> None:
    assert make_split(RECORDS, 10, seed=7) == make_split(RECORDS, 10, seed=7)


def test_different_seeds_give_different_edit_sets() -> None:
    a = {r.case_id for r in make_split(RECORDS, 10, seed=0).edits}
    b = {r.case_id for r in make_split(RECORDS, 10, seed=1).edits}
    assert a != b


def test_random_order_is_seeded_sample() -> None:
    split = make_split(RECORDS, 5, seed=11)
    expected = [RECORDS[i] for i in random.Random(11).sample(range(len(RECORDS)), 5)]
    assert list(split.edits) == expected


def test_order_head_takes_file_order() -> None:
    split = make_split(RECORDS, 4, seed=99, order="head")
    assert [r.case_id for r in split.edits] == ["0", "1", "2", "3"]


def test_all_records_edited_leaves_no_out_of_scope() -> None:
    split = make_split(RECORDS, len(RECORDS))
    assert len(split.edits) == len(RECORDS) and split.out_of_scope == ()


@pytest.mark.parametrize("num_edits", [0, -1])
def test_non_positive_num_edits(num_edits: int) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        make_split(RECORDS, num_edits)


def test_too_many_edits() -> None:
    with pytest.raises(ValueError, match=r"num_edits=51 is larger than the 50 records available\."):
        make_split(RECORDS, 51)


@pytest.mark.parametrize(
    "kwargs",
    [{"order": "sorted"}, {"out_of_scope_sources": ("prompt", "answers")}, {"max_out_of_scope": -1}],
)
def test_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_split(RECORDS, 5, **kwargs)  # type: ignore[arg-type]


# --- out-of-scope stream -------------------------------------------------------------------


def test_out_of_scope_only_from_non_edited_records() -> None:
    split = make_split(RECORDS, 10, seed=2, out_of_scope_sources=("prompt", "loc", "rephrase"))
    edited = {r.case_id for r in split.edits}
    edited_texts = {p for r in split.edits for p in (r.prompt, *r.rephrase_prompts, *r.loc_prompts)}
    assert not edited_texts & {o.prompt for o in split.out_of_scope}
    # Every out-of-scope prompt is traceable to a non-edited record.
    owners = {p: r.case_id for r in RECORDS for p in (r.prompt, *r.rephrase_prompts, *r.loc_prompts)}
    assert all(owners[o.prompt] not in edited for o in split.out_of_scope)


def test_sources_give_expected_pairs() -> None:
    records = RECORDS[:3]
    split = make_split(records, 1, order="head", out_of_scope_sources=("prompt",))
    assert set(split.out_of_scope) == {IrrelevantRecord(f"Prompt {i} is", f"True {i}") for i in (1, 2)}
    split = make_split(records, 1, order="head", out_of_scope_sources=("loc",))
    assert IrrelevantRecord("Loc 1 b is", "LocAns 1 b") in split.out_of_scope and len(split.out_of_scope) == 4
    split = make_split(records, 1, order="head", out_of_scope_sources=("rephrase",))
    assert set(split.out_of_scope) == {IrrelevantRecord(f"Rephrase {i} is", f"True {i}") for i in (1, 2)}


def test_records_about_an_edited_subject_give_only_their_loc_prompts() -> None:
    # Record 1 asks about the edited subject in other words (ZsRE does this): a paraphrase in all but name.
    records = [make_record(0, subject="Sopwith Pup"), make_record(1, subject=" sopwith pup "), make_record(2)]
    split = make_split(records, 1, order="head", out_of_scope_sources=("prompt", "loc", "rephrase"))
    prompts = {o.prompt for o in split.out_of_scope}
    assert not prompts & {"Prompt 1 is", "Rephrase 1 is"}
    assert {"Loc 1 a is", "Loc 1 b is", "Prompt 2 is", "Rephrase 2 is"} <= prompts


def test_bundled_zsre_out_of_scope_never_asks_about_an_edited_subject() -> None:
    records = read_records(bundled_path("zsre/zsre_mend_eval_portability_gpt4.json"))
    split = make_split(records, 200, seed=0, out_of_scope_sources=("prompt",))
    subjects = {r.subject.casefold() for r in split.edits}
    about = {r.prompt: r.subject.casefold() for r in records}
    repeated = [r for r in records if r not in split.edits and r.subject.casefold() in subjects]
    assert len(repeated) > 20                 # the file does ask about the same subjects again
    assert not [o.prompt for o in split.out_of_scope if about[o.prompt] in subjects]


def test_prompt_source_keeps_missing_answer() -> None:
    records = [make_record(0), make_record(1, target_true=None)]
    split = make_split(records, 1, order="head", out_of_scope_sources=("prompt",))
    assert split.out_of_scope == (IrrelevantRecord("Prompt 1 is", None),)


def test_eval_prompts_never_leak_case_insensitive() -> None:
    # Non-edited records reuse the edit's prompt, rephrase and loc prompt with other case/spacing.
    edit = make_record(0)
    leaky = [
        make_record(1, prompt="  PROMPT 0 IS "),
        make_record(2, loc_prompts=("rephrase 0 is",), loc_answers=("x",)),
        make_record(3, rephrase_prompts=("Loc 0 b is",)),
        make_record(4, loc_prompts=("Loc 0 a is ", "Fine loc"), loc_answers=("y", "z")),
    ]
    split = make_split([edit, *leaky], 1, order="head", out_of_scope_sources=("prompt", "loc", "rephrase"))
    assert not {norm(o.prompt) for o in split.out_of_scope} & eval_prompts(split)
    assert IrrelevantRecord("Fine loc", "z") in split.out_of_scope


def test_out_of_scope_prompts_are_deduplicated() -> None:
    records = [make_record(0), make_record(1, loc_prompts=("Shared",), loc_answers=("a",))]
    records += [make_record(2, loc_prompts=("shared ",), loc_answers=("b",))]
    split = make_split(records, 1, order="head", out_of_scope_sources=("loc",))
    assert split.out_of_scope == (IrrelevantRecord("Shared", "a"),)


def test_out_of_scope_is_shuffled_and_truncated() -> None:
    full = make_split(RECORDS, 10, seed=5)
    ordered = [o.prompt for o in full.out_of_scope]
    assert ordered != sorted(ordered, key=lambda p: int(p.split()[1]))  # not in file order
    short = make_split(RECORDS, 10, seed=5, max_out_of_scope=7)
    assert short.out_of_scope == full.out_of_scope[:7]
    assert make_split(RECORDS, 10, seed=5, max_out_of_scope=0).out_of_scope == ()


def test_pool_records_feed_out_of_scope_only() -> None:
    pool = [make_record(100 + i) for i in range(5)] + [make_record(200, prompt="prompt 0 is")]
    split = make_split(RECORDS[:3], 1, order="head", out_of_scope_sources=("prompt",), pool=pool)
    assert {r.case_id for r in split.edits} == {"0"}
    prompts = {o.prompt for o in split.out_of_scope}
    assert {f"Prompt {100 + i} is" for i in range(5)} <= prompts
    assert "prompt 0 is" not in prompts  # pool records may not leak eval prompts either


def test_split_stats() -> None:
    split = make_split(RECORDS, 10, seed=0, max_out_of_scope=25)
    assert split_stats(split) == {
        "seed": 0,
        "num_edits": 10,
        "num_rephrase_prompts": 10,
        "num_loc_prompts": 20,
        "num_out_of_scope": 25,
        "num_out_of_scope_with_answer": 25,
        "num_subjects": 10,
    }


# --- on the bundled CounterFact data -------------------------------------------------------


def test_bundled_counterfact_split_contract() -> None:
    records = counterfact()
    split = make_split(records, 500, seed=0, out_of_scope_sources=("prompt", "loc", "rephrase"))
    assert len(split.edits) == 500 and len({r.case_id for r in split.edits}) == 500
    texts = [norm(o.prompt) for o in split.out_of_scope]
    assert len(texts) == len(set(texts))
    assert not set(texts) & eval_prompts(split)
    edited_ids = {r.case_id for r in split.edits}
    non_edited_prompts = {norm(r.prompt) for r in records if r.case_id not in edited_ids}
    assert not {norm(r.prompt) for r in split.edits} & non_edited_prompts
    assert make_split(records, 500, seed=0, out_of_scope_sources=("prompt", "loc", "rephrase")) == split
    assert {r.case_id for r in make_split(records, 500, seed=1).edits} != edited_ids


# --- paraphrase pairs (the bridge's paraphrase jitter) -------------------------------------


def test_paraphrase_pairs_come_from_non_edited_records_about_other_subjects() -> None:
    records = [make_record(0, subject="Sopwith Pup"), make_record(1, subject="sopwith pup"), make_record(2),
               make_record(3, rephrase_prompts=("Rephrase 0 is",)),     # its rephrase is an eval prompt
               make_record(4, rephrase_prompts=())]
    split = make_split(records, 1, order="head")
    assert set(split.paraphrase_pairs) == {("Prompt 2 is", "Rephrase 2 is")}


def test_paraphrase_pairs_never_hold_an_evaluation_prompt() -> None:
    records = read_records(bundled_path("zsre/zsre_mend_eval_portability_gpt4.json"))
    split = make_split(records, 200, seed=0)
    assert len(split.paraphrase_pairs) > 500
    texts = {norm(t) for pair in split.paraphrase_pairs for t in pair}
    assert not texts & eval_prompts(split)
    subjects = {r.subject.casefold() for r in split.edits}
    about = {r.prompt: r.subject.casefold() for r in records}
    assert not [q for q, _ in split.paraphrase_pairs if about[q] in subjects]
    assert make_split(records, 200, seed=0).paraphrase_pairs == split.paraphrase_pairs


def test_split_with_edits_adds_a_stream_from_each_other_dataset() -> None:
    """Multi-MindBridge over memories from two files: both files' non-edited records feed the
    out-of-scope stream, each capped on its own; no edit and no evaluation prompt gets in."""
    from data.splits import split_with_edits
    main = [make_record(i) for i in range(10)]
    other = [make_record(100 + i, dataset="other") for i in range(10)]
    edits = [main[0], other[0]]
    split = split_with_edits(main, edits, seed=3, max_out_of_scope=6, other_datasets=[other])
    texts = lambda records: {p for r in records for p in (r.prompt, *r.loc_prompts)}   # noqa: E731
    prompts = [o.prompt for o in split.out_of_scope]
    assert sum(p in texts(main) for p in prompts) == 6 and sum(p in texts(other) for p in prompts) == 6
    assert len(set(prompts)) == 12
    assert not {norm(p) for p in prompts} & eval_prompts(split)
    alone = split_with_edits(main, edits, seed=3, max_out_of_scope=6)
    assert len(alone.out_of_scope) == 6 and all(o.prompt in texts(main) for o in alone.out_of_scope)
