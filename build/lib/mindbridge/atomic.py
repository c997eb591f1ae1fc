"""Directories that appear complete or not at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_dir_atomically(final: Path, write: Callable[[Path], None], replace: bool = True) -> Path:
    """Fill a temporary sibling of `final` with `write(tmp)`, then rename it into place.

    A killed process leaves only a hidden `.NAME.tmp-*` sibling, never a half-written `final`.
    `replace=False` keeps an existing `final` (a cache another process completed first).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; artifacts are plain directories
        if final.exists() and replace:
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
