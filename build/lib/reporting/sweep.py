"""Run a W&B sweep file without a W&B server.

    python sweep.py sweeps/loss_ablation.yaml [--dir DIR] [--count N] [-- extra Hydra overrides]

W&B's own search engine (the `sweeps` package: grid, random, bayes) proposes each run from the
sweep file and the runs so far; the command is rendered the way `wandb agent` renders it
(`${env} ${interpreter} ${program} ${args_no_hyphens}`, the parameters as Hydra overrides) plus
`hydra.run.dir=<sweep dir>/<run id>`. Every run is an offline W&B run (WANDB_MODE=offline unless
set) carrying the sweep parameters as its config and the sweep name as its group; upload them later
with `wandb sync <sweep dir>/*/wandb/offline-run-*`. Bayes gets every finished run's metric back.

The sweep directory holds `sweep.json` (the sweep file and every run's parameters, state and
metric), so running the same command again resumes: finished runs are kept, the others rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import yaml

STATE_FILE = "sweep.json"
# `wandb agent`'s command when a sweep file has none.
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]


class SweepError(ValueError):
    """A sweep file or sweep directory the runner cannot use (one sentence for the user)."""


def search_engine():
    """The `sweeps` package (its pydantic-1 style config warns on import under pydantic 2)."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Valid config keys have changed in V2")
        import sweeps
    return sweeps


def load_sweep(path: str | Path) -> dict:
    """Read and validate a sweep file with the `sweeps` package's W&B schema."""
    import jsonschema
    sweeps = search_engine()
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"Sweep file {path} does not exist.")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SweepError(f"Sweep file {path} is not valid YAML ({exc.__class__.__name__}).") from exc
    if not isinstance(config, dict):
        raise SweepError(f"Sweep file {path} must hold a mapping (program, method, parameters, ...).")
    # run_cap is a W&B server setting that the `sweeps` 0.2.0 schema predates.
    run_cap = config.pop("run_cap", None)
    try:
        problems = sweeps.schema_violations_from_proposed_config(config)
    except ValueError as exc:
        problems = [str(exc)]
    if problems:
        raise SweepError(f"Sweep file {path} is not a valid W&B sweep: {'; '.join(problems)}.")
    try:
        filled = dict(sweeps.SweepConfig(config))        # fills the schema's defaults (e.g. bayes impute)
    except (jsonschema.ValidationError, ValueError) as exc:
        raise SweepError(f"Sweep file {path} is not a valid W&B sweep: {exc}.") from exc
    if run_cap is not None:
        if not isinstance(run_cap, int) or run_cap < 1:
            raise SweepError(f"Sweep file {path}: run_cap must be a positive integer.")
        filled["run_cap"] = run_cap
    return filled


def plain(value: Any) -> Any:
    """numpy scalars from the search engine -> Python values (for JSON, YAML and the command line)."""
    return value.item() if hasattr(value, "item") else value


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_parameters(run) -> dict[str, Any]:
    """A proposed run's parameters, `{name: value}`, in the sweep file's order."""
    return {k: plain(v["value"]) for k, v in run.config.items()}


def render_command(sweep: dict, params: dict[str, Any], interpreter: str = sys.executable,
                   program: str | None = None) -> list[str]:
    """The argv `wandb agent` would run for these parameters (macros filled in the same way)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args
    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros.update(env=["/usr/bin/env"], interpreter=[interpreter], program=[program or sweep["program"]])
    argv: list[str] = []
    for chunk in create_sweep_command(list(sweep.get("command") or DEFAULT_COMMAND)):
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            name = chunk[2:-1]
            if name not in macros or name == "args_json_file":
                raise SweepError(f"The sweep command macro {chunk} is not supported offline; use "
                                 "${args_no_hyphens} (Hydra overrides).")
            argv += [str(a) for a in macros[name]]
        else:
            argv.append(chunk)
    return argv


class OfflineSweep:
    """One sweep directory: its state file, the search engine's proposals and the launched runs."""

    def __init__(self, sweep_file: str | Path, out_dir: str | Path, extra_overrides: list[str] = (),
                 wandb_mode: str | None = None):
        self.sweep_file = Path(sweep_file)
        self.sweep = load_sweep(self.sweep_file)
        self.name = self.sweep.get("name") or self.sweep_file.stem
        self.out_dir = Path(out_dir).resolve()
        self.extra = list(extra_overrides)
        self.wandb_mode = wandb_mode or os.environ.get("WANDB_MODE") or "offline"
        self.records: list[dict] = []
        state = self.out_dir / STATE_FILE
        if state.is_file():
            saved = json.loads(state.read_text(encoding="utf-8"))
            if saved.get("sweep", {}).get("parameters") != self.sweep["parameters"]:
                raise SweepError(f"{self.out_dir} belongs to a sweep with other parameters; choose another --dir.")
            # Resume: keep finished runs, run the others again.
            self.records = [r for r in saved["runs"] if r["state"] == "finished"]

    # -- the search engine ------------------------------------------------------------------
    def sweep_runs(self) -> list:
        """Runs so far as the search engine sees them (bayes reads `summary_metrics`)."""
        SweepRun = search_engine().SweepRun
        # By alias: under pydantic 2, `summary_metrics=` would be dropped silently.
        return [SweepRun(name=r["id"], state=r["state"], config={k: {"value": v} for k, v in r["params"].items()},
                         summaryMetrics=_numbers(r.get("metrics") or {})) for r in self.records]

    def propose(self) -> dict[str, Any] | None:
        """The next run's parameters, or None when a grid is exhausted."""
        run = search_engine().next_run(self.sweep, self.sweep_runs())
        return None if run is None else run_parameters(run)

    # -- launching ---------------------------------------------------------------------------
    def program(self) -> str:
        """The program's absolute path: relative to the working directory, as `wandb agent` runs it,
        else to the project (so `python sweep.py` works from anywhere)."""
        program = Path(self.sweep["program"])
        if not program.is_absolute() and not program.exists():
            program = Path(__file__).resolve().parents[1] / program
        return str(program.resolve())

    def start(self, params: dict[str, Any]) -> "_Running":
        """Start train.py for these parameters (a subprocess with the agent's environment)."""
        from wandb.sdk.lib.config_util import save_config_file_from_dict
        from wandb.sdk.lib.runid import generate_id    # the id format W&B gives its runs
        run_id = generate_id()
        run_dir = self.out_dir / run_id
        run_dir.mkdir(parents=True)
        # The parameters file `wandb agent` hands a run (wandb.init reads it into the run's config).
        params_file = run_dir / "sweep_params.yaml"
        save_config_file_from_dict(str(params_file), {k: {"value": v} for k, v in params.items()})
        argv = render_command(self.sweep, params, program=self.program()) + self.extra + [f"hydra.run.dir={run_dir}"]
        env = {**os.environ, "WANDB_MODE": self.wandb_mode, "WANDB_RUN_ID": run_id, "WANDB_RUN_GROUP": self.name,
               "WANDB_JOB_TYPE": "sweep", "WANDB_SWEEP_PARAM_PATH": str(params_file)}
        record = {"id": run_id, "params": params, "extra_overrides": self.extra, "command": argv,
                  "run_dir": str(run_dir), "log": str(run_dir / "train.log"), "state": "running"}
        self.records.append(record)
        self.save()
        log = open(run_dir / "train.log", "w", encoding="utf-8")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        return _Running(record, proc, log, time.perf_counter())

    def finish(self, running: "_Running") -> dict:
        """Record a started run that has exited: finished with its metrics.json, else failed."""
        running.log.close()
        record, code = running.record, running.proc.returncode
        metrics_file = Path(record["run_dir"]) / "metrics.json"
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else None
        finished = code == 0 and metrics is not None
        record.update(state="finished" if finished else "failed", exitcode=code,
                      seconds=time.perf_counter() - running.started, metrics=metrics if finished else None)
        self.save()
        return record

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {"sweep_file": str(self.sweep_file), "name": self.name, "sweep": self.sweep, "runs": self.records}
        tmp = self.out_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2, default=plain), encoding="utf-8")
        os.replace(tmp, self.out_dir / STATE_FILE)

    def run(self, count: int | None = None, echo=print, jobs: int = 1) -> list[dict]:
        """Propose and launch runs until the grid is done, `count` runs were launched, or run_cap.

        `jobs` runs go at once (like that many `wandb agent`s on one sweep): the search engine sees
        the running ones, so a grid never proposes a running point twice and bayes imputes them.
        """
        method, cap = self.sweep["method"], self.sweep.get("run_cap")
        if method != "grid" and count is None and cap is None:
            raise SweepError(f"A {method} sweep never ends by itself: pass --count N or set run_cap in the sweep file.")
        if jobs < 1:
            raise SweepError("--jobs must be at least 1.")
        launched: list[dict] = []
        active: list[_Running] = []
        metric = (self.sweep.get("metric") or {}).get("name")
        exhausted = False
        try:
            while True:
                while (not exhausted and len(active) < jobs and (count is None or len(launched) < count)
                       and (cap is None or len(self.records) < cap)):
                    params = self.propose()
                    if params is None:
                        exhausted = True
                        break
                    shown = " ".join(f"{k}={v}" for k, v in params.items())
                    echo(f"[{self.name}] run {len(self.records) + 1}: {shown}")
                    active.append(self.start(params))
                    launched.append(active[-1].record)
                if not active:
                    break
                while not any(r.proc.poll() is not None for r in active):
                    time.sleep(0.2)
                for running in [r for r in active if r.proc.poll() is not None]:
                    active.remove(running)
                    record = self.finish(running)
                    if record["state"] == "finished":
                        value = (record["metrics"] or {}).get(metric)
                        echo(f"[{self.name}]   run {record['id']} finished in {record['seconds']:.0f} s"
                             + (f", {metric} = {value:.2f}" if isinstance(value, (int, float)) else ""))
                    else:
                        echo(f"[{self.name}]   run {record['id']} FAILED (exit {record['exitcode']}); "
                             f"log: {record['log']}")
        finally:
            for running in active:       # interrupted: stop the runs still going (they rerun on resume)
                running.proc.terminate()
                running.proc.wait()
                self.finish(running)
        return launched


class _Running(NamedTuple):
    """A started run: its record, process, open log and start time."""
    record: dict
    proc: subprocess.Popen
    log: Any
    started: float


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:                         # everything after -- is appended to every run's overrides
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_file", help="a W&B sweep YAML, e.g. sweeps/loss_ablation.yaml")
    parser.add_argument("--dir", help="sweep directory (default: outputs/sweeps/<sweep name>); reuse it to resume")
    parser.add_argument("--count", type=int, help="launch at most this many runs (required for random/bayes "
                                                  "unless the file sets run_cap)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1), like that many agents")
    parser.add_argument("--wandb-mode", choices=["offline", "online", "disabled"],
                        help="WANDB_MODE of the runs (default: $WANDB_MODE, else offline)")
    parser.add_argument("--no-report", action="store_true", help="do not write <dir>/report at the end")
    args = parser.parse_args(argv)
    try:
        name = load_sweep(args.sweep_file).get("name") or Path(args.sweep_file).stem
        sweep = OfflineSweep(args.sweep_file, args.dir or Path("outputs") / "sweeps" / name, extra, args.wandb_mode)
        sweep.run(args.count, jobs=args.jobs)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"sweep directory: {sweep.out_dir}")
    if not args.no_report:
        from reporting.report import write_report
        written = write_report([sweep.out_dir], sweep.out_dir / "report", print_tables=True)
        print(f"report: {', '.join(str(p) for p in written)}")
    failed = [r for r in sweep.records if r["state"] != "finished"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
