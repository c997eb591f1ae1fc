"""Readers for the knowledge-editing file formats; every format maps to ``EditRecord``.

Supported formats (see shared spec ``evaluation.md`` §3):

* ``zsre_mend`` - MEND/EasyEdit ZsRE: ``subject, src, rephrase, alt, answers, loc, loc_ans``.
* ``knowedit`` - KnowEdit: ``subject, prompt, target_new, ground_truth, rephrase_prompt, locality{}``.
* ``counterfact_easyedit`` - EasyEdit flat CounterFact: ``case_id, prompt, target_new, subject,
  ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``.
* ``counterfact_rome`` - ROME/MEMIT CounterFact: ``case_id, requested_rewrite{...},
  paraphrase_prompts, neighborhood_prompts, attribute_prompts, generation_prompts``.

Extra keys (``pred``, ``cond``, ``portability``, ...) are ignored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from data.records import DataFileNotFoundError, DataFormatError, EditRecord

logger = logging.getLogger(__name__)

BUNDLED_DIR: Path = Path(__file__).resolve().parent / "bundled"

# Default bundled file per `data=` config; the CF pool supplies non-edited (out-of-scope) records.
BUNDLED_DEFAULTS: dict[str, str] = {
    "zsre": "zsre/zsre_mend_eval_portability_gpt4.json",
    "counterfact": "counterfact/counterfact-edit.json",
    "counterfact_pool": "counterfact/counterfact-train.json",
    # The same CounterFact facts in ROME/MEMIT form: real paraphrases (2) and neighbourhood prompts
    # (10) per record. The flat file's `rephrase_prompt` is mostly a generation prompt (see PROVENANCE.md).
    "counterfact_rome": "counterfact/counterfact_portability_gpt4.json",
    "counterfact_rome_pool": "counterfact/counterfact-train.json",
}

FORMATS: tuple[str, ...] = ("zsre_mend", "knowedit", "counterfact_easyedit", "counterfact_rome")

# Keys that identify a format, checked in this order (the first match wins).
_SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = (
    ("counterfact_rome", frozenset({"requested_rewrite"})),
    ("zsre_mend", frozenset({"src", "alt"})),
    ("knowedit", frozenset({"prompt", "target_new", "locality"})),
    ("counterfact_easyedit", frozenset({"prompt", "target_new", "locality_prompt"})),
)

# Where each format keeps o*, for `drop_empty_targets`.
_TARGET_KEYS: dict[str, tuple[str, ...]] = {
    "zsre_mend": ("alt",),
    "knowedit": ("target_new",),
    "counterfact_easyedit": ("target_new",),
    "counterfact_rome": ("requested_rewrite", "target_new", "str"),
}

_CF_FORMATS = frozenset({"counterfact_easyedit", "counterfact_rome"})

PathArg = str | PathLike[str]


def bundled_path(relpath: str | PathLike[str]) -> Path:
    """Absolute path of a file shipped in ``data/bundled`` (e.g. ``"zsre/knowedit_ZsRE-test-all.json"``)."""
    path = (BUNDLED_DIR / relpath).resolve()
    if BUNDLED_DIR != path and BUNDLED_DIR not in path.parents:
        raise ValueError(f"Bundled path '{relpath}' points outside {BUNDLED_DIR}.")
    return path


def _short_repr(value: Any) -> str:
    """A compact repr for error messages (long values are cut)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Typed, validated access to one JSON record; every failure names file, record and field."""

    def __init__(self, path: PathArg | None, index: int, record: Mapping[str, Any], prefix: str = "") -> None:
        self.path = path
        self.index = index
        self.record = record
        self.prefix = prefix

    def error(self, key: str | None, problem: str) -> DataFormatError:
        field = None if key is None else self.prefix + key
        return DataFormatError(self.path, self.index, field, problem)

    def get(self, key: str) -> Any:
        if key not in self.record:
            raise self.error(key, "is missing")
        return self.record[key]

    def text(self, value: Any, key: str) -> str:
        """Strip a string value; empty or whitespace-only strings are errors."""
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string (got {_short_repr(value)})")
        return value.strip()

    def string(self, key: str) -> str:
        return self.text(self.get(key), key)

    def optional_string(self, key: str) -> str | None:
        value = self.record.get(key)
        return None if value is None else self.text(value, key)

    def string_list(self, key: str) -> tuple[str, ...]:
        """A list of non-empty strings (the list itself may be empty)."""
        value = self.get(key)
        if not isinstance(value, list):
            raise self.error(key, f"must be a list of strings (got {type(value).__name__})")
        return tuple(self.text(item, f"{key}[{i}]") for i, item in enumerate(value))

    def optional_string_list(self, key: str) -> tuple[str, ...]:
        return self.string_list(key) if self.record.get(key) is not None else ()

    def strings(self, key: str) -> tuple[str, ...]:
        """A single string or a list of strings, as a tuple (EasyEdit files use both shapes)."""
        value = self.get(key)
        return (self.text(value, key),) if isinstance(value, str) else self.string_list(key)

    def first_answer(self, key: str, value: Any) -> str | None:
        """First string of a str / list / nested-list answer field; None for an empty list."""
        while isinstance(value, list):
            if not value:
                return None
            value, key = value[0], f"{key}[0]"
        if not isinstance(value, str):
            raise self.error(key, f"must be a string or a list of strings (got {type(value).__name__})")
        return value.strip() or None

    def child(self, key: str) -> _Fields:
        value = self.get(key)
        if not isinstance(value, dict):
            raise self.error(key, f"must be a JSON object (got {type(value).__name__})")
        return _Fields(self.path, self.index, value, prefix=f"{self.prefix}{key}.")

    def case_id(self) -> str:
        """The record's own case_id if it has one, else its index in the file."""
        value = self.record.get("case_id")
        if value is None:
            return str(self.index)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.error("case_id", f"must be an integer or a string (got {_short_repr(value)})")
        return str(value).strip()


def _paired(f: _Fields, prompts_key: str, answers_key: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Read prompt/answer fields that must have the same number of entries."""
    prompts, answers = f.strings(prompts_key), f.strings(answers_key)
    if len(prompts) != len(answers):
        raise f.error(answers_key, f"has {len(answers)} entries but '{prompts_key}' has {len(prompts)}")
    return prompts, answers


def _zsre_answers(f: _Fields) -> str | None:
    """First original answer of a MEND record (``answers`` must be a list of strings)."""
    answers = f.get("answers")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise f.error("answers", f"must be a list of strings (got {_short_repr(answers)})")
    return f.first_answer("answers", answers)


def _parse_zsre_mend(f: _Fields, dataset: str) -> EditRecord:
    # Keyword arguments are evaluated in order, so errors name the core fields first.
    return EditRecord(
        case_id=f.case_id(),
        dataset=dataset,
        subject=f.string("subject"),
        prompt=f.string("src"),
        target_new=f.string("alt"),
        target_true=_zsre_answers(f),
        rephrase_prompts=(f.string("rephrase"),),
        # Kept verbatim with its "nq question: " prefix: the evaluator scores `loc + " " + loc_ans`.
        loc_prompts=(f.string("loc"),),
        loc_answers=(f.string("loc_ans"),),
    )


def _knowedit_locality(f: _Fields) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Flatten every locality kind (Relation_Specificity, Forgetfulness, ...) into prompt/answer pairs."""
    locality = f.child("locality")
    prompts: list[str] = []
    answers: list[str] = []
    for kind, entries in locality.record.items():
        if not isinstance(entries, list):
            raise locality.error(kind, f"must be a list of objects (got {type(entries).__name__})")
        for i, entry in enumerate(entries):
            key = f"{kind}[{i}]"
            if not isinstance(entry, dict):
                raise locality.error(key, f"must be a JSON object (got {type(entry).__name__})")
            item = _Fields(f.path, f.index, entry, prefix=f"{locality.prefix}{key}.")
            answer = item.first_answer("ground_truth", item.get("ground_truth"))
            if answer is None:
                raise item.error("ground_truth", "must contain a non-empty answer")
            prompts.append(item.string("prompt"))
            answers.append(answer)
    return tuple(prompts), tuple(answers)


def _easyedit_record(f: _Fields, dataset: str, rephrase: Callable[[_Fields], tuple[str, ...]],
                     locality: Callable[[_Fields], tuple[tuple[str, ...], tuple[str, ...]]]) -> EditRecord:
    """An EasyEdit-style record; `rephrase` and `locality` read the fields that differ by subset."""
    subject, prompt, target_new = f.string("subject"), f.string("prompt"), f.string("target_new")
    target_true = f.first_answer("ground_truth", f.get("ground_truth"))
    rephrase_prompts = rephrase(f)
    loc_prompts, loc_answers = locality(f)
    return EditRecord(case_id=f.case_id(), dataset=dataset, subject=subject, prompt=prompt,
                      target_new=target_new, target_true=target_true, rephrase_prompts=rephrase_prompts,
                      loc_prompts=loc_prompts, loc_answers=loc_answers)


def _parse_knowedit(f: _Fields, dataset: str) -> EditRecord:
    # Some KnowEdit subsets (e.g. WikiBio) have no rephrase; ZsRE/CF subsets always do.
    return _easyedit_record(f, dataset, lambda g: g.strings("rephrase_prompt") if "rephrase_prompt" in g.record else (),
                            _knowedit_locality)


def _parse_counterfact_easyedit(f: _Fields, dataset: str) -> EditRecord:
    return _easyedit_record(f, dataset, lambda g: g.strings("rephrase_prompt"),
                            lambda g: _paired(g, "locality_prompt", "locality_ground_truth"))


def _rome_target(rewrite: _Fields, key: str) -> str:
    """ROME targets are ``{"str": ..., "id": ...}``; a bare string is accepted too."""
    value = rewrite.get(key)
    return rewrite.text(value, key) if isinstance(value, str) else rewrite.child(key).string("str")


def _parse_counterfact_rome(f: _Fields, dataset: str) -> EditRecord:
    rewrite = f.child("requested_rewrite")
    template = rewrite.string("prompt")
    if "{}" not in template:
        raise rewrite.error("prompt", f"must contain '{{}}' for the subject (got {_short_repr(template)})")
    subject = rewrite.string("subject")
    target_new = _rome_target(rewrite, "target_new")
    target_true = _rome_target(rewrite, "target_true")
    neighborhood = f.string_list("neighborhood_prompts")
    return EditRecord(
        case_id=f.case_id(),
        dataset=dataset,
        subject=subject,
        # replace, not str.format: templates may contain other braces.
        prompt=template.replace("{}", subject, 1),
        target_new=target_new,
        target_true=target_true,
        rephrase_prompts=f.string_list("paraphrase_prompts"),
        # Neighbours share the relation, so their correct answer is the subject's true object.
        loc_prompts=neighborhood,
        loc_answers=(target_true,) * len(neighborhood),
        prompt_template=template,
        relation_id=rewrite.optional_string("relation_id"),
        attribute_prompts=f.optional_string_list("attribute_prompts"),
        generation_prompts=f.optional_string_list("generation_prompts"),
    )


_PARSERS: dict[str, Callable[[_Fields, str], EditRecord]] = {
    "zsre_mend": _parse_zsre_mend,
    "knowedit": _parse_knowedit,
    "counterfact_easyedit": _parse_counterfact_easyedit,
    "counterfact_rome": _parse_counterfact_rome,
}


def detect_format(record: Mapping[str, Any], *, path: PathArg | None = None, index: int = 0) -> str:
    """Name the format of one record: one of ``FORMATS``; raise DataFormatError if none fits."""
    if not isinstance(record, Mapping):
        raise DataFormatError(path, index, None, f"must be a JSON object (got {type(record).__name__})")
    keys = set(record)
    for fmt, signature in _SIGNATURES:
        if signature <= keys:
            return fmt
    seen = ", ".join(sorted(keys)) or "none"
    expected = "; ".join(f"{fmt}: {'+'.join(sorted(sig))}" for fmt, sig in _SIGNATURES)
    raise DataFormatError(path, index, None, f"matches no known format (keys seen: {seen}; expected {expected})")


def _decode(path: Path) -> str:
    """Read the file as UTF-8 text (a BOM is tolerated)."""
    if not path.exists():
        raise DataFileNotFoundError(path)
    if not path.is_file():
        raise DataFileNotFoundError(path, "is not a regular file")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, None, None, f"is not valid UTF-8 (bad byte at offset {exc.start})") from exc


def _parse_json_lines(path: Path, text: str) -> list[Any]:
    """One JSON value per non-blank line."""
    items = []
    # Only \n ends a JSON line: str.splitlines() would also split inside strings at U+0085, U+2028, ...
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, None, None, f"has invalid JSON on line {line_no} ({exc.msg})") from exc
    return items


def _parse_json_list(path: Path, text: str) -> list[Any]:
    """A single JSON array of records."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        # json's message may end in "at" ("Unterminated string starting at"): the position follows a colon.
        problem = f"is not valid JSON ({exc.msg.rstrip(': ')}: line {exc.lineno}, column {exc.colno})"
        raise DataFormatError(path, None, None, problem) from exc
    if not isinstance(value, list):
        raise DataFormatError(path, None, None, f"must contain a JSON list of records (got {type(value).__name__})")
    return value


def load_raw_records(path: PathArg) -> list[Any]:
    """Load the raw JSON values of a ``.json`` list file or a ``.jsonl`` file; no record checks."""
    file = Path(path)
    text = _decode(file)
    if not text.strip():
        raise DataFormatError(file, None, None, "is empty")
    items = _parse_json_lines(file, text) if file.suffix.lower() == ".jsonl" else _parse_json_list(file, text)
    if not items:
        raise DataFormatError(file, None, None, "has no records")
    return items


def _has_empty_target(raw: Any, fmt: str) -> bool:
    """True if the record's o* is present but an empty/whitespace string."""
    value = raw
    for key in _TARGET_KEYS[fmt]:
        if not isinstance(value, dict) or key not in value:
            return False
        value = value[key]
    return isinstance(value, str) and not value.strip()


def _keep_last_per_prompt(records: list[EditRecord]) -> tuple[list[EditRecord], int]:
    """Drop every record whose prompt appears again later; return kept records and the drop count."""
    last_index = {rec.prompt: i for i, rec in enumerate(records)}
    kept = [rec for i, rec in enumerate(records) if last_index[rec.prompt] == i]
    return kept, len(records) - len(kept)


def read_records(
    path: PathArg,
    dataset: str | None = None,
    fmt: str = "auto",
    *,
    dedupe: bool = True,
    drop_empty_targets: bool = False,
) -> list[EditRecord]:
    """Read and validate an edit file (JSON list or ``.jsonl``) into ``EditRecord`` objects.

    The format is detected on the first record (or forced with ``fmt``) and every record is
    validated against it; any problem raises ``DataFormatError`` naming file, record and field.
    ``dataset`` defaults to "counterfact" for CounterFact formats and "zsre" otherwise.

    Duplicates: when several records share the same (stripped) ``prompt``, only the LAST one is
    kept, at its own position; earlier ones are dropped and one warning gives the count. An edit
    prompt with two targets cannot be edited consistently. ``dedupe=False`` keeps all records.

    ``drop_empty_targets=True`` skips records whose o* is an empty string instead of raising
    (MindBridge drops ZsRE records with an empty ``alt``); one warning gives the count.
    """
    raw_records = load_raw_records(path)
    if fmt == "auto":
        fmt = detect_format(raw_records[0], path=path, index=0)
    elif fmt not in _PARSERS:
        raise ValueError(f"Unknown data format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}.")
    name = dataset or ("counterfact" if fmt in _CF_FORMATS else "zsre")
    parse = _PARSERS[fmt]

    records: list[EditRecord] = []
    empty_targets = 0
    for index, raw in enumerate(raw_records):
        if not isinstance(raw, dict):
            raise DataFormatError(path, index, None, f"must be a JSON object (got {type(raw).__name__})")
        if drop_empty_targets and _has_empty_target(raw, fmt):
            empty_targets += 1
            continue
        try:
            records.append(parse(_Fields(path, index, raw), name))
        except DataFormatError as err:
            if not _has_empty_target(raw, fmt):
                raise
            # Public files have a few records with an empty target: name the switch that skips them.
            raise DataFormatError(path, index, err.field,
                                  f"{err.problem}; data.drop_empty_targets=true skips records with an empty target") from None

    if empty_targets:
        logger.warning("%s: skipped %d record(s) with an empty target.", path, empty_targets)
    if dedupe:
        records, dropped = _keep_last_per_prompt(records)
        if dropped:
            logger.warning(
                "%s: dropped %d record(s) whose prompt appears again later in the file (the last one is kept).",
                path,
                dropped,
            )
    if not records:
        raise DataFormatError(path, None, None, "has no usable records")
    return records
