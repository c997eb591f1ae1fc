"""MMEdit (E-VQA / E-IC) records and their images (Cheng et al. 2023; bundled text in data/bundled/mmedit/).

The bundled JSON names COCO val2014 images that are not shipped; `image_root` must hold them
(`val2014/...`, `val2014_image_rephrase/...`). A missing image is reported with its path.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from data.readers import _Fields, bundled_path, load_raw_records
from data.records import DataFileNotFoundError, DataFormatError

MMEDIT_FILES = {"vqa": "mmedit/vqa_eval.json", "caption": "mmedit/caption_eval_edit.json"}
# BLIP-2 OPT's VQA prompt (EasyEdit's MMEdit setting); captions use the record's own prefix ("a photo of").
PROMPT_TEMPLATES = {"vqa": "Question: {} Short answer:", "caption": "{}"}


@dataclass(frozen=True)
class MMEditRecord:
    case_id: str
    task: str                 # "vqa" | "caption"
    prompt: str               # src, in the task's template
    target: str               # alt: the edit target
    wrong: str | None         # pred: the model's original (wrong) answer
    rephrase: str             # text rephrase (T-Gen)
    image: str                # image of the edit (Rel, T-Gen)
    image_rephrase: str       # another image of the same content (M-Gen)
    loc_prompt: str           # NQ question, text only (T-Loc)
    loc_answer: str
    m_loc_image: str          # unrelated image question (M-Loc)
    m_loc_prompt: str
    m_loc_answer: str


def read_mmedit(path: str | PathLike[str] | None, task: str = "vqa") -> list[MMEditRecord]:
    """Records of an MMEdit JSON file (default: the bundled file of `task`)."""
    if task not in MMEDIT_FILES:
        raise ValueError(f"Unknown MMEdit task {task!r}; choose from {', '.join(MMEDIT_FILES)}.")
    path = Path(path).expanduser() if path else bundled_path(MMEDIT_FILES[task])
    raw = load_raw_records(path)
    template = PROMPT_TEMPLATES[task]
    out = []
    for i, rec in enumerate(raw):
        if not isinstance(rec, dict):
            raise DataFormatError(path, i, None, "is not a JSON object")
        f = _Fields(path, i, rec)
        out.append(MMEditRecord(
            case_id=str(i), task=task, prompt=template.format(f.string("src")), target=f.string("alt"),
            wrong=f.optional_string("pred"), rephrase=template.format(f.string("rephrase")),
            image=f.string("image"), image_rephrase=f.string("image_rephrase"),
            loc_prompt=f.string("loc"), loc_answer=f.string("loc_ans"), m_loc_image=f.string("m_loc"),
            m_loc_prompt=PROMPT_TEMPLATES["vqa"].format(f.string("m_loc_q")), m_loc_answer=f.string("m_loc_a")))
    return out


def split_mmedit(records: list[MMEditRecord], num_edits: int, seed: int) -> tuple[list[MMEditRecord], list[MMEditRecord]]:
    """`num_edits` records sampled with `seed` (edited and scored) and the rest (never scored)."""
    if not 0 < num_edits < len(records):
        raise ValueError(f"num_edits must be between 1 and {len(records) - 1} for {len(records)} MMEdit records, "
                         f"got {num_edits}.")
    chosen = random.Random(seed).sample(range(len(records)), num_edits)
    keep = set(chosen)
    return [records[i] for i in chosen], [r for i, r in enumerate(records) if i not in keep]


def image_path(root: str | PathLike[str] | None, name: str) -> Path:
    """The file of image `name` under `root`; a clear error names it if it is not there."""
    if root is None:
        raise DataFileNotFoundError(name, "cannot be found because no image folder is set; pass the folder "
                                          "holding the COCO val2014 images as stage.mmedit.image_root=DIR")
    path = Path(root).expanduser() / name
    if not path.is_file():
        raise DataFileNotFoundError(path, "does not exist (MMEdit image; the bundled records ship without images)")
    return path
