"""Rewordings borrowed from non-edited records (data/rewordings.py, the split's rewording_templates)."""
from __future__ import annotations

from data.readers import bundled_path, read_records
from data.rewordings import RewordingBank
from data.splits import make_split, subject_template
from tests.test_splits import eval_prompts, make_record, norm


def _record(i: int, subject: str, prompt: str, rephrase: str):
    return make_record(i, subject=subject, prompt=prompt.format(subject), rephrase_prompts=(rephrase.format(subject),))


def test_subject_template_needs_exactly_one_occurrence():
    assert subject_template("The mother tongue of Anna is", "Anna") == "The mother tongue of {} is"
    assert subject_template("Anna and Anna", "Anna") is None
    assert subject_template("Nobody here", "Anna") is None
    assert subject_template("A {brace} for Anna", "Anna") is None


def test_rewording_templates_skip_edited_subjects_and_evaluation_prompts():
    edit = _record(0, "Anna", "The mother tongue of {} is", "{} grew up speaking")
    records = [edit,
               _record(1, "Boris", "The mother tongue of {} is", "{} was raised speaking"),
               _record(2, "anna", "The mother tongue of {} is", "{} speaks"),            # an edited subject
               _record(3, "Carl", "The mother tongue of {} is", "{} grew up speaking"),  # a template, allowed
               _record(4, "Dora", "{} grew up speaking", "Dora's first language is")]   # another template of the relation
    split = make_split(records, 1, order="head")
    assert split.edits == (edit,)
    assert set(split.rewording_templates) == {("The mother tongue of {} is", "{} was raised speaking"),
                                              ("The mother tongue of {} is", "{} grew up speaking"),
                                              ("{} grew up speaking", "{}'s first language is")}


def test_bank_fills_the_nearest_templates_and_never_returns_an_evaluation_prompt():
    edit = _record(0, "Anna", "The mother tongue of {} is", "{} grew up speaking")
    templates = [("The mother tongue of {} is", "{} grew up speaking"),      # = the edit's held-out paraphrase
                 ("The mother tongue of {} is", "{} was raised speaking"),
                 ("The mother tongue of {} is", "The mother tongue of {} is"),
                 ("The native tongue of {} is", "{} natively speaks"),
                 ("The capital of {} is", "{}'s capital city is")]
    bank = RewordingBank(templates, [edit])
    got = bank.for_prompt("Anna", edit.prompt, count=5, min_similarity=0.3)
    # The edit's own template first, then the similar one; the capital (nothing in common) never.
    assert got == ["Anna was raised speaking", "Anna natively speaks"]
    assert bank.for_prompt("Anna", edit.prompt, count=1, min_similarity=0.3) == ["Anna was raised speaking"]
    assert bank.for_prompt("Anna", edit.prompt, count=5, min_similarity=1.01) == []
    assert bank.for_prompt("Anna", edit.prompt, count=0) == []
    assert bank.for_prompt("Zed", "A prompt without the subject", count=3) == []
    assert RewordingBank([]).for_prompt("Anna", edit.prompt, count=3) == []


def test_bundled_rewordings_hold_no_evaluation_prompt_and_are_about_the_edit_subject():
    records = read_records(bundled_path("zsre/zsre_mend_eval_portability_gpt4.json"))
    split = make_split(records, 200, seed=3)
    bank = RewordingBank(split.rewording_templates, split.edits)
    forbidden = eval_prompts(split)
    chosen = {r.case_id: bank.for_prompt(r.subject, r.prompt, 3, seed="3") for r in split.edits}
    assert sum(len(v) for v in chosen.values()) > 300
    for rec in split.edits:
        for text in chosen[rec.case_id]:
            assert rec.subject in text and norm(text) not in forbidden
    assert chosen == {r.case_id: bank.for_prompt(r.subject, r.prompt, 3, seed="3") for r in split.edits}
