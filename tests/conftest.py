"""Shared test setup: offline, no W&B, configs composed in-process from `configs/`."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIG_DIR = str(ROOT / "configs")


def compose(overrides: list[str]):
    """The config `python train.py <overrides>` would run, composed in-process."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A factory for tiny, seconds-long configs writing into a temporary run directory."""
    def make(*overrides: str, run_dir: Path | None = None):
        return compose(["debug=fast", "logger=csv", "callbacks.progress=null",
                        f"run_dir={run_dir or tmp_path / 'run'}", *overrides])
    return make


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """Tiny models: matmuls are dominated by thread hand-off on a busy 2-core box, so fast tests
    use one thread (restored afterwards); tests on the real models keep the default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
