"""Paper-style tables (Markdown + CSV) and figures from finished runs.

    python report.py outputs/sweeps/loss_ablation [more run or sweep dirs] [--out DIR] [--logger wandb]

Every `metrics.json` under the given directories is one run (a `stage=crossmodel` run adds one
per LLM under `llms/<name>/`). What a run changed is read from Hydra's record of it
(`.hydra/config.yaml`, `.hydra/overrides.yaml`), so runs launched by `sweep.py`, by `wandb agent`
or by hand are reported the same way. Tables written to `--out`:

- `runs`: one row per run: what it varied and Rel/Gen/Loc/Avg (always);
- `methods`: method x dataset, Rel/Gen/Loc/Avg (mean over runs of the same cell, with the count);
- `ablation`: the Stage I loss ablation (paper Table 2), rows by which losses were on;
- `llms`: method x LLM x dataset (paper Tables 1/3/6), when the runs hold more than one LLM.

Figures (PNG): ablation bars, the scaling curve over the number of edits (paper Fig. 5) and a
t-SNE of the memory encoder's features (paper Fig. 4) for the memories the runs wrote.
With `--logger wandb` the tables and figures also go to a W&B run (offline unless WANDB_MODE says
otherwise).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import yaml

METRICS = ("rel", "gen", "loc", "avg")
# CounterFact's probability comparison (NeuralDB Eqs. 13-15), present only for CounterFact runs.
PROB_METRICS = ("rel_prob", "gen_prob", "loc_prob")
LOSSES = ("inject", "associate", "exist")
# Paper Table 2 row names and order.
ABLATION_ROWS = {("inject",): "L_inject", ("inject", "associate"): "+ L_associate",
                 ("inject", "exist"): "+ L_exist", ("inject", "associate", "exist"): "all three"}


# ---- collecting runs -----------------------------------------------------------------------------
def _hydra_dir(run_dir: Path, root: Path) -> Path | None:
    """The `.hydra` folder of the run that wrote `run_dir` (a crossmodel sub-run uses its parent's)."""
    for d in (run_dir, *run_dir.parents):
        if (d / ".hydra" / "config.yaml").is_file():
            return d / ".hydra"
        if d == root:
            break
    return None


def _overrides(hydra_dir: Path | None) -> dict[str, str]:
    """The run's command-line overrides as {key: value} (Hydra's own output settings left out)."""
    if hydra_dir is None or not (hydra_dir / "overrides.yaml").is_file():
        return {}
    out = {}
    for item in yaml.safe_load((hydra_dir / "overrides.yaml").read_text(encoding="utf-8")) or []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra.") and key not in ("threads", "run_dir"):
            out[key] = value
    return out


def _config_values(hydra_dir: Path | None) -> dict[str, Any]:
    """The run-defining settings a report groups by, read from the composed config."""
    if hydra_dir is None:
        return {}
    cfg = yaml.safe_load((hydra_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    model, enc = cfg.get("model") or {}, cfg.get("encoder") or {}
    pre, bridge = model.get("pretrain") or {}, model.get("bridge") or {}
    out: dict[str, Any] = {"stage_jobs": ",".join(map(str, (cfg.get("stage") or {}).get("jobs") or []))}
    if pre:
        out.update({f"lambda_{k}": pre.get(f"lambda_{k}") for k in LOSSES})
    if bridge:
        out.update({"lambda_kl": bridge.get("lambda_kl"), "projector_depth": (bridge.get("projector") or {}).get("depth")})
    if enc:
        # A hub encoder is named by its checkpoint (the encoder ablation swaps hub ids).
        out["encoder_label"] = enc.get("hub_id") if enc.get("source") == "hub" else enc.get("name")
    return out


def load_run(metrics_file: Path, root: Path) -> dict[str, Any]:
    """One run: its metrics.json plus what its config and overrides say about it."""
    run_dir = metrics_file.parent
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{metrics_file} is not valid JSON ({exc.msg}, line {exc.lineno}).") from exc
    if not isinstance(metrics, dict):
        raise ValueError(f"{metrics_file} must hold one JSON object.")
    hydra_dir = _hydra_dir(run_dir, root)
    run = {**_config_values(hydra_dir), **metrics, "run_dir": str(run_dir), "run": run_dir.name}
    overrides = _overrides(hydra_dir)
    if run_dir.parent.name == "llms":                # crossmodel: this LLM, not the parent's list
        overrides.pop("stage.llms", None)
        overrides["llm"] = run_dir.name
        run.setdefault("llm", run_dir.name)
    run["overrides"] = overrides
    if run.get("encoder") == "none":     # a baseline: the config's encoder group was composed but not used
        run["encoder_label"] = "none"
    run.setdefault("encoder_label", run.get("encoder"))
    return run


def collect_runs(roots: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every run (a metrics.json with edit-quality figures) under the given directories."""
    runs = []
    for root in map(Path, roots):
        if not root.exists():
            raise ValueError(f"{root} does not exist.")
        files = [root] if root.is_file() else sorted(root.rglob("metrics.json"))
        for f in files:
            run = load_run(f, root if root.is_dir() else f.parent)
            if all(isinstance(run.get(k), (int, float)) for k in METRICS):   # e.g. stage=pretrain has none
                runs.append(run)
    return runs


def varied_keys(runs: list[dict]) -> list[str]:
    """Overrides whose value differs between the runs (what a sweep swept)."""
    keys = sorted({k for r in runs for k in r["overrides"]})
    return [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1]


# ---- tables --------------------------------------------------------------------------------------
class Table:
    """Column names plus rows of cells; renders as Markdown and CSV."""

    def __init__(self, name: str, title: str, columns: list[str], rows: list[list[Any]]):
        self.name, self.title, self.columns, self.rows = name, title, columns, rows

    @staticmethod
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.2f}"
        return "–" if v is None else str(v)

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(self.cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path) -> list[Path]:
        md, cs = out_dir / f"{self.name}.md", out_dir / f"{self.name}.csv"
        md.write_text(self.markdown(), encoding="utf-8")
        with open(cs, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(self.columns)
            w.writerows([["" if v is None else v for v in row] for row in self.rows])
        return [md, cs]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _grouped(runs: list[dict], row_key, col_key) -> tuple[list, list, dict]:
    """Mean of each metric per (row, column) cell, with the number of runs behind it."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        cells[(row_key(r), col_key(r))].append(r)
    rows = list(dict.fromkeys(k[0] for k in cells))
    cols = sorted(dict.fromkeys(k[1] for k in cells), key=str)
    return rows, cols, cells


def _pivot(name: str, title: str, runs: list[dict], row_names: list[str], row_key, col_key,
           row_order: list | None = None, metrics: tuple[str, ...] = METRICS) -> Table:
    rows, cols, cells = _grouped(runs, row_key, col_key)
    if row_order is not None:
        rows = [r for r in row_order if r in rows]
    columns = [*row_names] + [f"{c} {m.capitalize()}" for c in cols for m in metrics] + ["runs"]
    body = []
    for row in rows:
        line = list(row) if isinstance(row, tuple) else [row]
        n = 0
        for c in cols:
            group = cells.get((row, c), [])
            n += len(group)
            line += [_mean([g[m] for g in group]) if group else None for m in metrics]
        body.append(line + [n])
    return Table(name, title, columns, body)


def runs_table(runs: list[dict]) -> Table:
    varied = varied_keys(runs)
    columns = ["run", "method", "llm", "encoder", "dataset", "num_edits", *varied, "pre_rel", "pre_gen",
               *METRICS, "edit_seconds"]
    rows = [[r["run"], r.get("method"), r.get("llm"), r.get("encoder_label"), r.get("dataset"), r.get("num_edits"),
             *[r["overrides"].get(k) for k in varied], r.get("pre_rel"), r.get("pre_gen"),
             *[r[m] for m in METRICS], r.get("edit_seconds")] for r in runs]
    return Table("runs", "Every run (EasyEdit token accuracy, %)", columns, rows)


def methods_table(runs: list[dict]) -> Table:
    return _pivot("methods", "Method x dataset (Rel / Gen / Loc / Avg, %)", runs, ["method"],
                  lambda r: r.get("method"), lambda r: r.get("dataset"))


def probability_table(runs: list[dict]) -> Table | None:
    """CounterFact runs scored as NeuralDB / ROME do: does the new object beat the true one?"""
    runs = [r for r in runs if all(isinstance(r.get(m), (int, float)) for m in PROB_METRICS)]
    if not runs:
        return None
    return _pivot("counterfact_prob", "CounterFact probability comparison (NeuralDB Efficacy / "
                  "Generalization / Specificity, %)", runs, ["method"], lambda r: r.get("method"),
                  lambda r: r.get("dataset"), metrics=PROB_METRICS)


def losses_on(run: dict) -> tuple[str, ...] | None:
    """Which Stage I losses had a non-zero weight (None for runs that did not pretrain a memory)."""
    if run.get("method") != "mindbridge" or run.get("lambda_inject") is None:
        return None
    return tuple(k for k in LOSSES if float(run.get(f"lambda_{k}") or 0.0) > 0)


def ablation_table(runs: list[dict]) -> Table | None:
    """Paper Table 2: one row per combination of Stage I losses (None if the runs do not vary them)."""
    runs = [r for r in runs if losses_on(r) is not None]
    if len({losses_on(r) for r in runs}) < 2:
        return None

    def label(r):
        on = losses_on(r)
        return ABLATION_ROWS.get(on) or (" + ".join(f"L_{k}" for k in on) or "no loss")
    order = list(ABLATION_ROWS.values()) + sorted({label(r) for r in runs} - set(ABLATION_ROWS.values()))
    return _pivot("ablation", "Stage I loss ablation (paper Table 2; Rel / Gen / Loc / Avg, %)", runs,
                  ["losses"], label, lambda r: r.get("dataset"), row_order=order)


def llms_table(runs: list[dict]) -> Table | None:
    if len({r.get("llm") for r in runs}) < 2:
        return None
    return _pivot("llms", "Per LLM (Rel / Gen / Loc / Avg, %)", runs, ["method", "llm"],
                  lambda r: (r.get("method"), r.get("llm")), lambda r: r.get("dataset"))


def build_tables(runs: list[dict]) -> list[Table]:
    tables = [runs_table(runs), methods_table(runs)]
    tables += [t for t in (probability_table(runs), ablation_table(runs), llms_table(runs)) if t is not None]
    return tables


# ---- writing -------------------------------------------------------------------------------------
def write_report(roots: Iterable[str | Path], out_dir: str | Path, tsne: list[str | Path] | None = None,
                 logger: str | None = None, print_tables: bool = False, tsne_points: int = 500) -> list[Path]:
    """Write every table (Markdown + CSV), `report.md` with all of them, and the figures."""
    from reporting import figures
    runs = collect_runs(roots)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not runs:
        raise ValueError(f"No finished runs (metrics.json with rel/gen/loc/avg) under {', '.join(map(str, roots))}.")
    tables = build_tables(runs)
    written: list[Path] = []
    for t in tables:
        written += t.write(out)
    pngs: list[Path] = []
    ablation = next((t for t in tables if t.name == "ablation"), None)
    if ablation is not None:
        pngs.append(figures.ablation_bars(ablation.records(), out / "ablation.png"))
    if figures.scaling_series(runs):
        pngs.append(figures.scaling_curve(runs, out / "scaling.png"))
    memories = [(Path(m).name, Path(m)) for m in tsne] if tsne else tsne_memories(runs)
    if memories:
        png, stats = figures.tsne_figure(memories, out / "tsne.png", max_points=tsne_points)
        (out / "tsne.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
        pngs.append(png)
        written.append(out / "tsne.json")
    text = "\n".join(t.markdown() for t in tables)
    text += "".join(f"\n![{p.stem}]({p.name})\n" for p in pngs)
    (out / "report.md").write_text(text, encoding="utf-8")
    written += [out / "report.md", *pngs]
    if print_tables:
        from rich.console import Console
        from rich.markdown import Markdown
        Console().print(Markdown("\n".join(t.markdown() for t in tables if t.name != "runs")))
    if logger == "wandb":
        log_to_wandb(tables, pngs, out)
    return written


def tsne_memories(runs: list[dict]) -> list[tuple[str, Path]]:
    """Memories to draw: one per Stage I loss combination (ablation), else the best run's."""
    found = []
    for r in sorted(runs, key=lambda r: -r["avg"]):
        # Where the run wrote it, else <run dir>/memory (a sweep directory that was moved).
        places = [Path(r["memory"])] if r.get("memory") else []
        memory = next((p for p in [*places, Path(r["run_dir"]) / "memory"] if (p / "manifest.json").is_file()), None)
        if memory is not None:
            found.append((r, memory))
    by_losses: dict[Any, tuple[dict, Path]] = {}
    for r, memory in found:
        by_losses.setdefault(losses_on(r), (r, memory))
    if len(by_losses) > 1:
        order = {k: i for i, k in enumerate(ABLATION_ROWS)}
        picked = sorted(by_losses.items(), key=lambda kv: order.get(kv[0], len(order)))
        return [(ABLATION_ROWS.get(k, str(k)), memory) for k, (_, memory) in picked]
    return [(f"{r.get('dataset')} · {r['run']}", memory) for r, memory in found[:1]]


def log_to_wandb(tables: list[Table], pngs: list[Path], out_dir: Path) -> None:
    """Tables as wandb.Table, figures as wandb.Image, in one run of job type `report`."""
    import os

    import wandb
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mindbridge"), job_type="report", dir=str(out_dir),
                     mode=os.environ.get("WANDB_MODE", "offline"))
    for t in tables:
        run.log({f"table/{t.name}": wandb.Table(columns=t.columns, data=[[Table.cell(v) if isinstance(v, float)
                                                                          else v for v in row] for row in t.rows])})
    run.log({f"figure/{p.stem}": wandb.Image(str(p)) for p in pngs})
    run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run directories, sweep directories or metrics.json files")
    parser.add_argument("--out", help="where to write the tables and figures (default: <first dir>/report)")
    parser.add_argument("--tsne", nargs="*", metavar="MEMORY_DIR",
                        help="memories for the t-SNE figure (default: those the runs wrote)")
    parser.add_argument("--tsne-points", type=int, default=500, help="prompts per group in the t-SNE (default 500)")
    parser.add_argument("--logger", choices=["none", "wandb"], default="none",
                        help="also log the tables and figures to W&B")
    args = parser.parse_args(argv)
    from mindbridge.artifacts import ArtifactError
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    try:
        written = write_report(args.dirs, out, tsne=args.tsne, logger=args.logger, print_tables=True,
                               tsne_points=args.tsne_points)
    except (ValueError, ArtifactError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
