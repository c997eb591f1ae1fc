"""Data layer: record types, file readers, edit/out-of-scope splits and the bundled data files.

Import-light on purpose: nothing here imports torch or lightning.
"""

from data.readers import (
    BUNDLED_DEFAULTS,
    BUNDLED_DIR,
    FORMATS,
    bundled_path,
    detect_format,
    load_raw_records,
    read_records,
)
from data.records import (
    DataFileNotFoundError,
    DataFormatError,
    EditRecord,
    IrrelevantRecord,
    content_hash,
)
from data.splits import EditSplit, make_split, split_stats



def __getattr__(name: str):
    # The datamodule needs torch and lightning; import it only when asked for.
    if name == "EditDataModule":
        from data.datamodule import EditDataModule
        return EditDataModule
    raise AttributeError(f"module 'data' has no attribute {name!r}")


__all__ = [
    "BUNDLED_DEFAULTS",
    "BUNDLED_DIR",
    "FORMATS",
    "DataFileNotFoundError",
    "DataFormatError",
    "EditRecord",
    "EditSplit",
    "IrrelevantRecord",
    "bundled_path",
    "content_hash",
    "detect_format",
    "load_raw_records",
    "make_split",
    "read_records",
    "split_stats",
]
