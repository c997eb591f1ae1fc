"""Generate docs/results.md (and the README's results table) from the recorded runs.

    python benchmarks/results_doc.py            # rewrite docs/results.md and the README block
    python benchmarks/results_doc.py --check    # exit 1 if either is not what the runs give

The runs are `benchmarks/results/runs/*.json`, written by `benchmarks/record_run.py` from a finished
run's `metrics.json`, each with the command and code commit that produced it. Nothing here is typed
by hand: to change a figure, record a new run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "results" / "runs"
DOC = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin (benchmarks/results_doc.py) -->", "<!-- results:end -->"


def load_runs(folder: Path = RUNS) -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def _num(value: Any, digits: int = 2) -> str:
    if value is None or value != value:
        return "–"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def _file(m: dict) -> str:
    path = m.get("data_path")
    return Path(path).name if path else "bundled"


def _data(m: dict) -> str:
    return f"{m.get('dataset')} / {_file(m)} / seed {m.get('data_seed', m.get('seed'))}"


def _commit(run: dict) -> str:
    """The commit; `+` where the run's tree differed from it (the note is under Commands)."""
    return f"`{run['code_commit'][:7]}{'+' if run.get('dirty_note') else ''}`"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _is_mindbridge(run: dict) -> bool:
    return run["metrics"].get("method") == "mindbridge" and "llms" not in run


def _order(run: dict) -> tuple:
    m = run["metrics"]
    return (m.get("dataset") or "", _file(m), m.get("data_seed", 0), run["name"])


def mindbridge_rows(runs: list[dict], gate: bool) -> list[list[str]]:
    rows = []
    for run in sorted((r for r in runs if _is_mindbridge(r) and bool(r["metrics"].get("gate")) == gate), key=_order):
        m = run["metrics"]
        total = m.get("run_seconds") or sum(m.get(k) or 0.0 for k in ("pretrain_seconds", "bridge_seconds", "eval_seconds"))
        rows.append([run["name"], _data(m), _num(m.get("rel")), _num(m.get("gen")), _num(m.get("loc")),
                     _num(m.get("avg")), _num(m.get("gen_prob"), 1),
                     f"{_num(m.get('loc_prob'), 1)} ({_num(m.get('pre_loc_prob'), 1)})" if "loc_prob" in m else "–",
                     f"{_num(m.get('gate_open_rate_gen'), 1)} / {_num(m.get('gate_open_rate_loc'), 1)}" if gate else "–",
                     _num(m.get("pretrain_inject_acc"), 3),
                     f"{_num(m.get('pretrain_seconds'), 0)} / {_num(m.get('bridge_seconds'), 0)} / "
                     f"{_num(m.get('eval_seconds'), 0)}", f"{_num(total / 60, 1)}", _load(run), _commit(run)])
    return rows


MB_HEADER = ["run", "data / file / seed", "Rel", "Gen", "Loc", "Avg", "gen_prob", "loc_prob (unedited)",
             "gate open: Gen / Loc %", "inject acc", "Stage I / bridge / eval s", "min", "load", "commit"]


def _load(run: dict) -> str:
    """How the run shared the machine: `threads=1` runs were measured two at a time."""
    return "2 runs × 1 thread" if "threads=1" in (run.get("command") or "").split() else "alone"


def crossmodel_rows(runs: list[dict]) -> list[list[str]]:
    rows = []
    for run in sorted((r for r in runs if "llms" in r), key=lambda r: r["name"]):
        pre = run["metrics"].get("pretrain_seconds")
        for name, m in run["llms"].items():
            rows.append([run["name"], name, _num(m.get("rel")), _num(m.get("gen")), _num(m.get("loc")),
                         _num(m.get("avg")), _num(m.get("projector_params_pct_of_llm"), 2),
                         _num(m.get("bridge_seconds"), 0), _num(pre, 0), _commit(run)])
    return rows


def comparison_rows(runs: list[dict]) -> list[list[str]]:
    """Every method on the same edits: runs grouped by (dataset, file, seed, number of edits)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        m = run["metrics"]
        if "llms" in run or m.get("llm") != "smollm2" or (m.get("method") == "mindbridge" and not m.get("gate")):
            continue
        groups.setdefault((m.get("dataset"), _file(m), m.get("data_seed"), m.get("num_edits")), []).append(run)
    rows = []
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        members = groups[key]
        if len({r["metrics"].get("method") for r in members}) < 2:
            continue
        for run in sorted(members, key=lambda r: -(r["metrics"].get("avg") or 0.0)):
            m = run["metrics"]
            rows.append([_data(m), str(m.get("method")), _num(m.get("rel")), _num(m.get("gen")), _num(m.get("loc")),
                         _num(m.get("avg")), _num(m.get("edit_seconds"), 0), _commit(run)])
    return rows


def commands(runs: list[dict]) -> list[str]:
    return [f"- `{r['name']}` (`{r['code_commit'][:10]}`): `{r.get('command') or '(in-process)'}`"
            + (f". {r['about']}" if r.get("about") else "")
            + (f"; the tree differed from the commit: {r['dirty_note']}" if r.get("dirty_note") else "")
            for r in sorted(runs, key=lambda r: r["name"])]


def render_doc(runs: list[dict]) -> str:
    lines = ["# Results", "",
             "Generated by `python benchmarks/results_doc.py` from `benchmarks/results/runs/*.json`; each",
             "row names the code commit that produced it, and the commands are listed at the end. Scores are",
             "EasyEdit's teacher-forced token accuracy in % on held-out prompts ([evaluation](evaluation.md));",
             "the LLM is SmolLM2-135M and the memory encoder all-MiniLM-L6-v2 unless a table says otherwise.",
             "Times are wall-clock seconds on a 2-core CPU; `min` is the whole run (the sum of the stages",
             "where the run predates `run_seconds`); runs with `threads=1` shared the machine with another.", "",
             "## MindBridge, memory gate on (the default)", ""]
    lines += _table(MB_HEADER, mindbridge_rows(runs, gate=True))
    off = mindbridge_rows(runs, gate=False)
    if off:
        lines += ["", "## MindBridge, memory gate off (`model.gate.enabled=false`, the paper's behaviour)", "",
                  "`stage=eval` of a gated run's memory and bridge with the gate switched off; Stage I and bridge",
                  "times are that run's.", ""]
        lines += _table(MB_HEADER, off)
    cross = crossmodel_rows(runs)
    if cross:
        lines += ["", "## One memory, several LLMs (`experiment=crossmodel`)", "",
                  "Each LLM reads the same memory (encoder files byte-identical) through its own projector.", ""]
        lines += _table(["run", "LLM", "Rel", "Gen", "Loc", "Avg", "projector % of LLM", "bridge s", "Stage I s",
                         "commit"], cross)
    comp = comparison_rows(runs)
    if comp:
        lines += ["", "## Methods on the same edits", ""]
        lines += _table(["data / file / seed", "method", "Rel", "Gen", "Loc", "Avg", "edit s", "commit"], comp)
    lines += ["", "## Commands", ""] + commands(runs)
    return "\n".join(lines) + "\n"


def render_readme_block(runs: list[dict]) -> str:
    rows = []
    for run in sorted((r for r in runs if _is_mindbridge(r) and r["metrics"].get("gate")), key=_order):
        m = run["metrics"]
        rows.append([_data(m), _num(m.get("rel")), _num(m.get("gen")), _num(m.get("loc")), _num(m.get("avg")),
                     _commit(run)])
    lines = [BEGIN] + _table(["data / file / seed (200 edits)", "Rel", "Gen", "Loc", "Avg", "commit"], rows)
    lines += ["", "All figures, the gate-off runs, the cross-model runs, the baselines and the commands: "
                  "[docs/results.md](docs/results.md).", END]
    return "\n".join(lines)


def with_readme_block(readme: str, block: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md has no results block ({BEGIN} ... {END}).")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + block + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    runs = load_runs()
    wanted = {DOC: render_doc(runs), README: with_readme_block(README.read_text(encoding="utf-8"),
                                                               render_readme_block(runs))}
    stale = [p for p, text in wanted.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is out of date: run python benchmarks/results_doc.py", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(wanted[p], encoding="utf-8")
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
