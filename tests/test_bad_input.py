"""Bad input, property-based (hypothesis): every malformed file gets one clear sentence naming the
file, record and field; every well-formed one is read without losing anything.

Documented behaviour checked here (data/readers.py `read_records`):
- strings are stripped; an empty or whitespace-only required string is an error
  (`data.drop_empty_targets=true` skips records whose *target* is empty instead, with a warning);
- an empty original answer (`answers`, `ground_truth`) means "unknown" (target_true None);
- two records with the same edit prompt - the same subject and relation, in every format - keep
  only the LATER one, at its own position, with one warning giving the count (a memory cannot
  hold two objects for one (subject, relation)); `data.dedupe=false` keeps both;
- very long prompts are kept verbatim; tokenisation keeps their last `max_prompt_tokens` tokens.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from data.datamodule import EditDataModule, RankShard
from data.readers import read_records
from data.records import DataFormatError, EditRecord, content_hash, record_from_dict

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Printable text without lone surrogates (not encodable as UTF-8), never blank after strip().
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(lambda s: s.strip())
BLANK = st.sampled_from(["", " ", "\t", "\n  ", "\u3000"])
NOT_A_STRING = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.dictionaries(TEXT, TEXT, max_size=2), st.lists(st.integers(), min_size=1, max_size=3))


def zsre(i: int, t: dict) -> dict:
    return {"subject": t["s"], "src": f"{t['p']} {i}?", "rephrase": t["r"], "alt": t["o"], "answers": [t["a"]],
            "loc": "nq question: " + t["l"], "loc_ans": t["la"]}


def knowedit(i: int, t: dict) -> dict:
    return {"subject": t["s"], "prompt": f"{t['p']} {i}?", "target_new": t["o"], "ground_truth": [t["a"]],
            "rephrase_prompt": t["r"], "locality": {"Relation_Specificity": [{"prompt": t["l"], "ground_truth": [t["la"]]}]}}


def cf_easyedit(i: int, t: dict) -> dict:
    return {"case_id": i, "subject": t["s"], "prompt": f"{t['p']} {i}", "target_new": t["o"], "ground_truth": t["a"],
            "rephrase_prompt": t["r"], "locality_prompt": t["l"], "locality_ground_truth": t["la"]}


def cf_rome(i: int, t: dict) -> dict:
    return {"case_id": i, "requested_rewrite": {"prompt": "{} " + f"{t['p']} {i}", "subject": t["s"],
                                                "target_new": {"str": t["o"]}, "target_true": {"str": t["a"]},
                                                "relation_id": "P1"},
            "paraphrase_prompts": [t["r"]], "neighborhood_prompts": [t["l"]]}


# format -> (builder, required text fields as paths into the record)
FORMATS = {
    "zsre_mend": (zsre, [("subject",), ("src",), ("rephrase",), ("alt",), ("loc",), ("loc_ans",)]),
    "knowedit": (knowedit, [("subject",), ("prompt",), ("target_new",), ("rephrase_prompt",)]),
    "counterfact_easyedit": (cf_easyedit, [("subject",), ("prompt",), ("target_new",), ("rephrase_prompt",),
                                           ("locality_prompt",), ("locality_ground_truth",)]),
    "counterfact_rome": (cf_rome, [("requested_rewrite", "subject"), ("requested_rewrite", "prompt"),
                                   ("requested_rewrite", "target_new", "str"), ("paraphrase_prompts", 0),
                                   ("neighborhood_prompts", 0)]),
}
TEXTS = st.fixed_dictionaries({k: TEXT for k in ("s", "p", "r", "o", "a", "l", "la")})


@st.composite
def files(draw, min_records: int = 1, max_records: int = 6):
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    build, fields = FORMATS[fmt]
    n = draw(st.integers(min_records, max_records))
    return fmt, fields, [build(i, draw(TEXTS)) for i in range(n)]


def write(records, suffix: str = ".json") -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        if suffix == ".jsonl":
            fh.write("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
        else:
            json.dump(records, fh, ensure_ascii=False)
    return Path(name)


def read_error(path: Path, **kwargs) -> DataFormatError:
    try:
        with pytest.raises(DataFormatError) as info:
            read_records(path, **kwargs)
    finally:
        path.unlink()
    msg = str(info.value)
    assert path.name in msg and msg.endswith(".") and "\n" not in msg
    return info.value


def set_path(record: dict, path: tuple, value) -> None:
    target = record
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value


_DELETE = object()


def dotted(path: tuple) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


# --------------------------------------------------------------------------- well-formed input


@SETTINGS
@given(files(), st.sampled_from([".json", ".jsonl"]))
def test_well_formed_files_lose_nothing(file, suffix):
    fmt, _, records = file
    path = write(records, suffix)
    try:
        read = read_records(path)
    finally:
        path.unlink()
    assert len(read) == len(records)                                 # prompts are distinct: none dropped
    for rec, raw in zip(read, records):
        subject = raw["requested_rewrite"]["subject"] if fmt == "counterfact_rome" else raw["subject"]
        assert rec.subject == subject.strip()
        # A memory stores facts as JSON lines and reads them back unchanged.
        again = record_from_dict(json.loads(json.dumps(rec.__dict__, ensure_ascii=False)))
        assert again == rec
    assert content_hash(read) == content_hash([record_from_dict(json.loads(json.dumps(r.__dict__))) for r in read])


@SETTINGS
@given(files(), st.integers(1_000, 100_000))
def test_very_long_prompts_are_kept_and_truncated_only_when_tokenised(file, length):
    fmt, fields, records = file
    long = ("word " * (length // 5 + 1))[:length].strip() + "?"
    path_key = fields[1]                       # the prompt / src / template
    value = "{} " + long if fmt == "counterfact_rome" else long
    set_path(records[0], path_key, value)
    path = write(records)
    try:
        rec = read_records(path)[0]
    finally:
        path.unlink()
    assert len(rec.prompt) >= length
    from mindbridge.tokenization import teacher_forced_batch
    batch = teacher_forced_batch(_tokenizer(), [rec.prompt], [rec.target_new], max_prompt_tokens=64)
    assert batch.input_ids.shape[1] <= 64 + 32


_TOK = []


def _tokenizer():
    if not _TOK:
        from mindbridge.loading import load_causal_lm
        _TOK.append(load_causal_lm("random", random_config={"model_type": "llama", "hidden_size": 16,
                                                            "intermediate_size": 32, "num_hidden_layers": 1,
                                                            "num_attention_heads": 2})[1])
    return _TOK[0]


# --------------------------------------------------------------------------- malformed input


@SETTINGS
@given(files(), st.data(), st.one_of(BLANK, NOT_A_STRING, st.just(_DELETE)))
def test_a_bad_required_field_names_file_record_and_field(file, data, bad):
    fmt, fields, records = file
    index = data.draw(st.integers(0, len(records) - 1))
    field = data.draw(st.sampled_from(fields))
    if fmt == "counterfact_rome" and field[-1] == "prompt" and isinstance(bad, str):
        assume(bad.strip())                    # (a blank template is tested below)
    if bad is _DELETE and isinstance(field[-1], int):
        field = field[:-1]                     # a missing list, not a missing element (an empty list is fine)
    # Documented: KnowEdit subsets without paraphrases (WikiBio) omit rephrase_prompt; present, it must be valid.
    assume(not (fmt == "knowedit" and field == ("rephrase_prompt",) and bad is _DELETE))
    set_path(records[index], field, bad)
    err = read_error(write(records))
    if err.field is None:                      # a key that identifies the format, missing from record 0
        assert (err.index, bad) == (0, _DELETE) and index == 0 and "matches no known format" in str(err)
        return
    assert err.index == index
    # The field named is the corrupted one (or its parent, for a list/dict that cannot hold it).
    assert err.field is not None and (err.field.startswith(dotted(field[:2])) or dotted(field).startswith(err.field)), \
        (err.field, field)


@SETTINGS
@given(files(min_records=2), st.data(), BLANK)
def test_empty_targets_are_errors_or_skipped_with_a_count(file, data, blank):
    fmt, fields, records = file
    target = {"zsre_mend": ("alt",), "knowedit": ("target_new",), "counterfact_easyedit": ("target_new",),
              "counterfact_rome": ("requested_rewrite", "target_new", "str")}[fmt]
    index = data.draw(st.integers(0, len(records) - 1))
    set_path(records[index], target, blank)
    path = write(records)
    kept = read_records(path, drop_empty_targets=True)
    assert len(kept) == len(records) - 1
    err = read_error(path)
    assert err.index == index


@SETTINGS
@given(files(), st.data(), st.sampled_from([b"\xff", b"\xfe", b"\xc0", b"\xc1\xbf", b"\xf8\x88"]))
def test_non_utf8_bytes_are_one_sentence(file, data, garbage):
    _, _, records = file
    raw = json.dumps(records, ensure_ascii=False).encode("utf-8")
    at = data.draw(st.integers(0, len(raw)))
    fd, name = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw[:at] + garbage + raw[at:])
    err = read_error(Path(name))
    assert "not valid UTF-8" in str(err) and err.index is None


@SETTINGS
@given(st.one_of(st.just(""), st.just("   "), st.just("{}"), st.just("null"), st.just("[1, 2]"), st.just("[[]]"),
                 st.text(max_size=30)))
def test_files_that_are_not_record_lists(text):
    fd, name = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    read_error(Path(name))


def test_a_rome_template_without_a_subject_slot(tmp_path):
    rec = cf_rome(0, {k: "x" for k in ("s", "p", "r", "o", "a", "l", "la")})
    rec["requested_rewrite"]["prompt"] = "no slot here"
    err = read_error(write([rec]))
    assert err.field == "requested_rewrite.prompt" and "{}" in str(err)


# --------------------------------------------------------------------------- duplicates and conflicts


@SETTINGS
@given(files(min_records=2), st.data(), TEXT)
def test_same_subject_and_relation_later_target_wins(file, data, new_target):
    fmt, fields, records = file
    first, later = sorted(data.draw(st.lists(st.integers(0, len(records) - 1), min_size=2, max_size=2, unique=True)))
    # The later record asks the same question (same subject, same relation) with another target.
    clash = copy.deepcopy(records[first])
    target = {"zsre_mend": ("alt",), "knowedit": ("target_new",), "counterfact_easyedit": ("target_new",),
              "counterfact_rome": ("requested_rewrite", "target_new", "str")}[fmt]
    set_path(clash, target, new_target)
    if "case_id" in clash:
        clash["case_id"] = 1000 + later
    records[later] = clash
    path = write(records)
    try:
        kept = read_records(path)
        everything = read_records(path, dedupe=False)
    finally:
        path.unlink()
    assert len(kept) == len(records) - 1 and len(everything) == len(records)
    winner = [r for r in kept if r.prompt == everything[first].prompt]
    assert len(winner) == 1 and winner[0].target_new == new_target.strip()
    assert winner[0] == everything[later]                    # the later record, whole
    assert kept.index(winner[0]) == later - 1                 # at its own position


def test_duplicates_are_counted_in_one_warning(tmp_path, caplog):
    t = {k: "x" for k in ("s", "p", "r", "o", "a", "l", "la")}
    records = [zsre(0, t), zsre(1, t), zsre(0, t), zsre(0, {**t, "o": "y"})]
    path = tmp_path / "dups.json"
    path.write_text(json.dumps(records))
    with caplog.at_level(logging.WARNING):
        kept = read_records(path)
    assert [r.target_new for r in kept] == ["x", "y"]
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1 and "dropped 2 record(s)" in warnings[0] and "last one is kept" in warnings[0]


# --------------------------------------------------------------------------- the datamodule


@SETTINGS
@given(files(min_records=4, max_records=12), st.data())
def test_datamodule_splits_are_reproducible_disjoint_and_shard_exactly(file, data):
    _, _, records = file
    path = write(records)
    try:
        num_edits = data.draw(st.integers(1, len(records) - 1))
        seed, batch = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 5))
        make = lambda: EditDataModule("mine", path=str(path), num_edits=num_edits, seed=seed, batch_size=batch)  # noqa: E731
        a, b = make(), make()
        # What every DDP rank computes on its own: the same split, to the hash.
        assert a.facts_hash() == b.facts_hash() and a.out_of_scope == b.out_of_scope
        eval_prompts = {p.strip().casefold() for r in a.edits for p in (r.prompt, *r.rephrase_prompts, *r.loc_prompts)}
        assert not any(o.prompt.strip().casefold() in eval_prompts for o in a.out_of_scope)
        # One epoch: every edit exactly once.
        seen = [i for bt in a.edit_dataloader() for i in bt["index"].tolist()]
        assert sorted(seen) == list(range(num_edits))
        # Two ranks split every global batch between them and together see all of it.
        loader = a.edit_dataloader()
        global_batches = list(loader.batch_sampler.batches)
        shards = []
        for rank in (0, 1):
            loader.batch_sampler.sampler.set_epoch(0)
            shards.append(list(_as_rank(rank, 2, loader.batch_sampler)))
        assert len(shards[0]) == len(shards[1]) == len(global_batches)
        for g, r0, r1 in zip(global_batches, *shards):
            assert r0 and r1 and set(r0) | set(r1) == set(g)
            assert len(g) < 2 or not set(r0) & set(r1)
    finally:
        path.unlink()


def _as_rank(rank: int, world: int, shard: RankShard):
    import data.datamodule as dm
    real = dm._rank_and_world
    dm._rank_and_world = lambda: (rank, world)
    try:
        return list(shard)
    finally:
        dm._rank_and_world = real


def test_every_record_edited_leaves_no_out_of_scope_stream(tmp_path):
    t = {k: "x" for k in ("s", "p", "r", "o", "a", "l", "la")}
    path = tmp_path / "two.json"
    path.write_text(json.dumps([zsre(0, t), zsre(1, t)]))
    dm = EditDataModule("mine", path=str(path), num_edits=2, out_of_scope_sources=["prompt"])
    with pytest.raises(ValueError, match="no out-of-scope prompts"):
        dm.out_dataloader()


def test_edit_record_round_trip_rejects_unknown_fields():
    rec = EditRecord("0", "zsre", "s", "p?", "o", None, (), (), ())
    with pytest.raises(ValueError, match="unknown EditRecord fields"):
        record_from_dict({**rec.__dict__, "extra": 1})


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("override", ["llm=not_a_model", "data=not_a_dataset", "trainer=not_a_trainer",
                                      "+llm=smollm2,not_a_model"])
def test_unknown_config_names_fail_cleanly(override, tmp_path):
    from tests.test_cli import assert_one_sentence_error
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", override],
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)
    group, name = override.lstrip("+").split("=")
    name = name.split(",")[-1]
    # One sentence naming the bad choice and the available ones (e.g. smollm2 for llm=).
    assert_one_sentence_error(proc, f"unknown {group} '{name}'", "choices are")
    assert {"llm": "smollm2", "data": "zsre", "trainer": "ddp_sim"}[group] in proc.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_group_option_leaves_other_overrides_alone():
    from train import unknown_group_option
    assert unknown_group_option(["llm=smollm2", "data.num_edits=3", "memory=[a,b]", "logger=null",
                                 "stage.llms=[smollm2,gemma3]", "hydra.run.dir=x=y"]) is None
    assert "unknown encoder 'nope'" in unknown_group_option(["encoder=nope"])


def test_a_malformed_data_file_through_the_cli_is_one_sentence(tmp_path):
    from tests.test_cli import assert_one_sentence_error, run_cli
    t = {k: "x" for k in ("s", "p", "r", "o", "a", "l", "la")}
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(json.dumps(zsre(i, t)).encode() for i in range(3)) + b"\n\xff\xfe")
    proc = run_cli("debug=fast", f"data.path={bad}", "data.num_edits=1", tmp_path=tmp_path)
    assert_one_sentence_error(proc, "bad.jsonl", "UTF-8")
