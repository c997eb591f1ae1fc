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


def test_bridge_overrides_change_one_llms_recipe_only(tiny_cfg, tmp_path):
    run = tmp_path / "xm"
    train(tiny_cfg("stage=crossmodel", "stage.llms=[tiny_llama,tiny_gpt2]",
                   "stage.bridge_overrides={tiny_gpt2: {lambda_kl: 0.25}}", run_dir=run), run)
    recipe = {name: json.loads((run / "memory" / "bridges" / name / "bridge.json").read_text())["hyperparameters"]
              for name in ("tiny_llama", "tiny_gpt2")}
    assert recipe["tiny_gpt2"]["lambda_kl"] == 0.25
    assert recipe["tiny_llama"]["lambda_kl"] != 0.25
    rows = {r["llm"]: r for r in json.loads((run / "crossmodel.json").read_text())}
    assert rows["tiny_gpt2"]["bridge_overrides"] == {"lambda_kl": 0.25} and rows["tiny_llama"]["bridge_overrides"] == {}
    assert "tiny_gpt2: lambda_kl=0.25" in (run / "crossmodel.md").read_text()


@pytest.mark.parametrize("override, message", [
    ("{tiny_lama: {lambda_kl: 1}}", "Unknown LLM 'tiny_lama'"),
    ("{tiny_llama: {lamda_kl: 1}}", "which model.bridge does not have"),
])
def test_bad_bridge_overrides_fail_before_training(tiny_cfg, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_cfg("stage=crossmodel", "stage.llms=[tiny_llama]", f"stage.bridge_overrides={override}"),
              tmp_path / "run")
    assert not (tmp_path / "run" / "memory").exists()


def test_overrides_for_llms_outside_the_list_are_allowed(tiny_cfg):
    from lit_modules.stages import bridge_overrides
    cfg = tiny_cfg("stage=crossmodel", "stage.llms=[tiny_llama]",
                   "stage.bridge_overrides={tiny_gpt2: {epochs: 1}, tiny_llama: {epochs: 2}}")
    assert bridge_overrides(cfg, ["tiny_llama"]) == {"tiny_llama": {"epochs": 2}}
