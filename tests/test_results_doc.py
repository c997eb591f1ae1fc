"""The published figures: runs are recorded with their commit, and docs/results.md and the README's
results table are what the recorded runs generate."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import record_run  # noqa: E402
import results_doc  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _run_dir(tmp_path: Path, name: str = "run", **metrics) -> Path:
    run = tmp_path / name
    run.mkdir()
    base = {"method": "mindbridge", "llm": "smollm2", "dataset": "zsre", "data_seed": 0, "num_edits": 200,
            "rel": 98.0, "gen": 90.0, "loc": 100.0, "avg": 96.0, "gate": True, "gate_open_rate_gen": 99.0,
            "gate_open_rate_loc": 0.0, "pretrain_seconds": 300.0, "bridge_seconds": 250.0, "eval_seconds": 60.0,
            "edit_seconds": 550.0, "command": "python train.py", "code_commit": COMMIT, "code_dirty": False}
    (run / "metrics.json").write_text(json.dumps({**base, **metrics}))
    return run


def test_a_recorded_run_keeps_its_command_and_commit(tmp_path):
    out = tmp_path / "runs"
    path = record_run.record(_run_dir(tmp_path), "default_zsre_s0", out)
    rec = json.loads(path.read_text())
    assert rec["name"] == "default_zsre_s0" and rec["code_commit"] == COMMIT
    assert rec["command"] == "python train.py" and rec["metrics"]["rel"] == 98.0


def test_a_cross_model_run_keeps_every_llm(tmp_path):
    run = _run_dir(tmp_path, stage="crossmodel")
    for name in ("smollm2", "gemma3"):
        (run / "llms" / name).mkdir(parents=True)
        (run / "llms" / name / "metrics.json").write_text(json.dumps({"rel": 97.0, "bridge_seconds": 10.0}))
    rec = json.loads(record_run.record(run, "crossmodel", tmp_path / "runs").read_text())
    assert set(rec["llms"]) == {"smollm2", "gemma3"}


@pytest.mark.parametrize("metrics, message", [({"code_dirty": True}, "uncommitted"),
                                              ({"code_commit": None}, "names no code commit")])
def test_runs_of_code_nobody_can_check_out_are_refused(tmp_path, metrics, message):
    out = tmp_path / "runs"
    with pytest.raises(record_run.RecordError, match=message):
        record_run.record(_run_dir(tmp_path, **metrics), "x", out)
    assert not out.exists() or not list(out.iterdir())


def test_a_folder_without_metrics_is_one_sentence_and_a_nonzero_exit(tmp_path, capsys):
    assert record_run.main([str(tmp_path), "x", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_the_doc_shows_every_run_and_groups_methods_on_the_same_edits(tmp_path):
    out = tmp_path / "runs"
    record_run.record(_run_dir(tmp_path, "mb"), "mb_zsre_s0", out)
    record_run.record(_run_dir(tmp_path, "off", gate=False, loc=91.5), "mb_off_zsre_s0", out)
    record_run.record(_run_dir(tmp_path, "ndb", method="neuraldb", avg=92.1, rel=96.2), "neuraldb_zsre_s0", out)
    runs = results_doc.load_runs(out)
    doc = results_doc.render_doc(runs)
    assert "| mb_zsre_s0 | zsre / bundled / seed 0 | 98.00 | 90.00 | 100.00 | 96.00 |" in doc
    assert "gate off" in doc and "| mb_off_zsre_s0 |" in doc
    methods = doc.split("## Methods on the same edits")[1]
    # The gated MindBridge and NeuralDB are compared, best Avg first; the gate-off run is not.
    assert methods.index("| mindbridge |") < methods.index("| neuraldb |") and "91.50" not in methods.split("## Commands")[0]
    assert f"`{COMMIT[:10]}`" in doc and "`python train.py`" in doc
    block = results_doc.render_readme_block(runs)
    assert block.startswith(results_doc.BEGIN) and block.endswith(results_doc.END) and "mb_off" not in block


def test_docs_results_and_the_readme_table_are_what_the_recorded_runs_generate():
    """Regenerating from benchmarks/results/runs/ reproduces the committed files exactly."""
    assert results_doc.main(["--check"]) == 0


def test_a_run_whose_tree_differed_is_published_only_with_a_note_saying_how(tmp_path):
    out = tmp_path / "runs"
    rec = json.loads(record_run.record(_run_dir(tmp_path, code_dirty=True), "x", out,
                                       dirty_note="README.md differed", about="records 1-9 of F").read_text())
    doc = results_doc.render_doc(results_doc.load_runs(out))
    assert rec["dirty_note"] == "README.md differed" and f"`{COMMIT[:7]}+`" in doc and "README.md differed" in doc
    assert "records 1-9 of F" in doc


def test_provenance_names_the_commit_and_counts_only_code_as_dirty():
    from lit_modules.runtime import is_documentation, provenance
    assert is_documentation("README.md") and is_documentation("docs/results.md")
    assert is_documentation("benchmarks/results/runs/a.json")
    assert not is_documentation("lit_modules/stages.py") and not is_documentation("configs/model/mindbridge.yaml")
    info = provenance()
    if (ROOT / ".git").exists():
        assert len(info["code_commit"]) == 40
        changed = [p for p in info["uncommitted_files"].split(", ") if p]
        assert info["code_dirty"] == any(not is_documentation(p) for p in changed)
