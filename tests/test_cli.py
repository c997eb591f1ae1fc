"""The command line: user mistakes end with one clear sentence and a non-zero exit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def assert_one_sentence_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_upstream_llm_offline_fails_with_one_sentence(tmp_path):
    memory = tmp_path / "memory"
    # A memory must exist for stage=bridge; the LLM check then fails before any training.
    proc = run_cli("debug=fast", f"memory={memory}", "stage=pretrain", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("debug=fast", "stage=bridge", "llm=llama3", f"memory={memory}", tmp_path=tmp_path)
    assert_one_sentence_error(proc, "meta-llama/Meta-Llama-3-8B")


def test_bridge_to_llama3_offline_names_the_model(tmp_path):
    """Exactly the issue's command: no memory yet, no hub; the LLM is what gets reported."""
    proc = run_cli("stage=bridge", "llm=llama3", tmp_path=tmp_path)
    assert_one_sentence_error(proc, "meta-llama/Meta-Llama-3-8B")


def test_missing_memory_fails_with_one_sentence(tmp_path):
    proc = run_cli("debug=fast", "stage=eval", f"memory={tmp_path / 'nope'}", tmp_path=tmp_path)
    assert_one_sentence_error(proc, "No memory at")


def test_malformed_data_file_names_file_record_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    good = {"subject": "X", "src": "Who is X?", "rephrase": "Who's X?", "alt": "Y", "answers": ["Z"],
            "loc": "nq question: q", "loc_ans": "a"}
    bad.write_text(json.dumps([good, {**good, "alt": 3}]))
    proc = run_cli("debug=fast", f"data.path={bad}", "data.num_edits=1", tmp_path=tmp_path)
    assert_one_sentence_error(proc, "bad.json", "record 1", "alt")
    assert not (tmp_path / "run" / "memory").exists()


def test_missing_data_file(tmp_path):
    proc = run_cli("debug=fast", f"data.path={tmp_path / 'none.json'}", tmp_path=tmp_path)
    assert_one_sentence_error(proc, "none.json")


def test_unknown_config_name_exits_non_zero(tmp_path):
    proc = run_cli("llm=not_a_model", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "not_a_model" in proc.stderr


@pytest.mark.parametrize("override", ["data.num_edits=0", "data.num_edits=100000"])
def test_bad_num_edits(override, tmp_path):
    proc = run_cli("debug=fast", override, tmp_path=tmp_path)
    assert_one_sentence_error(proc, "num_edits")


def test_help_describes_every_stage():
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0
    head = proc.stdout.split("== Configuration groups ==")[0]
    for stage in sorted(p.stem for p in (ROOT / "configs" / "stage").glob("*.yaml")):
        assert stage in head, stage
    assert "\n\n== Configuration groups ==" in proc.stdout and "metrics.json" in proc.stdout
