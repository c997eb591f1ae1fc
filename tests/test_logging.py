"""Logging works with no network and no W&B account."""
from __future__ import annotations

from train import train


def test_wandb_offline_run_can_be_synced_later(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    metrics = train(tiny_cfg("logger=wandb", "stage=pretrain", run_dir=run), run)
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert offline_runs, "no offline W&B run was written"
    assert list(offline_runs[0].glob("*.wandb")), "the offline run has no data file for `wandb sync`"
    assert metrics["stage"] == "pretrain"


def test_csv_logger_records_each_loss(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg("stage=pretrain", run_dir=run), run)
    header = next((run / "logs").rglob("metrics.csv")).read_text().splitlines()[0]
    for key in ("train/inject", "train/associate", "train/exist", "train/exist_acc"):
        assert key in header
