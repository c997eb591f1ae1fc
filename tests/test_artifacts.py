"""Memory and bridge artifacts (mindbridge.artifacts) with a tiny random encoder and projector."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data.records import EditRecord, content_hash
from mindbridge.artifacts import (
    ArtifactError,
    bridge_dir,
    load_bridge,
    load_memory,
    read_manifest,
    save_bridge,
    save_memory,
)
from mindbridge.bridge import MemoryProjector, MemoryProjectorConfig
from mindbridge.encoder import MemoryEncoder
from mindbridge.loading import load_masked_lm, weights_fingerprint

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}

RECORDS = [
    EditRecord(case_id="0", dataset="zsre", subject="Eiffel Tower", prompt="Where is the Eiffel Tower?",
               target_new="Rome", target_true="Paris", rephrase_prompts=("The Eiffel Tower is in which city?",),
               loc_prompts=("Who wrote Hamlet?",), loc_answers=("Shakespeare",)),
    EditRecord(case_id="1", dataset="zsre", subject="Danube", prompt="The Danube flows into the",
               target_new="North Sea", target_true="Black Sea", rephrase_prompts=(),
               loc_prompts=(), loc_answers=()),
]


def _identity(name: str, weights: str = "w" * 64, config_hash: str = "c" * 64) -> dict:
    return {"name": name, "model_type": "llama", "config_hash": config_hash, "weights": weights}


@pytest.fixture(scope="module")
def encoder() -> MemoryEncoder:
    mlm, tok = load_masked_lm("random", random_config=TINY_BERT, seed=0)
    return MemoryEncoder(mlm, tok, "cls", 48)


@pytest.fixture(scope="module")
def other_encoder() -> MemoryEncoder:
    mlm, tok = load_masked_lm("random", random_config=TINY_BERT, seed=1)
    return MemoryEncoder(mlm, tok, "cls", 48)


def _projector(seed: int = 0) -> MemoryProjector:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = MemoryProjector(MemoryProjectorConfig(encoder_dim=32, llm_dim=64, num_tokens=2))
    proj.set_feature_statistics(torch.randn(8, 32, generator=torch.Generator().manual_seed(seed)))
    return proj.eval()


@pytest.fixture()
def memory(tmp_path, encoder) -> Path:
    return save_memory(tmp_path / "memory", encoder, RECORDS, content_hash(RECORDS), {"stage": "pretrain"})


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


# --------------------------------------------------------------------------- memory


def test_memory_round_trip(memory, encoder) -> None:
    manifest = read_manifest(memory)
    assert manifest["kind"] == "mindbridge_memory"
    assert manifest["encoder_sha256"] == weights_fingerprint(encoder.mlm)
    assert manifest["facts_sha256"] == content_hash(RECORDS)
    assert manifest["num_facts"] == 2 and manifest["stage"] == "pretrain"
    assert (memory / "encoder" / "model.safetensors").is_file()
    assert (memory / "bridges").is_dir()
    lines = (memory / "facts.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [json.loads(json.dumps(dataclasses.asdict(r))) for r in RECORDS]

    loaded, manifest2 = load_memory(memory)
    assert manifest2 == manifest
    assert weights_fingerprint(loaded.mlm) == weights_fingerprint(encoder.mlm)
    assert loaded.pooling == "cls" and loaded.max_length == 48
    assert not any(p.requires_grad for p in loaded.mlm.parameters())
    texts = ["Where is the Eiffel Tower?", "Hi"]
    encoder.mlm.eval()
    torch.testing.assert_close(loaded.encode(texts), encoder.encode(texts))
    assert loaded.tokenizer("Eiffel")["input_ids"] == encoder.tokenizer("Eiffel")["input_ids"]


def test_tampered_encoder_weights_are_refused(memory) -> None:
    path = memory / "encoder" / "model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if "encoder.layer.0" in k and k.endswith("weight"))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ArtifactError, match="hash"):
        load_memory(memory)
    load_memory(memory, verify=False)       # still readable when asked not to verify


def test_missing_or_incomplete_memory(tmp_path, memory) -> None:
    with pytest.raises(ArtifactError, match="No memory"):
        load_memory(tmp_path / "nowhere")
    (memory / "encoder" / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="model.safetensors"):
        load_memory(memory)
    (memory / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ArtifactError, match="corrupt"):
        read_manifest(memory)
    (memory / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="incomplete"):
        read_manifest(memory)


def test_leftover_tmp_memory_is_never_loaded(tmp_path, memory) -> None:
    # A complete copy under the temporary name a killed writer would leave behind.
    shutil.copytree(memory, tmp_path / ".other.tmp-abc123")
    with pytest.raises(ArtifactError):
        load_memory(tmp_path / "other")


# --------------------------------------------------------------------------- bridges


def test_bridge_round_trip(memory) -> None:
    proj = _projector()
    ident = _identity("tiny_llama")
    where = save_bridge(memory, "tiny_llama", proj, ident, {"stage": "bridge"})
    assert where == bridge_dir(memory, "tiny_llama")
    loaded, meta = load_bridge(memory, "tiny_llama", ident)
    assert meta["kind"] == "mindbridge_bridge" and meta["stage"] == "bridge"
    assert meta["llm"] == ident
    assert meta["encoder_sha256"] == read_manifest(memory)["encoder_sha256"]
    assert weights_fingerprint(loaded) == weights_fingerprint(proj) == meta["projector_sha256"]
    assert torch.equal(loaded.feature_mean, proj.feature_mean)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(3, 32)
    torch.testing.assert_close(loaded(x), proj(x))


def test_bridge_for_another_llm_is_refused(memory) -> None:
    save_bridge(memory, "tiny_llama", _projector(), _identity("tiny_llama"), {})
    with pytest.raises(ArtifactError, match="tiny_llama") as err:
        load_bridge(memory, "tiny_llama", _identity("other_llama", weights="x" * 64))
    assert "weights" in str(err.value) and "other_llama" in str(err.value)
    with pytest.raises(ArtifactError, match="config_hash"):
        load_bridge(memory, "tiny_llama", _identity("tiny_llama", config_hash="d" * 64))


def test_bridge_for_another_encoder_is_refused(tmp_path, memory, other_encoder) -> None:
    save_bridge(memory, "tiny_llama", _projector(), _identity("tiny_llama"), {})
    # The same bridge next to a memory whose encoder has other weights.
    other = save_memory(tmp_path / "other", other_encoder, RECORDS, content_hash(RECORDS), {})
    shutil.copytree(bridge_dir(memory, "tiny_llama"), bridge_dir(other, "tiny_llama"))
    with pytest.raises(ArtifactError, match="encoder"):
        load_bridge(other, "tiny_llama", _identity("tiny_llama"))
    # Same through an explicitly passed manifest.
    with pytest.raises(ArtifactError, match="encoder"):
        load_bridge(memory, "tiny_llama", _identity("tiny_llama"), manifest=read_manifest(other))


def test_resaving_memory_with_other_weights_never_loads_a_stale_bridge(memory, other_encoder) -> None:
    save_bridge(memory, "tiny_llama", _projector(), _identity("tiny_llama"), {})
    save_memory(memory, other_encoder, RECORDS, content_hash(RECORDS), {})
    assert read_manifest(memory)["encoder_sha256"] == weights_fingerprint(other_encoder.mlm)
    with pytest.raises(ArtifactError):
        load_bridge(memory, "tiny_llama", _identity("tiny_llama"))
    assert not [p for p in memory.parent.iterdir() if ".old-" in p.name or ".tmp-" in p.name]


def test_missing_bridge_lists_available_ones(memory) -> None:
    with pytest.raises(ArtifactError, match="none"):
        load_bridge(memory, "tiny_gptj", _identity("tiny_gptj"))
    save_bridge(memory, "tiny_llama", _projector(), _identity("tiny_llama"), {})
    save_bridge(memory, "tiny_gpt2", _projector(1), _identity("tiny_gpt2"), {})
    with pytest.raises(ArtifactError, match="tiny_gptj") as err:
        load_bridge(memory, "tiny_gptj", _identity("tiny_gptj"))
    assert "tiny_gpt2, tiny_llama" in str(err.value)


def test_leftover_tmp_bridge_is_never_loaded(memory) -> None:
    save_bridge(memory, "tiny_llama", _projector(), _identity("tiny_llama"), {})
    leftover = memory / "bridges" / ".tiny_gptj.tmp-abc123"
    shutil.copytree(bridge_dir(memory, "tiny_llama"), leftover)
    with pytest.raises(ArtifactError) as err:
        load_bridge(memory, "tiny_gptj", _identity("tiny_llama"))
    assert ".tmp-" not in str(err.value).split("(it has:")[1]
    assert "tiny_llama" in str(err.value)


def test_failed_bridge_write_leaves_nothing(memory) -> None:
    def boom(path: Path) -> None:
        path.mkdir()
        (path / "partial.json").write_text("{}")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        save_bridge(memory, "tiny_llama", _projector(), _identity("tiny_llama"), {}, extra={"extra": boom})
    assert list((memory / "bridges").iterdir()) == []
    with pytest.raises(ArtifactError):
        load_bridge(memory, "tiny_llama", _identity("tiny_llama"))


def test_overwriting_a_bridge_replaces_it(memory) -> None:
    ident = _identity("tiny_llama")
    save_bridge(memory, "tiny_llama", _projector(0), ident, {})
    newer = _projector(1)
    save_bridge(memory, "tiny_llama", newer, ident, {})
    loaded, _ = load_bridge(memory, "tiny_llama", ident)
    assert weights_fingerprint(loaded) == weights_fingerprint(newer)
    assert [p.name for p in (memory / "bridges").iterdir()] == ["tiny_llama"]


def test_tampered_projector_is_refused(memory) -> None:
    ident = _identity("tiny_llama")
    where = save_bridge(memory, "tiny_llama", _projector(), ident, {})
    path = where / "projector" / "model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(path))
    tensors["feature_mean"] = tensors["feature_mean"] + 1.0
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ArtifactError, match="hash"):
        load_bridge(memory, "tiny_llama", ident)


def test_no_pickle_files_anywhere(memory) -> None:
    save_bridge(memory, "tiny_llama", _projector(), _identity("tiny_llama"), {})
    files = _all_files(memory)
    assert any(p.name == "model.safetensors" for p in files)
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES], files
    for p in files:                                      # no pickle stream under another name
        assert not p.read_bytes()[:2] == b"\x80\x04" and not p.read_bytes()[:4] == b"PK\x03\x04", p


def test_save_memory_does_not_mutate_the_encoder(tmp_path, encoder) -> None:
    before = weights_fingerprint(encoder.mlm)
    snapshot = copy.deepcopy(encoder.mlm.config.to_dict())
    save_memory(tmp_path / "m", encoder, RECORDS[:1], content_hash(RECORDS[:1]), {})
    assert weights_fingerprint(encoder.mlm) == before
    assert encoder.mlm.config.to_dict() == snapshot
