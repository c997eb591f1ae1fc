"""Keep a finished run's figures as a result the docs are generated from.

    python benchmarks/record_run.py RUN_DIR NAME [--out benchmarks/results/runs]

Copies `RUN_DIR/metrics.json` (and, for a `stage=crossmodel` run, every `llms/<name>/metrics.json`)
to `<out>/<NAME>.json` with the command and the code commit that produced it. A run whose code had
uncommitted changes to code (`code_dirty`), or that does not name its commit, is refused unless
`--dirty-note` says what differed: a published figure must say which code it describes. `python benchmarks/results_doc.py` turns the folder into docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "runs"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RecordError(Exception):
    """A run that cannot be recorded, in one sentence."""


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordError(f"{path} does not exist: is this a finished run's folder?") from None
    except json.JSONDecodeError as err:
        raise RecordError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}).") from None


def collect(run_dir: Path, dirty_note: str | None = None) -> dict:
    """The record of one run: its metrics, and those of each LLM of a cross-model run.

    `dirty_note`: the run's tree differed from its commit, and this says how (it is published
    beside the figures); without it such a run is refused."""
    metrics = _read(run_dir / "metrics.json")
    if not metrics.get("code_commit"):
        raise RecordError(f"{run_dir / 'metrics.json'} names no code commit; run it from a git checkout.")
    if metrics.get("code_dirty") and not dirty_note:
        raise RecordError(f"The run in {run_dir} was made with uncommitted changes to "
                          f"{metrics['code_commit'][:10]}; commit and run it again.")
    record = {"command": metrics.get("command"), "code_commit": metrics["code_commit"], "metrics": metrics}
    if metrics.get("code_dirty"):
        record["dirty_note"] = dirty_note
    llms = sorted((run_dir / "llms").glob("*/metrics.json")) if (run_dir / "llms").is_dir() else []
    if llms:
        record["llms"] = {p.parent.name: _read(p) for p in llms}
    return record


def record(run_dir: Path, name: str, out: Path = DEFAULT_OUT, dirty_note: str | None = None,
           about: str | None = None) -> Path:
    if not NAME.match(name):
        raise RecordError(f"{name!r} is not a usable result name (letters, digits, '_', '-', '.').")
    rec = collect(Path(run_dir), dirty_note)
    if about:
        rec["about"] = about
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"name": name, **rec}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--dirty-note", help="how the run's tree differed from its commit (published with it)")
    parser.add_argument("--about", help="what a reader needs to know to repeat the run (e.g. how its data file was made)")
    args = parser.parse_args(argv)
    try:
        path = record(args.run_dir, args.name, args.out, args.dirty_note, args.about)
    except RecordError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
