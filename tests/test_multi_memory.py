"""Multi-MindBridge: several memories bridged to one LLM at once (one token block each)."""
from __future__ import annotations

import json

import pytest

from mindbridge.artifacts import ArtifactError, bridge_name, read_manifest
from train import train


@pytest.fixture(scope="module")
def two_memories(tmp_path_factory):
    """Two tiny memories over different edits (data seeds 0 and 1), one with its own bridge."""
    from tests.conftest import compose
    root = tmp_path_factory.mktemp("multi")
    dirs = []
    for seed, stage in ((0, "default"), (1, "pretrain")):
        run = root / f"seed{seed}"
        train(compose(["debug=fast", "callbacks.progress=null", f"run_dir={run}", f"stage={stage}",
                       f"data.seed={seed}"]), run)
        dirs.append(run / "memory")
    return root, dirs


def test_joint_bridge_scores_each_memory_and_the_drop(two_memories):
    from tests.conftest import compose
    root, (a, b) = two_memories
    run = root / "multi"
    metrics = train(compose(["debug=fast", "callbacks.progress=null", f"run_dir={run}", "stage=bridge",
                             f"memory=[{a},{b}]"]), run)
    facts = {line for d in (a, b) for line in (d / "facts.jsonl").read_text().splitlines()}
    assert metrics["num_memories"] == 2 and metrics["num_edits"] == len(facts)
    name = bridge_name("tiny_llama", [read_manifest(a), read_manifest(b)])
    for i, d in enumerate((a, b)):
        meta = json.loads((d / "bridges" / name / "bridge.json").read_text())
        assert meta["group_index"] == i and len(meta["group_encoders"]) == 2
        for k in ("rel", "gen", "loc", "avg"):
            assert 0.0 <= metrics[f"memory{i}_{k}"] <= 100.0
    # Memory 0 was also bridged alone (stage=default): its single-memory figures and the drop.
    assert metrics["memory0_drop_avg"] == pytest.approx(metrics["memory0_single_avg"] - metrics["memory0_avg"])
    assert "memory1_single_avg" not in metrics
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["memory0_rel"] == metrics["memory0_rel"]


def test_memories_without_a_joint_bridge_are_refused(two_memories, tiny_cfg):
    _, (a, b) = two_memories
    with pytest.raises(ArtifactError, match="bridge all the memories together"):
        train(tiny_cfg("stage=eval", f"memory=[{b},{a}]"), a.parent / "refused")


def test_pretrain_needs_a_single_memory(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="works on one memory"):
        train(tiny_cfg("stage=pretrain", f"memory=[{tmp_path}/a,{tmp_path}/b]"), tmp_path / "run")


def test_a_memory_of_another_dataset_brings_its_out_of_scope_prompts(two_memories):
    """A ZsRE memory and a CounterFact memory bridged with data=zsre: the CounterFact file's
    non-edited records join the out-of-scope stream (capped like the ZsRE one)."""
    from tests.conftest import compose
    root, (a, _) = two_memories
    cf = root / "cf"
    train(compose(["debug=fast", "callbacks.progress=null", f"run_dir={cf}", "stage=pretrain", "data=counterfact"]), cf)
    assert read_manifest(cf / "memory")["data_path"].endswith(".json")
    run = root / "zsre_cf"
    metrics = train(compose(["debug=fast", "callbacks.progress=null", f"run_dir={run}", "stage=bridge",
                             f"memory=[{a},{cf / 'memory'}]"]), run)
    cap = compose(["debug=fast"]).data.max_out_of_scope
    assert metrics["num_out_of_scope"] == 2 * cap
