"""Cross-model editing: one memory, a projector per LLM, one table."""
from __future__ import annotations

import json

import pytest

from train import train


def test_one_memory_bridged_to_several_llm_families(tiny_cfg, tmp_path):
    run = tmp_path / "xm"
    metrics = train(tiny_cfg("stage=crossmodel", "stage.llms=[tiny_llama,tiny_gpt2]", run_dir=run), run)
    rows = json.loads((run / "crossmodel.json").read_text())
    assert [r["llm"] for r in rows] == ["tiny_llama", "tiny_gpt2"]
    manifest = json.loads((run / "memory" / "manifest.json").read_text())
    for r in rows:
        for k in ("pre_rel", "pre_gen", "rel", "gen", "loc", "avg"):
            assert 0.0 <= r[k] <= 100.0
        assert r["projector_params"] > 0
        assert r["projector_params_pct_of_llm"] == pytest.approx(100.0 * r["projector_params"] / r["llm_params"])
        assert r["pretrain_seconds"] == manifest["pretrain_seconds"]
        assert (run / "memory" / "bridges" / r["llm"] / "bridge.json").is_file()
        per_llm = json.loads((run / "llms" / r["llm"] / "metrics.json").read_text())
        assert per_llm["rel"] == r["rel"] and metrics[f"{r['llm']}_rel"] == r["rel"]
    table = (run / "crossmodel.md").read_text()
    assert "| tiny_llama |" in table and "| tiny_gpt2 |" in table
    from mindbridge.artifacts import directory_digest
    assert metrics["encoder_files_unchanged"] is True
    assert metrics["encoder_files_sha256"] == directory_digest(run / "memory" / "encoder")
    assert "byte-identical before and after bridging: True" in table
    # Both bridges were trained against the one encoder written before them.
    encoder_hashes = {json.loads((run / "memory" / "bridges" / r["llm"] / "bridge.json").read_text())["encoder_sha256"]
                      for r in rows}
    assert encoder_hashes == {manifest["encoder_sha256"]}


def test_every_tiny_family_bridges_and_scores(tiny_cfg, tmp_path):
    """The same code path (cached prompt keys/values, suffix memory, evaluator) on every layout."""
    from tests.test_llm_families import FAMILIES
    run = tmp_path / "all"
    names = sorted(FAMILIES)
    train(tiny_cfg("stage=crossmodel", f"stage.llms=[{','.join(names)}]", "data.num_edits=4", run_dir=run), run)
    rows = {r["llm"]: r for r in json.loads((run / "crossmodel.json").read_text())}
    assert sorted(rows) == names
    for r in rows.values():
        assert all(0.0 <= r[k] <= 100.0 for k in ("rel", "gen", "loc"))


def test_unknown_llm_in_the_list_fails_before_training(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="Unknown LLM 'nope'"):
        train(tiny_cfg("stage=crossmodel", "stage.llms=[tiny_llama,nope]"), tmp_path / "run")
    assert not (tmp_path / "run" / "memory").exists()
