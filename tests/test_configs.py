"""Every config option composes; unknown names fail in Hydra with the list of choices."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from tests.conftest import CONFIG_DIR, compose

GROUPS = ["stage", "llm", "encoder", "data", "model", "trainer", "logger", "callbacks", "debug", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option, tmp_path):
    cfg = compose([f"{group}={option}", f"run_dir={tmp_path}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.run_dir == str(tmp_path)


def test_default_job_is_the_main_job(tmp_path):
    cfg = compose([f"run_dir={tmp_path}"])
    assert list(cfg.stage.jobs) == ["pretrain", "bridge", "eval"]
    assert cfg.llm.name == "smollm2" and cfg.encoder.name == "minilm" and cfg.data.name == "zsre"
    assert cfg.data.num_edits >= 200


def test_crossmodel_experiment_pretrains_once_then_bridges_three_llms(tmp_path):
    cfg = compose(["experiment=crossmodel", f"run_dir={tmp_path}"])
    assert list(cfg.stage.jobs) == ["crossmodel"]
    assert list(cfg.stage.llms) == ["smollm2", "smollm2_moe", "gemma3"]
    default = compose([f"run_dir={tmp_path}"]).model
    # The default job's Stage I recipe, trained longer (the memory is written once for every LLM),
    # and the memory's gate as it is.
    assert cfg.model.pretrain.joint_epochs > default.pretrain.joint_epochs
    assert {k: v for k, v in cfg.model.pretrain.items() if k != "joint_epochs"} == \
        {k: v for k, v in default.pretrain.items() if k != "joint_epochs"}
    assert cfg.model.gate == default.gate
    assert set(cfg.stage.bridge_overrides) <= set(cfg.stage.llms)


def test_bridge_to_llama3_composes(tmp_path):
    cfg = compose(["stage=bridge", "llm=llama3", f"run_dir={tmp_path}"])
    assert cfg.llm.hub_id == "meta-llama/Meta-Llama-3-8B" and list(cfg.stage.jobs) == ["bridge", "eval"]


def test_unknown_option_is_refused(tmp_path):
    with pytest.raises(MissingConfigException, match="llm"):
        compose(["llm=no_such_llm", f"run_dir={tmp_path}"])


def test_loss_weights_and_schedule_are_configurable(tmp_path):
    cfg = compose(["model.pretrain.lambda_exist=0", "model.bridge.lambda_kl=0", "model.pretrain.joint_from_start=true",
                   "model.bridge.projector.depth=3", "model.bridge.projector.num_tokens=2", f"run_dir={tmp_path}"])
    assert cfg.model.pretrain.lambda_exist == 0 and cfg.model.bridge.lambda_kl == 0
    assert cfg.model.bridge.projector.depth == 3 and cfg.model.bridge.projector.num_tokens == 2
