"""Writing a benchmark's JSON result (shared by the scripts in this folder)."""
from __future__ import annotations

import json
from pathlib import Path


def write_result(path: str | Path, result: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {out}")
