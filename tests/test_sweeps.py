"""Sweep files and the offline sweep runner (W&B's `sweeps` search engine, no W&B server).

Every file in sweeps/ is checked against W&B's schema, and every run it proposes is rendered the
way `wandb agent` renders it and composed with Hydra: a typo in a key or a group option fails here.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from reporting import sweep as sweep_mod
from reporting.sweep import OfflineSweep, SweepError, load_sweep, render_command
from tests.conftest import CONFIG_DIR, ROOT, compose

SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))
GROUPS = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}


def proposals(path: Path, limit: int = 16) -> list[dict]:
    """The runs the search engine proposes for a file (a grid fully; random/bayes the first few)."""
    import sweeps
    config = load_sweep(path)
    runs, out = [], []
    while len(out) < limit:
        run = sweeps.next_run(config, runs)
        if run is None:
            break
        run.state = "finished"
        run.summary_metrics = {config["metric"]["name"]: float(len(out))}
        runs.append(run)
        out.append(sweep_mod.run_parameters(run))
    return out


def test_there_is_a_sweep_for_each_ablation_in_the_paper():
    names = {p.stem for p in SWEEP_FILES}
    assert {"loss_ablation", "encoder_ablation", "bridge_ablation", "num_edits", "method_comparison"} <= names


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_file_is_a_valid_wandb_sweep(path):
    import sweeps
    raw = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(raw) == []
    assert (ROOT / raw["program"]).is_file()
    # Parameters reach train.py as Hydra overrides (key=value), as `wandb agent` renders them.
    assert "${args_no_hyphens}" in raw["command"] and "${program}" in raw["command"]
    assert raw["metric"]["name"] in ("rel", "gen", "loc", "avg")
    assert proposals(path), "the search engine proposes no run"


@pytest.mark.parametrize("path,params", [pytest.param(path, p, id=f"{path.stem}-{i}")
                                         for path in SWEEP_FILES for i, p in enumerate(proposals(path))])
def test_every_proposed_run_composes_with_hydra(path, params, tmp_path):
    missing = [f"configs/{k}/{v}.yaml" for k, v in params.items()
               if k in GROUPS and not (Path(CONFIG_DIR) / k / f"{v}.yaml").is_file()]
    if missing and params.get("stage") in ("wise", "unike"):
        pytest.skip(f"{', '.join(missing)} not written yet (stage=wise/unike are being added by other issues)")
    argv = render_command(load_sweep(path), params, interpreter="python")
    at = argv.index("train.py")
    overrides = argv[at + 1:]
    cfg = compose([*overrides, f"run_dir={tmp_path}"])
    OmegaConf.resolve(cfg)
    for key, value in params.items():
        if key in GROUPS:                     # a config group option: the composed group carries its name
            assert cfg[key].name == value, key
        else:
            assert OmegaConf.select(cfg, key) == value, key
    assert cfg.logger._target_.endswith("WandbLogger")


def test_command_is_rendered_like_wandb_agent():
    config = load_sweep(ROOT / "sweeps" / "loss_ablation.yaml")
    params = {"model.pretrain.lambda_exist": 0.0, "data.num_edits": 50, "flag": True}
    argv = render_command(config, params, interpreter="/venv/python", program="train.py")
    assert argv == ["/usr/bin/env", "/venv/python", "train.py", "logger=wandb",
                    "model.pretrain.lambda_exist=0.0", "data.num_edits=50", "flag=True"]


def test_loss_ablation_grid_is_the_four_rows_of_table_2():
    rows = {(p["model.pretrain.lambda_associate"], p["model.pretrain.lambda_exist"])
            for p in proposals(ROOT / "sweeps" / "loss_ablation.yaml")}
    assert rows == {(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)}


def test_method_comparison_names_every_method():
    stages = {p["stage"] for p in proposals(ROOT / "sweeps" / "method_comparison.yaml")}
    assert stages == {"default", "neuraldb", "wise", "unike"}


# ---- the runner with a stand-in program (seconds): bookkeeping, bayes feedback, resume ---------------
FAKE_TRAIN = '''
import json, math, sys
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:])
run_dir = Path(args["hydra.run.dir"])
x = float(args.get("x", 0.0))
if args.get("fail") == "True":
    sys.exit(1)
avg = 100 - 100 * (x - 0.3) ** 2
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "metrics.json").write_text(json.dumps({"method": "fake", "rel": avg, "gen": avg, "loc": avg, "avg": avg,
                                                  "args": " ".join(sys.argv[1:])}))
'''


def _fake_sweep(tmp_path: Path, method: str, parameters: dict, **extra) -> Path:
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    sweep = {"program": str(tmp_path / "fake_train.py"), "method": method,
             "metric": {"name": "avg", "goal": "maximize"}, "parameters": parameters,
             "command": ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"], **extra}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_bayes_sweep_feeds_each_finished_runs_metric_back(tmp_path, monkeypatch):
    import sweeps
    path = _fake_sweep(tmp_path, "bayes", {"x": {"min": 0.0, "max": 1.0}})
    seen: list[list] = []
    real = sweeps.next_run

    def spy(config, runs, *a, **k):
        seen.append([(r.state, dict(r.summary_metrics)) for r in runs])
        return real(config, runs, *a, **k)
    monkeypatch.setattr(sweeps, "next_run", spy)
    records = OfflineSweep(path, tmp_path / "out").run(count=3, echo=lambda *_: None)
    assert [r["state"] for r in records] == ["finished"] * 3
    assert [len(s) for s in seen] == [0, 1, 2]
    for history, record in zip(seen[1:], records):
        state, summary = history[-1]
        assert state == "finished" and summary["avg"] == pytest.approx(record["metrics"]["avg"])
    # The search engine saw real metric values: each equals the program's function of x.
    for r in records:
        assert r["metrics"]["avg"] == pytest.approx(100 - 100 * (r["params"]["x"] - 0.3) ** 2)


def test_random_sweep_needs_a_count_and_respects_run_cap(tmp_path):
    path = _fake_sweep(tmp_path, "random", {"x": {"min": 0.0, "max": 1.0}})
    with pytest.raises(SweepError, match="--count"):
        OfflineSweep(path, tmp_path / "a").run()
    capped = _fake_sweep(tmp_path, "random", {"x": {"min": 0.0, "max": 1.0}}, run_cap=2)
    assert len(OfflineSweep(capped, tmp_path / "b").run(echo=lambda *_: None)) == 2


def test_grid_sweep_resumes_where_it_stopped_and_reruns_failures(tmp_path):
    path = _fake_sweep(tmp_path, "grid", {"x": {"values": [0.1, 0.2, 0.3]}, "fail": {"values": [False, True]}})
    first = OfflineSweep(path, tmp_path / "out").run(count=2, echo=lambda *_: None)
    assert len(first) == 2
    rest = OfflineSweep(path, tmp_path / "out").run(echo=lambda *_: None)
    state = json.loads((tmp_path / "out" / "sweep.json").read_text())
    done = [(r["params"]["x"], r["params"]["fail"]) for r in state["runs"]]
    assert len(first) + len(rest) == 6 and len(set(done)) == 6
    assert {r["state"] for r in state["runs"] if r["params"]["fail"]} == {"failed"}
    # Running again keeps the three finished runs and retries only the failed ones.
    again = OfflineSweep(path, tmp_path / "out").run(echo=lambda *_: None)
    assert sorted(r["params"]["x"] for r in again) == [0.1, 0.2, 0.3] and all(r["params"]["fail"] for r in again)


RENDEZVOUS = """
import sys, time
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:])
meeting = Path(args["meeting"])
(meeting / args["x"]).write_text("started")
deadline = time.monotonic() + 60
while len(list(meeting.iterdir())) < int(args["expect"]):     # waits for the other run to start
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.05)
run_dir = Path(args["hydra.run.dir"])
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "metrics.json").write_text('{"avg": %s}' % args["x"])
"""


def test_jobs_run_grid_points_at_once_each_exactly_once(tmp_path):
    """Two jobs: both runs of a pair are alive together (each waits for the other to start)."""
    (tmp_path / "meet").mkdir()
    path = _fake_sweep(tmp_path, "grid", {"x": {"values": [1, 2, 3, 4]}, "expect": {"value": 2},
                                          "meeting": {"value": str(tmp_path / "meet")}})
    (tmp_path / "fake_train.py").write_text(RENDEZVOUS)
    records = OfflineSweep(path, tmp_path / "out").run(count=2, jobs=2, echo=lambda *_: None)
    assert sorted(r["params"]["x"] for r in records) == [1, 2]
    assert [r["state"] for r in records] == ["finished", "finished"]
    # The rest resumes from sweep.json with two jobs as well; no grid point runs twice.
    for f in (tmp_path / "meet").iterdir():
        f.unlink()
    rest = OfflineSweep(path, tmp_path / "out").run(jobs=2, echo=lambda *_: None)
    assert sorted(r["params"]["x"] for r in rest) == [3, 4] and {r["state"] for r in rest} == {"finished"}
    state = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert sorted(r["params"]["x"] for r in state["runs"]) == [1, 2, 3, 4]
    with pytest.raises(SweepError, match="--jobs"):
        OfflineSweep(path, tmp_path / "other").run(jobs=0)


def test_runs_get_the_agents_environment_and_their_own_run_dir(tmp_path):
    path = _fake_sweep(tmp_path, "grid", {"x": {"values": [0.5]}})
    (record,) = OfflineSweep(path, tmp_path / "out", ["extra=1"]).run(echo=lambda *_: None)
    run_dir = Path(record["run_dir"])
    assert run_dir.parent == (tmp_path / "out").resolve() and run_dir.name == record["id"]
    assert record["metrics"]["args"] == f"x=0.5 extra=1 hydra.run.dir={run_dir}"
    params = yaml.safe_load((run_dir / "sweep_params.yaml").read_text())
    assert params["x"] == {"value": 0.5}          # the file `wandb agent` writes for wandb.init


def test_bad_sweep_files_are_refused_in_one_sentence(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"program": "train.py", "method": "grid", "parameters": {"x": {"valuez": [1]}}}))
    with pytest.raises(SweepError, match="not a valid W&B sweep"):
        load_sweep(bad)
    assert sweep_mod.main([str(bad), "--dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Sweep file") and err.count("\n") == 1
    with pytest.raises(SweepError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")
    unknown = _fake_sweep(tmp_path, "grid", {"x": {"values": [1]}})
    config = load_sweep(unknown)
    config["command"] = ["${env}", "${interpreter}", "${program}", "${args_json_file}"]
    with pytest.raises(SweepError, match="not supported offline"):
        render_command(config, {"x": 1})


def test_failed_runs_make_a_nonzero_exit(tmp_path):
    path = _fake_sweep(tmp_path, "grid", {"fail": {"values": [True]}})
    assert sweep_mod.main([str(path), "--dir", str(tmp_path / "o"), "--no-report"]) == 1


# ---- end to end on tiny models -------------------------------------------------------------------
TINY = ["debug=fast", "threads=1", "callbacks.progress=null", "data.num_edits=8", "model.pretrain.batch_size=4",
        "model.pretrain.inject_epochs=1", "model.pretrain.heads_epochs=1", "model.pretrain.joint_epochs=1",
        "model.bridge.epochs=1"]


def test_loss_ablation_sweep_runs_offline_end_to_end(tmp_path, monkeypatch):
    """The real sweep file, train.py as subprocesses on tiny models, offline W&B runs, the report."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "sweep"
    code = sweep_mod.main([str(ROOT / "sweeps" / "loss_ablation.yaml"), "--dir", str(out), "--", *TINY])
    assert code == 0
    state = json.loads((out / "sweep.json").read_text())
    assert [r["state"] for r in state["runs"]] == ["finished"] * 4
    for r in state["runs"]:
        run_dir = Path(r["run_dir"])
        assert r["command"][:3] == ["/usr/bin/env", sys.executable, str(ROOT / "train.py")]
        offline = list((run_dir / "wandb").glob("offline-run-*"))
        assert offline and list(offline[0].glob("*.wandb")), "no offline W&B run to sync"
        assert offline[0].name.endswith(r["id"])             # the W&B run id is the sweep's run id
        # The final figures reach the W&B run (a sweep's metric is read from there online):
        # protobuf items keyed "avg" and "rel_em" (length-prefixed strings) in the run's record file.
        data = next(offline[0].glob("*.wandb")).read_bytes()
        assert b"\x03avg" in data and b"\x06rel_em" in data
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["avg"] == pytest.approx(r["metrics"]["avg"])
    table = (out / "report" / "ablation.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| losses")]
    assert [row.split("|")[1].strip() for row in rows] == ["L_inject", "+ L_associate", "+ L_exist", "all three"]
    assert (out / "report" / "ablation.csv").is_file()
    assert (out / "report" / "tsne.png").read_bytes()[:4] == b"\x89PNG"
