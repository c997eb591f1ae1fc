"""Optional LoRA adapters in the LLM during bridging (bridge.lora), saved with the bridge."""
from __future__ import annotations

import json

import pytest
import torch

from mindbridge.api import load_edited_llm
from mindbridge.artifacts import ArtifactError
from mindbridge.loading import load_causal_lm
from train import train


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from tests.conftest import compose
    run = tmp_path_factory.mktemp("lora")
    cfg = compose(["debug=fast", "callbacks.progress=null", f"run_dir={run}", "model.bridge.lora=true",
                   "model.bridge.lora_rank=4"])
    return run, train(cfg, run)


def test_adapters_are_saved_with_the_bridge_and_counted(lora_run):
    run, metrics = lora_run
    bridge = run / "memory" / "bridges" / "tiny_llama"
    assert (bridge / "lora" / "adapter_model.safetensors").is_file()
    meta = json.loads((bridge / "bridge.json").read_text())
    assert meta["lora_params"] > 0 and meta["projector_params"] > meta["lora_params"]
    assert metrics["projector_params"] == meta["projector_params"]
    ckpt = torch.load(run / "checkpoints" / "bridge-tiny_llama" / "last.ckpt", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert any("lora_" in k for k in keys) and any(k.startswith("edited.projectors.") for k in keys)
    assert not any(k.startswith("edited.llm.") and "lora_" not in k for k in keys)
    # lora_B starts at zero; it moved, so the adapters trained with the projector.
    assert any(ckpt["state_dict"][k].abs().sum() > 0 for k in keys if "lora_B" in k)


def test_reference_model_is_the_unadapted_llm(lora_run, tiny_cfg, tmp_path):
    """pre_* come from the LLM with its adapters switched off: the same as a run without LoRA."""
    run, metrics = lora_run
    plain = train(tiny_cfg(run_dir=tmp_path / "plain"), tmp_path / "plain")
    assert metrics["pre_rel"] == pytest.approx(plain["pre_rel"], abs=1e-9)
    assert metrics["pre_gen"] == pytest.approx(plain["pre_gen"], abs=1e-9)


def test_api_attaches_the_adapters_and_refuses_tampered_ones(lora_run, tiny_cfg):
    run, _ = lora_run
    c = tiny_cfg().llm
    llm, tok = load_causal_lm("random", random_config=dict(c.random_config), seed=0)
    edited = load_edited_llm(llm, tok, "tiny_llama", [run / "memory"])
    assert hasattr(edited.llm, "disable_adapter")
    with_memory = edited.generate(["Who wrote Hamlet?"], max_new_tokens=3)
    assert len(with_memory) == 1
    adapters = run / "memory" / "bridges" / "tiny_llama" / "lora" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file
    tensors = load_file(adapters)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1.0
    save_file(tensors, adapters)
    llm2, tok2 = load_causal_lm("random", random_config=dict(c.random_config), seed=0)
    with pytest.raises(ArtifactError, match="LoRA adapters .* do not match"):
        load_edited_llm(llm2, tok2, "tiny_llama", [run / "memory"])
