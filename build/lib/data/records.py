"""Record types shared by every data format, the data error type, and record fingerprints."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike


@dataclass(frozen=True)
class EditRecord:
    """One knowledge edit with its evaluation prompts, independent of the source file format."""

    case_id: str  # str(case_id), or the record's index in the file if the format has none
    dataset: str  # "zsre" | "counterfact" | a user-provided name
    subject: str
    prompt: str  # the edit prompt, filled (no "{}")
    target_new: str  # o*
    target_true: str | None  # ZsRE: answers[0]; KnowEdit: ground_truth[0]; CF: ground_truth / target_true.str
    rephrase_prompts: tuple[str, ...]
    loc_prompts: tuple[str, ...]
    loc_answers: tuple[str, ...]  # same length as loc_prompts
    prompt_template: str | None = None  # CF ROME format only, e.g. "{} originates from"
    relation_id: str | None = None
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Scorers zip these two; a length mismatch would silently drop prompts.
        if len(self.loc_prompts) != len(self.loc_answers):
            raise ValueError(
                f"EditRecord {self.case_id!r} has {len(self.loc_prompts)} loc_prompts "
                f"but {len(self.loc_answers)} loc_answers."
            )


@dataclass(frozen=True)
class IrrelevantRecord:
    """An out-of-scope (prompt, answer) pair used at training time; the answer may be unknown."""

    prompt: str
    answer: str | None = None


def _describe_location(path: str | PathLike[str] | None, index: int | None, field: str | None) -> str:
    """Build the "file: record N: field 'x'" prefix of an error message."""
    where = str(path) if path is not None else "<records>"
    where += ": the file" if index is None else f": record {index}"
    if field is not None:
        where += f": field '{field}'"
    return where


class DataFormatError(ValueError):
    """A data file or record does not match its format; the message is one sentence.

    ``index`` is the 0-based record position, or None when the problem concerns the whole file.
    ``field`` is the offending key (dotted for nested keys, e.g. ``requested_rewrite.subject``)
    or None when no single field is at fault.
    """

    def __init__(
        self,
        path: str | PathLike[str] | None,
        index: int | None,
        field: str | None,
        problem: str,
    ) -> None:
        self.path = path
        self.index = index
        self.field = field
        self.problem = problem.strip().rstrip(".")
        super().__init__(f"{_describe_location(path, index, field)} {self.problem}.")


class DataFileNotFoundError(FileNotFoundError):
    """The data file to read does not exist; the message is one sentence naming the path."""

    def __init__(self, path: str | PathLike[str], problem: str = "does not exist") -> None:
        self.path = path
        self.filename = str(path)
        super().__init__(f"Data file '{path}' {problem.rstrip('.')}.")

    def __str__(self) -> str:
        # OSError.__str__ would add an errno prefix; keep the single sentence.
        return str(self.args[0])


def _canonical(record: EditRecord | IrrelevantRecord) -> dict[str, object]:
    """A JSON-ready dict of one record, tagged with its type so different types never collide."""
    if not isinstance(record, (EditRecord, IrrelevantRecord)):
        raise TypeError(f"content_hash expects EditRecord or IrrelevantRecord items, got {type(record).__name__}.")
    return {"type": type(record).__name__, **dataclasses.asdict(record)}


def content_hash(records: Iterable[EditRecord | IrrelevantRecord]) -> str:
    """Fingerprint a sequence of records: sha256 hex of their canonical JSON, order-sensitive."""
    payload = json.dumps(
        [_canonical(r) for r in records],
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def record_from_dict(d: dict) -> EditRecord:
    """An `EditRecord` from its `dataclasses.asdict` form (e.g. a line of a memory's facts.jsonl)."""
    fields = {f.name for f in dataclasses.fields(EditRecord)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown EditRecord fields {unknown}")
    return EditRecord(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
