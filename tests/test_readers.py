"""Tests for data.readers and data.records: bundled files, format detection, validation errors."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from data import (
    BUNDLED_DEFAULTS,
    BUNDLED_DIR,
    DataFileNotFoundError,
    DataFormatError,
    EditRecord,
    IrrelevantRecord,
    bundled_path,
    content_hash,
    detect_format,
    read_records,
)

# --- minimal valid records, one per format -------------------------------------------------

ZSRE: dict[str, Any] = {
    "subject": "Foo Bar",
    "src": "Who founded Foo Bar?",
    "pred": "X",
    "rephrase": "Foo Bar was founded by whom?",
    "alt": "Alice",
    "answers": ["Bob"],
    "loc": "nq question: who wrote hamlet",
    "loc_ans": "Shakespeare",
    "cond": "ignored",
}
KNOWEDIT: dict[str, Any] = {
    "subject": "Foo Bar",
    "prompt": "Which family does Foo Bar belong to?",
    "target_new": "Noctuidae",
    "ground_truth": ["Aspidoceratidae"],
    "rephrase_prompt": "What family is Foo Bar?",
    "locality": {
        "Relation_Specificity": [{"prompt": "The rank of Foo Bar is", "ground_truth": ["genus"]}],
        "Forgetfulness": [{"prompt": "Foo Bar is a", "ground_truth": "moth"}],
    },
}
CF_EASY: dict[str, Any] = {
    "case_id": 7,
    "prompt": "The mother tongue of Foo Bar is",
    "target_new": "English",
    "subject": "Foo Bar",
    "ground_truth": "French",
    "rephrase_prompt": "Foo Bar speaks the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}
CF_ROME: dict[str, Any] = {
    "case_id": 4482,
    "pararel_idx": 1,
    "requested_rewrite": {
        "prompt": "{} originates from",
        "relation_id": "P19",
        "target_new": {"str": "Philadelphia", "id": "Q1"},
        "target_true": {"str": "London", "id": "Q2"},
        "subject": "Spike Hughes",
    },
    "paraphrase_prompts": ["Spike Hughes is native to", "Spike Hughes was born in"],
    "neighborhood_prompts": ["Max Mosley originates from", "Lita Ford was native to"],
    "attribute_prompts": ["Otis Rush was native to"],
    "generation_prompts": ["Spike Hughes currently lives in"],
}
BASES = {"zsre_mend": ZSRE, "knowedit": KNOWEDIT, "counterfact_easyedit": CF_EASY, "counterfact_rome": CF_ROME}


def record(fmt: str, **changes: Any) -> dict[str, Any]:
    """A deep copy of the base record of `fmt` with top-level keys changed (value None deletes)."""
    rec = copy.deepcopy(BASES[fmt])
    for key, value in changes.items():
        if value is None:
            rec.pop(key, None)
        else:
            rec[key] = value
    return rec


def write_json(tmp_path: Path, data: Any, name: str = "edits.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def read_error(path: Path, **kwargs: Any) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        read_records(path, **kwargs)
    return info.value


def assert_names(err: DataFormatError, path: Path, index: int | None, field: str | None) -> None:
    """The error message is one sentence naming file, record index and field."""
    msg = str(err)
    assert path.name in msg
    assert (err.index, err.field) == (index, field)
    assert ("the file" in msg) if index is None else (f"record {index}" in msg)
    if field is not None:
        assert f"'{field}'" in msg
    assert msg.endswith(".") and "\n" not in msg


# --- bundled files -------------------------------------------------------------------------

BUNDLED = [
    # relpath, raw count, count after duplicate-prompt removal, format, dataset
    ("zsre/zsre_mend_eval_portability_gpt4.json", 1037, 1037, "zsre_mend", "zsre"),
    ("zsre/knowedit_ZsRE-test-all.json", 1304, 1286, "knowedit", "zsre"),
    ("counterfact/counterfact-edit.json", 10000, 9917, "counterfact_easyedit", "counterfact"),
    ("counterfact/counterfact_portability_gpt4.json", 1031, 1031, "counterfact_rome", "counterfact"),
]


@pytest.mark.parametrize(("relpath", "raw", "deduped", "fmt", "dataset"), BUNDLED)
def test_bundled_counts(relpath: str, raw: int, deduped: int, fmt: str, dataset: str) -> None:
    path = bundled_path(relpath)
    assert len(read_records(path, dedupe=False)) == raw
    records = read_records(path)
    assert len(records) == deduped
    assert all(r.dataset == dataset for r in records)
    assert all(len(r.loc_prompts) == len(r.loc_answers) for r in records)
    assert detect_format(json.loads(path.read_text(encoding="utf-8"))[0]) == fmt


def test_bundled_zsre_first_record() -> None:
    rec = read_records(bundled_path("zsre/zsre_mend_eval_portability_gpt4.json"))[0]
    assert rec.case_id == "0"
    assert rec.subject == "IAAF Combined Events Challenge"
    assert rec.prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert (rec.target_new, rec.target_true) == ("2006", "1998")
    assert rec.rephrase_prompts == ("When was the IAAF Combined Events Challenge launched?",)
    # The NQ prefix is kept: the evaluator scores `loc + " " + loc_ans`.
    assert rec.loc_prompts == ("nq question: what is the name of the last episode of spongebob",)
    assert rec.loc_answers == ("The String",)


def test_bundled_knowedit_first_record() -> None:
    rec = read_records(bundled_path("zsre/knowedit_ZsRE-test-all.json"))[0]
    assert (rec.target_new, rec.target_true) == ("Noctuidae", "Aspidoceratidae")
    assert rec.loc_prompts == ("The taxon rank of Epaspidoceras is", "Epaspidoceras taxon rank")
    assert rec.loc_answers == ("genus", "genus")


def test_bundled_counterfact_files() -> None:
    edit = read_records(bundled_path(BUNDLED_DEFAULTS["counterfact"]))[0]
    assert (edit.case_id, edit.subject, edit.target_new, edit.target_true) == (
        "0",
        "Danielle Darrieux",
        "English",
        "French",
    )
    assert edit.loc_prompts == ("Michel Rocard is a native speaker of",)
    pool = read_records(bundled_path(BUNDLED_DEFAULTS["counterfact_pool"]))
    assert len(pool) == 9923


def test_bundled_counterfact_rome_first_record() -> None:
    rec = read_records(bundled_path("counterfact/counterfact_portability_gpt4.json"))[0]
    assert rec.case_id == "4482"
    assert rec.prompt == "Spike Hughes originates from"
    assert rec.prompt_template == "{} originates from"
    assert (rec.relation_id, rec.target_new, rec.target_true) == ("P19", "Philadelphia", "London")
    assert len(rec.rephrase_prompts) == 2
    assert len(rec.loc_prompts) == 10 and rec.loc_answers == ("London",) * 10
    assert len(rec.attribute_prompts) == 10 and len(rec.generation_prompts) == 10


def test_bundled_counterfact_rome_has_the_flat_facts_with_real_paraphrases() -> None:
    """`data=counterfact_rome`: the same facts as the flat file, but the flat file's one "rephrase"
    is mostly one of CounterFact's generation prompts, not a paraphrase (docs/evaluation.md, data rules)."""
    rome = read_records(bundled_path(BUNDLED_DEFAULTS["counterfact_rome"]), "counterfact_rome", dedupe=False)
    flat = {r.case_id: r for r in read_records(bundled_path(BUNDLED_DEFAULTS["counterfact"]), dedupe=False)}
    assert len(rome) == 1031 and all(r.case_id in flat for r in rome)
    assert all(flat[r.case_id].target_new == r.target_new for r in rome)
    flat_rephrase = [flat[r.case_id].rephrase_prompts[0] for r in rome]
    assert sum(p in r.generation_prompts for p, r in zip(flat_rephrase, rome)) == 858
    assert sum(p in r.rephrase_prompts for p, r in zip(flat_rephrase, rome)) == 173
    pool = read_records(bundled_path(BUNDLED_DEFAULTS["counterfact_rome_pool"]), dedupe=False)
    assert not {r.case_id for r in rome} & {r.case_id for r in pool}


def test_bundled_defaults_exist() -> None:
    for relpath in BUNDLED_DEFAULTS.values():
        assert bundled_path(relpath).is_file()
    assert (BUNDLED_DIR / "PROVENANCE.md").is_file()


def test_bundled_path_rejects_escape() -> None:
    with pytest.raises(ValueError, match="outside"):
        bundled_path("../readers.py")


def test_import_is_light() -> None:
    code = "import sys, data; assert 'torch' not in sys.modules and 'lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --- format detection and mapping ----------------------------------------------------------


@pytest.mark.parametrize("fmt", list(BASES))
def test_detect_format(fmt: str) -> None:
    assert detect_format(BASES[fmt]) == fmt


def test_detect_format_unknown_names_keys() -> None:
    with pytest.raises(DataFormatError, match="keys seen: answer, question"):
        detect_format({"question": "q", "answer": "a"})


def test_unknown_format_file_names_keys(tmp_path: Path) -> None:
    path = write_json(tmp_path, [{"question": "q"}])
    err = read_error(path)
    assert_names(err, path, 0, None)
    assert "question" in str(err)


def test_unknown_fmt_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown data format"):
        read_records(write_json(tmp_path, [ZSRE]), fmt="mend")


def test_forced_format_validates(tmp_path: Path) -> None:
    path = write_json(tmp_path, [ZSRE])
    assert_names(read_error(path, fmt="knowedit"), path, 0, "prompt")


def test_mapping_zsre(tmp_path: Path) -> None:
    (rec,) = read_records(write_json(tmp_path, [ZSRE]))
    assert rec == EditRecord(
        case_id="0",
        dataset="zsre",
        subject="Foo Bar",
        prompt="Who founded Foo Bar?",
        target_new="Alice",
        target_true="Bob",
        rephrase_prompts=("Foo Bar was founded by whom?",),
        loc_prompts=("nq question: who wrote hamlet",),
        loc_answers=("Shakespeare",),
    )


def test_mapping_knowedit_flattens_all_locality_kinds(tmp_path: Path) -> None:
    (rec,) = read_records(write_json(tmp_path, [KNOWEDIT]))
    assert rec.loc_prompts == ("The rank of Foo Bar is", "Foo Bar is a")
    assert rec.loc_answers == ("genus", "moth")
    assert rec.target_true == "Aspidoceratidae" and rec.dataset == "zsre"


def test_knowedit_empty_locality_is_allowed(tmp_path: Path) -> None:
    (rec,) = read_records(write_json(tmp_path, [record("knowedit", locality={})]))
    assert rec.loc_prompts == () and rec.loc_answers == ()


def test_mapping_counterfact_easyedit(tmp_path: Path) -> None:
    (rec,) = read_records(write_json(tmp_path, [CF_EASY]))
    assert (rec.case_id, rec.dataset, rec.target_true) == ("7", "counterfact", "French")
    assert rec.rephrase_prompts == ("Foo Bar speaks the language of",)
    assert rec.loc_prompts == ("Michel Rocard is a native speaker of",) and rec.loc_answers == ("French",)


def test_mapping_counterfact_rome(tmp_path: Path) -> None:
    (rec,) = read_records(write_json(tmp_path, [CF_ROME]))
    assert rec.prompt == "Spike Hughes originates from"
    assert rec.loc_prompts == ("Max Mosley originates from", "Lita Ford was native to")
    assert rec.loc_answers == ("London", "London")
    assert rec.attribute_prompts == ("Otis Rush was native to",)


def test_dataset_name_override_and_case_id_fallback(tmp_path: Path) -> None:
    recs = read_records(write_json(tmp_path, [record("counterfact_easyedit", case_id=None)]), dataset="mycf")
    assert (recs[0].dataset, recs[0].case_id) == ("mycf", "0")


def test_strings_are_stripped(tmp_path: Path) -> None:
    padded = record("zsre_mend", src="  Who?\n", alt=" Alice ", loc=" nq question: x ")
    (rec,) = read_records(write_json(tmp_path, [padded]))
    assert (rec.prompt, rec.target_new, rec.loc_prompts) == ("Who?", "Alice", ("nq question: x",))


def test_jsonl_input(tmp_path: Path) -> None:
    path = tmp_path / "edits.jsonl"
    lines = [json.dumps(record("zsre_mend", src=f"Question {i}?")) for i in range(3)]
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    records = read_records(path)
    assert [r.prompt for r in records] == ["Question 0?", "Question 1?", "Question 2?"]
    assert [r.case_id for r in records] == ["0", "1", "2"]


def test_jsonl_invalid_line(tmp_path: Path) -> None:
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps(ZSRE) + "\n{not json\n", encoding="utf-8")
    err = read_error(path)
    assert_names(err, path, None, None)
    assert "line 2" in str(err)


# --- malformed files -----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(DataFileNotFoundError) as info:
        read_records(path)
    assert isinstance(info.value, FileNotFoundError)
    assert str(info.value) == f"Data file '{path}' does not exist."


def test_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("[{", encoding="utf-8")
    err = read_error(path)
    assert_names(err, path, None, None)
    assert "not valid JSON" in str(err)


def test_invalid_json_says_where_in_plain_words(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[{"src": "unterminated', encoding="utf-8")
    err = str(read_error(path))
    assert "at at" not in err and "starting at: line 1, column 10" in err


@pytest.mark.parametrize("text", ["", "  \n\n"])
def test_an_empty_file_is_named_empty(tmp_path: Path, text: str) -> None:
    for name in ("empty.json", "empty.jsonl"):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        err = read_error(path)
        assert_names(err, path, None, None)
        assert str(err).endswith("is empty.") and "JSON" not in str(err)


def test_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.json"
    path.write_bytes(b'[{"src": "caf\xe9"}]')
    err = read_error(path)
    assert_names(err, path, None, None)
    assert "UTF-8" in str(err)


def test_top_level_not_list(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"data": [ZSRE]})
    err = read_error(path)
    assert_names(err, path, None, None)
    assert "list" in str(err)


@pytest.mark.parametrize("name", ["empty.json", "empty.jsonl"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("[]" if name.endswith(".json") else "\n", encoding="utf-8")
    err = read_error(path)
    assert_names(err, path, None, None)
    assert ("no records" if name.endswith(".json") else "is empty") in str(err)


def test_record_not_object(tmp_path: Path) -> None:
    path = write_json(tmp_path, [ZSRE, ["not", "an", "object"]])
    err = read_error(path)
    assert_names(err, path, 1, None)
    assert "JSON object" in str(err)


def test_later_record_validated_against_first_format(tmp_path: Path) -> None:
    path = write_json(tmp_path, [ZSRE, ZSRE, CF_EASY])
    # A CF record in a ZsRE file fails on the first ZsRE field it lacks.
    assert_names(read_error(path), path, 2, "src")


BAD_RECORDS = [
    # (format, changes, field named in the error)
    ("zsre_mend", {"alt": ""}, "alt"),
    ("zsre_mend", {"alt": "   "}, "alt"),
    ("zsre_mend", {"alt": 5}, "alt"),
    ("zsre_mend", {"src": " "}, "src"),
    ("zsre_mend", {"subject": ""}, "subject"),
    ("zsre_mend", {"answers": "Bob"}, "answers"),
    ("zsre_mend", {"answers": ["Bob", 3]}, "answers"),
    ("zsre_mend", {"rephrase": None}, "rephrase"),
    ("zsre_mend", {"loc": None}, "loc"),
    ("zsre_mend", {"loc_ans": None}, "loc_ans"),
    ("knowedit", {"target_new": "\t"}, "target_new"),
    ("knowedit", {"prompt": ""}, "prompt"),
    ("knowedit", {"ground_truth": None}, "ground_truth"),
    ("knowedit", {"locality": []}, "locality"),
    (
        "knowedit",
        {"locality": {"Relation_Specificity": [{"ground_truth": ["x"]}]}},
        "locality.Relation_Specificity[0].prompt",
    ),
    (
        "knowedit",
        {"locality": {"Relation_Specificity": [{"prompt": "p", "ground_truth": []}]}},
        "locality.Relation_Specificity[0].ground_truth",
    ),
    ("counterfact_easyedit", {"target_new": ""}, "target_new"),
    ("counterfact_easyedit", {"subject": None}, "subject"),
    ("counterfact_easyedit", {"rephrase_prompt": None}, "rephrase_prompt"),
    ("counterfact_easyedit", {"locality_ground_truth": None}, "locality_ground_truth"),
    ("counterfact_easyedit", {"locality_ground_truth": ["a", "b"]}, "locality_ground_truth"),
    ("counterfact_easyedit", {"case_id": [1]}, "case_id"),
    ("counterfact_rome", {"requested_rewrite": "x"}, "requested_rewrite"),
    ("counterfact_rome", {"paraphrase_prompts": None}, "paraphrase_prompts"),
    ("counterfact_rome", {"paraphrase_prompts": ["ok", ""]}, "paraphrase_prompts[1]"),
    ("counterfact_rome", {"neighborhood_prompts": None}, "neighborhood_prompts"),
    ("counterfact_rome", {"generation_prompts": "x"}, "generation_prompts"),
]


@pytest.mark.parametrize(("fmt", "changes", "field"), BAD_RECORDS)
def test_bad_record_names_file_index_field(tmp_path: Path, fmt: str, changes: dict[str, Any], field: str) -> None:
    # The bad record is the second one, so the index in the message must be 1.
    path = write_json(tmp_path, [BASES[fmt], record(fmt, **changes)])
    assert_names(read_error(path), path, 1, field)


@pytest.mark.parametrize(
    ("rewrite_changes", "field"),
    [
        ({"prompt": "no placeholder originates from"}, "requested_rewrite.prompt"),
        ({"subject": " "}, "requested_rewrite.subject"),
        ({"target_new": {"id": "Q1"}}, "requested_rewrite.target_new.str"),
        ({"target_new": {"str": ""}}, "requested_rewrite.target_new.str"),
        ({"target_true": None}, "requested_rewrite.target_true"),
    ],
)
def test_bad_rome_rewrite(tmp_path: Path, rewrite_changes: dict[str, Any], field: str) -> None:
    rec = copy.deepcopy(CF_ROME)
    for key, value in rewrite_changes.items():
        if value is None:
            del rec["requested_rewrite"][key]
        else:
            rec["requested_rewrite"][key] = value
    path = write_json(tmp_path, [rec])
    assert_names(read_error(path), path, 0, field)


def test_error_message_format() -> None:
    err = DataFormatError("zsre.json", 17, "alt", "must be a non-empty string (got '')")
    assert str(err) == "zsre.json: record 17: field 'alt' must be a non-empty string (got '')."
    assert (err.path, err.index, err.field) == ("zsre.json", 17, "alt")
    assert str(DataFormatError("x.json", None, None, "has no records.")) == "x.json: the file has no records."


# --- duplicates and empty targets ----------------------------------------------------------


def test_duplicate_prompt_keeps_last(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        record("counterfact_easyedit", case_id=1, prompt="P is", target_new="A"),
        record("counterfact_easyedit", case_id=2, prompt="Q is", target_new="B"),
        record("counterfact_easyedit", case_id=3, prompt=" P is ", target_new="C"),
        record("counterfact_easyedit", case_id=4, prompt="P is", target_new="D"),
    ]
    path = write_json(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="data.readers"):
        records = read_records(path)
    assert [(r.case_id, r.target_new) for r in records] == [("2", "B"), ("4", "D")]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 2 record(s)" in warnings[0].getMessage()
    assert len(read_records(path, dedupe=False)) == 4


def test_no_warning_without_duplicates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="data.readers"):
        read_records(write_json(tmp_path, [ZSRE]))
    assert not caplog.records


def test_an_empty_target_names_the_switch_that_skips_it(tmp_path: Path) -> None:
    path = write_json(tmp_path, [record("zsre_mend", src="Other?"), record("zsre_mend", alt="")])
    err = read_error(path)
    assert_names(err, path, 1, "alt")
    assert "must be a non-empty string" in str(err) and "data.drop_empty_targets=true" in str(err)
    # Another empty field does not mention it.
    assert "drop_empty_targets" not in str(read_error(write_json(tmp_path, [record("zsre_mend", src="")], "src.json")))


def test_drop_empty_targets(tmp_path: Path) -> None:
    path = write_json(tmp_path, [record("zsre_mend", alt=""), record("zsre_mend", src="Other?")])
    records = read_records(path, drop_empty_targets=True)
    assert [(r.case_id, r.prompt) for r in records] == [("1", "Other?")]


# --- record types and content_hash ---------------------------------------------------------


def test_edit_record_rejects_unpaired_loc() -> None:
    with pytest.raises(ValueError, match="loc_answers"):
        EditRecord("0", "zsre", "s", "p", "t", None, (), ("a", "b"), ("x",))


def test_content_hash_stable_and_sensitive(tmp_path: Path) -> None:
    path = write_json(tmp_path, [ZSRE, record("zsre_mend", src="Other?")])
    a, b = read_records(path)
    h = content_hash([a, b])
    assert len(h) == 64 and int(h, 16) >= 0
    assert h == content_hash(read_records(path))  # stable across reads
    assert h == content_hash(iter([a, b]))
    assert h != content_hash([b, a])  # order-sensitive
    assert h != content_hash([a])
    changed = EditRecord(**{**a.__dict__, "target_new": "Alicia"})
    assert h != content_hash([changed, b])
    assert content_hash([IrrelevantRecord("p", None)]) != content_hash([IrrelevantRecord("p", "")])
    assert content_hash([]) == content_hash([])


def test_content_hash_known_value() -> None:
    # Pins the canonical serialization: changing it invalidates saved memory fingerprints.
    rec = IrrelevantRecord("Who?", "Me")
    expected = hashlib.sha256('[{"answer":"Me","prompt":"Who?","type":"IrrelevantRecord"}]'.encode()).hexdigest()
    assert content_hash([rec]) == expected
