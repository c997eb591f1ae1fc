"""The real embedded models (SmolLM2-135M, all-MiniLM-L6-v2): slow, run with `make test-slow`."""
from __future__ import annotations

import pytest

from train import train

pytestmark = pytest.mark.slow


def test_unedited_smollm2_scores_like_a_small_llm_on_zsre():
    from data.datamodule import EditDataModule
    from mindbridge.evaluation import evaluate_edits
    from mindbridge.lm import PlainLM
    from mindbridge.loading import load_causal_lm
    llm, tok = load_causal_lm("smollm2_package")
    base = PlainLM(llm, tok)
    m = evaluate_edits(base, base, EditDataModule("zsre", num_edits=40, seed=1).edits)
    assert 5 < m["pre_rel"] < 60 and m["loc"] == 100.0 and m["rel"] == m["pre_rel"]


def test_small_end_to_end_run_learns_the_edits(tiny_cfg, tmp_path):
    """Pretrain + bridge on 24 real edits: the edited model must beat the unedited one by far."""
    run = tmp_path / "run"
    cfg = tiny_cfg("llm=smollm2", "encoder=minilm", "data.num_edits=24", "data.max_out_of_scope=200",
                   "data.batch_size=8", "model.pretrain.batch_size=8", "model.bridge.batch_size=8",
                   "model.bridge.out_batch_size=8", "model.bridge.epochs=25", run_dir=run)
    m = train(cfg, run)
    assert m["rel"] > m["pre_rel"] + 30
    assert m["loc"] > 60
