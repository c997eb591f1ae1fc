"""report.py: paper-style tables (Markdown + CSV) and figures from runs' metrics.json files."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from reporting import figures, report


def fake_run(root: Path, name: str, overrides: list[str], config: dict | None = None, **metrics) -> Path:
    """A run directory as train.py leaves it: metrics.json and Hydra's record of the run."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    base = {"method": "mindbridge", "llm": "smollm2", "encoder": "minilm", "dataset": "zsre", "num_edits": 50,
            "pre_rel": 20.0, "pre_gen": 21.0, "edit_seconds": 10.0}
    (run / "metrics.json").write_text(json.dumps({**base, **metrics}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, "threads=1", f"hydra.run.dir={run}"]))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config or {}))
    return run


def losses_config(associate: float, exist: float) -> dict:
    return {"stage": {"jobs": ["pretrain", "bridge", "eval"]}, "encoder": {"name": "minilm", "source": "minilm_package"},
            "model": {"name": "mindbridge", "pretrain": {"lambda_inject": 1.0, "lambda_associate": associate,
                                                         "lambda_exist": exist},
                      "bridge": {"lambda_kl": 1.0, "projector": {"depth": 2}}}}


def scores(rel, gen, loc):
    return {"rel": rel, "gen": gen, "loc": loc, "avg": (rel + gen + loc) / 3}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def ablation_runs(tmp_path):
    root = tmp_path / "sweep"
    grid = {(0.0, 0.0): (70, 30, 40), (1.0, 0.0): (80, 60, 70), (0.0, 1.0): (75, 50, 88), (1.0, 1.0): (94, 80, 89)}
    for i, ((a, e), (rel, gen, loc)) in enumerate(grid.items()):
        fake_run(root, f"r{i}", [f"model.pretrain.lambda_associate={a}", f"model.pretrain.lambda_exist={e}"],
                 losses_config(a, e), **scores(rel, gen, loc))
    return root


def test_ablation_table_has_the_paper_rows_in_order(ablation_runs, tmp_path):
    out = tmp_path / "report"
    report.write_report([ablation_runs], out)
    rows = read_csv(out / "ablation.csv")
    assert [r["losses"] for r in rows] == ["L_inject", "+ L_associate", "+ L_exist", "all three"]
    assert float(rows[3]["zsre Avg"]) == pytest.approx((94 + 80 + 89) / 3)
    assert float(rows[2]["zsre Loc"]) == 88.0 and rows[0]["runs"] == "1"
    md = (out / "ablation.md").read_text()
    assert "| all three | 94.00 | 80.00 | 89.00 | 87.67 | 1 |" in md
    # Every run, with the two swept overrides as columns.
    runs = read_csv(out / "runs.csv")
    assert len(runs) == 4 and {"model.pretrain.lambda_associate", "model.pretrain.lambda_exist"} <= set(runs[0])
    assert "threads" not in runs[0] and "hydra.run.dir" not in runs[0]
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert "![ablation](ablation.png)" in (out / "report.md").read_text()


def test_method_table_averages_cells_and_counts_runs(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "mb0", ["data=zsre"], **scores(90, 60, 80))
    fake_run(root, "mb1", ["data=zsre"], **scores(80, 50, 90))
    fake_run(root, "mb2", ["data=counterfact"], dataset="counterfact", **scores(70, 40, 60))
    fake_run(root, "db0", ["stage=neuraldb"], {"encoder": {"name": "minilm", "source": "minilm_package"}},
             method="neuraldb", encoder="none", **scores(99, 40, 95))
    fake_run(root, "pretrain-only", ["stage=pretrain"], method="mindbridge")     # no scores: not a row
    tables = {t.name: t for t in report.build_tables(report.collect_runs([root]))}
    rows = {r["method"]: r for r in tables["methods"].records()}
    assert set(rows) == {"mindbridge", "neuraldb"}
    assert rows["mindbridge"]["zsre Rel"] == pytest.approx(85.0) and rows["mindbridge"]["runs"] == 3
    assert rows["mindbridge"]["counterfact Avg"] == pytest.approx(170 / 3)
    assert rows["neuraldb"]["counterfact Rel"] is None and rows["neuraldb"]["runs"] == 1
    assert "ablation" not in tables and "llms" not in tables     # nothing varied the losses or the LLM
    assert "| neuraldb | – | – | – | – | 99.00 |" in tables["methods"].markdown()   # counterfact first
    # A baseline composes the default encoder group but uses none: the runs table says so.
    encoders = {r["run"]: r["encoder"] for r in tables["runs"].records()}
    assert encoders["db0"] == "none" and encoders["mb0"] == "minilm"


def test_counterfact_probability_table_only_from_runs_that_have_it(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "zs", ["data=zsre"], **scores(90, 60, 80))
    prob = {"rel_prob": 99.0, "gen_prob": 80.0, "loc_prob": 90.0}
    fake_run(root, "cf0", ["data=counterfact_rome"], dataset="counterfact_rome", method="neuraldb",
             **scores(90, 30, 99), **prob)
    fake_run(root, "cf1", ["data=counterfact_rome", "seed=1"], dataset="counterfact_rome", method="neuraldb",
             **scores(92, 34, 97), **{**prob, "gen_prob": 90.0})
    tables = {t.name: t for t in report.build_tables(report.collect_runs([root]))}
    rows = tables["counterfact_prob"].records()
    assert rows == [{"method": "neuraldb", "counterfact_rome Rel_prob": 99.0, "counterfact_rome Gen_prob": 85.0,
                     "counterfact_rome Loc_prob": 90.0, "runs": 2}]
    only_zsre = tmp_path / "zsre_only"
    fake_run(only_zsre, "zs", ["data=zsre"], **scores(90, 60, 80))
    assert "counterfact_prob" not in {t.name for t in report.build_tables(report.collect_runs([only_zsre]))}


def test_per_llm_table_includes_crossmodel_sub_runs(tmp_path):
    root = tmp_path / "runs"
    parent = fake_run(root, "xm", ["stage=crossmodel", "stage.llms=[smollm2,gemma3]"], llms="smollm2,gemma3")
    (parent / "metrics.json").write_text(json.dumps({"method": "mindbridge", "stage": "crossmodel"}))
    for llm, s in (("smollm2", scores(83, 57, 85)), ("gemma3", scores(81, 56, 90))):
        d = parent / "llms" / llm
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"method": "mindbridge", "llm": llm, "dataset": "zsre", **s}))
    runs = report.collect_runs([root])
    assert sorted(r["llm"] for r in runs) == ["gemma3", "smollm2"]
    assert {r["overrides"]["llm"] for r in runs} == {"gemma3", "smollm2"}
    llms = {r["llm"]: r for r in report.llms_table(runs).records()}
    assert llms["gemma3"]["zsre Loc"] == 90.0 and llms["smollm2"]["method"] == "mindbridge"


def test_scaling_curve_over_the_number_of_edits(tmp_path):
    root = tmp_path / "runs"
    for n, s in ((50, scores(90, 60, 85)), (100, scores(88, 58, 84)), (200, scores(85, 57, 83))):
        fake_run(root, f"n{n}", [f"data.num_edits={n}"], num_edits=n, **s)
    out = tmp_path / "report"
    written = report.write_report([root], out)
    assert out / "scaling.png" in written and (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert report.varied_keys(report.collect_runs([root])) == ["data.num_edits"]
    # One edit count only: no curve to draw.
    assert figures.scaling_series(report.collect_runs([root / "n50"])) == {}


def test_bad_inputs_are_one_sentence_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty)]) == 2
    assert "No finished runs" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text("{not json")
    assert report.main([str(broken)]) == 2
    err = capsys.readouterr().err
    assert "is not valid JSON" in err and err.count("\n") == 1
    assert report.main([str(tmp_path / "nowhere")]) == 2


def test_tsne_of_a_real_memory_and_wandb_logging(tiny_cfg, tmp_path, monkeypatch):
    """A tiny memory written by stage=pretrain: t-SNE panels for I vs O, logged to an offline W&B run."""
    from omegaconf import OmegaConf

    from train import train
    run = tmp_path / "run"
    cfg = tiny_cfg("stage=default", "model.bridge.epochs=1", run_dir=run)
    metrics = train(cfg, run)
    # The report finds the O stream through the run's Hydra config, as train.py leaves it.
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["debug=fast"]))
    groups = figures.prompt_groups(run / "memory", max_points=1000)
    assert set(groups) == {"in-scope: edit prompts", "in-scope: paraphrases (unseen)",
                           "out-of-scope: non-edited records", "out-of-scope: locality prompts (unseen)"}
    assert len(groups["in-scope: edit prompts"]) == metrics["num_edits"]
    assert not set(groups["in-scope: edit prompts"]) & set(groups["out-of-scope: non-edited records"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "report"
    report.write_report([run], out, logger="wandb")
    stats = json.loads((out / "tsne.json").read_text())
    assert len(stats) == 1 and -1.0 <= stats[0]["silhouette_in_vs_out_cosine"] <= 1.0
    assert stats[0]["points"]["in-scope: edit prompts"] == metrics["num_edits"]
    assert (out / "tsne.png").read_bytes()[:4] == b"\x89PNG"
    offline = list((out / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))


def test_benchmarks_run_all_writes_method_costs(tmp_path):
    """benchmarks/run_all.py on tiny models: edit time, footprint, peak RSS, latency ratio, cross-model cost."""
    from benchmarks import run_all
    code = run_all.main(["--quick", "--only", "methods", "--methods", "mindbridge", "--threads", "1",
                         "--latency-prompts", "1", "--repeats", "1", "--tokens", "2", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "methods.json").read_text())
    row = result["methods"]["mindbridge"]
    assert row["ok"] and row["num_edits"] == 8 and row["edit_seconds"] > 0 and row["peak_rss_mb"] > 0
    assert row["added"]["params_added_total"] == row["added"]["memory_encoder_params"] + row["added"]["projector_params"]
    assert row["inference"]["latency_ratio"] > 0 and row["inference"]["tokens"] == 2
    cross = result["cross_model"]["mindbridge"]
    assert cross["ok"] and cross["what"] == "bridge the existing memory" and cross["seconds"] > 0
    assert "| mindbridge |" in (tmp_path / "methods.md").read_text()
    assert not row.get("reused") and not cross.get("reused")
    # Run again: both finished train.py runs are reused (an interrupted benchmark resumes), and a
    # run recorded for another command is trained again.
    assert run_all.main(["--quick", "--only", "methods", "--methods", "mindbridge", "--threads", "1",
                         "--latency-prompts", "1", "--repeats", "1", "--tokens", "2", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "methods.json").read_text())
    assert again["methods"]["mindbridge"]["reused"] and again["cross_model"]["mindbridge"]["reused"]
    assert again["methods"]["mindbridge"]["process_seconds"] == row["process_seconds"]
    assert again["methods"]["mindbridge"]["rel"] == row["rel"]
