"""Tests for mindbridge.lm and mindbridge.tokenization on tiny random models (no network)."""

from __future__ import annotations

import functools

import pytest
import torch

from mindbridge.lm import (
    soft_token_positions,
    PlainLM,
    PromptKVStore,
    causal_logits,
    continuation_logits,
    first_token_index,
    insert_tokens,
    has_native_bfloat16,
    lm_head_dtype_choice,
    lm_head_in,
    resolve_lm_head_dtype,
)
from mindbridge.loading import load_causal_lm, load_masked_lm
from mindbridge.tokenization import (
    encode_target,
    position_ids_for,
    prompt_batch,
    teacher_forced_batch,
)

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4}
TINY_GPTJ = {"model_type": "gptj", "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8}
TINY_GEMMA3 = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
TINY_MIXTRAL = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                "num_experts_per_tok": 2}
CONFIGS = {"llama": TINY_LLAMA, "gpt2": TINY_GPT2, "gptj": TINY_GPTJ, "gemma3_text": TINY_GEMMA3,
           "mixtral": TINY_MIXTRAL}

PROMPTS = ["The Eiffel Tower is located in the city of", "Hi", "Who wrote Hamlet?"]
TARGETS = ["Paris", "New York", "William Shakespeare of Stratford"]


@functools.lru_cache(maxsize=None)
def _model(name: str):
    return load_causal_lm("random", random_config=CONFIGS[name], seed=0)


def _memory(model, bsz: int, plen: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dim = model.get_input_embeddings().weight.shape[1]
    return torch.randn(bsz, plen, dim, generator=g)


# --------------------------------------------------------------------------- insert_tokens


def _hand_made():
    # Row 0 is left-padded by two, row 1 is full. d = 2 so gathers over the last dim are checked.
    embeds = torch.tensor([[[0, 0], [0, 0], [1, 1], [2, 2]],
                           [[5, 5], [6, 6], [7, 7], [8, 8]]], dtype=torch.float)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    tokens = torch.tensor([[[100, 100], [101, 101]],
                           [[200, 200], [201, 201]]], dtype=torch.float)
    return embeds, mask, tokens


def test_first_token_index() -> None:
    _, mask, _ = _hand_made()
    assert first_token_index(mask).tolist() == [2, 0]


def test_insert_tokens_prefix_keeps_left_padding() -> None:
    embeds, mask, tokens = _hand_made()
    out, new_mask = insert_tokens(embeds, mask, tokens, first_token_index(mask))
    assert out.shape == (2, 6, 2)
    assert out[0, :, 0].tolist() == [0, 0, 100, 101, 1, 2]
    assert out[1, :, 0].tolist() == [200, 201, 5, 6, 7, 8]
    assert torch.equal(out[..., 0], out[..., 1])
    assert new_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert new_mask.dtype == mask.dtype


def test_insert_tokens_mid_row_and_end() -> None:
    embeds, mask, tokens = _hand_made()
    out, new_mask = insert_tokens(embeds, mask, tokens, torch.tensor([3, 2]))
    assert out[0, :, 0].tolist() == [0, 0, 1, 100, 101, 2]
    assert out[1, :, 0].tolist() == [5, 6, 200, 201, 7, 8]
    assert new_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]

    out, new_mask = insert_tokens(embeds, mask, tokens, torch.tensor([4, 4]))   # after the last token
    assert out[0, :, 0].tolist() == [0, 0, 1, 2, 100, 101]
    assert out[1, :, 0].tolist() == [5, 6, 7, 8, 200, 201]
    assert new_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


def test_insert_tokens_single_token_and_bool_free_mask_dtype() -> None:
    embeds, mask, tokens = _hand_made()
    out, new_mask = insert_tokens(embeds, mask.to(torch.int32), tokens[:, :1], torch.tensor([2, 1]))
    assert out[0, :, 0].tolist() == [0, 0, 100, 1, 2]
    assert out[1, :, 0].tolist() == [5, 200, 6, 7, 8]
    assert new_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert new_mask.dtype == torch.int32


def test_position_ids_ignore_left_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_for(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_ids_for(mask, offset=3)[0, -1].item() == 5


# --------------------------------------------------------------------------- causal_logits


@pytest.mark.parametrize("name", ["llama", "gpt2", "gptj"])
@pytest.mark.parametrize("plen", [1, 2])
def test_causal_logits_prefix_memory_is_padding_invariant(name: str, plen: int) -> None:
    model, tok = _model(name)
    ids, mask = prompt_batch(tok, PROMPTS)
    assert (mask == 0).any(), "the batch must contain padding for this test to mean anything"
    memory = _memory(model, len(PROMPTS), plen)
    keep = 2
    with torch.no_grad():
        batched = causal_logits(model, ids, mask, keep, memory)
        for b, prompt in enumerate(PROMPTS):
            one_ids, one_mask = prompt_batch(tok, [prompt])
            assert one_mask.all()
            alone = causal_logits(model, one_ids, one_mask, keep, memory[b:b + 1])
            torch.testing.assert_close(batched[b], alone[0], atol=1e-4, rtol=1e-4)
            # A prefix is the same as inserting at index 0 of the unpadded row.
            explicit = causal_logits(model, one_ids, one_mask, keep, memory[b:b + 1], torch.tensor([0]))
            torch.testing.assert_close(explicit, alone, atol=1e-5, rtol=1e-5)
    assert batched.shape == (len(PROMPTS), keep, model.config.vocab_size)


def test_causal_logits_without_memory_matches_model_and_plain_lm() -> None:
    model, tok = _model("llama")
    ids, mask = prompt_batch(tok, PROMPTS[:1])
    with torch.no_grad():
        ref = model(input_ids=ids).logits[:, -3:]
        got = causal_logits(model, ids, mask, 3)
        plain = PlainLM(model, tok).logits(PROMPTS[:1], ids, mask, 3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=1e-5)


def test_memory_changes_the_logits() -> None:
    model, tok = _model("llama")
    ids, mask = prompt_batch(tok, PROMPTS)
    with torch.no_grad():
        a = causal_logits(model, ids, mask, 1)
        b = causal_logits(model, ids, mask, 1, _memory(model, len(PROMPTS), 1))
    assert not torch.allclose(a, b)


# --------------------------------------------------------------------------- PromptKVStore


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_continuation_logits_memory_only(name: str) -> None:
    model, tok = _model(name)
    store = PromptKVStore(model, tok, PROMPTS)
    memory = _memory(model, len(PROMPTS), 2, seed=2)
    ids, mask = prompt_batch(tok, PROMPTS)
    with torch.no_grad():
        cache, prompt_mask = store.batch([0, 1, 2])
        cont = continuation_logits(model, cache, prompt_mask, memory)
        full = causal_logits(model, ids, mask, 2, memory, torch.full((3,), ids.shape[1]))
    torch.testing.assert_close(cont, full, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "mixtral"])
def test_continuation_logits_select_scores_only_those_positions(name: str) -> None:
    model, tok = _model(name)
    store = PromptKVStore(model, tok, PROMPTS)
    memory = _memory(model, len(PROMPTS), 2, seed=3)
    answer_ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 4]])
    answer_mask = answer_ids > 0
    select = torch.cat([torch.zeros(3, 1, dtype=torch.bool), answer_mask, torch.zeros(3, 1, dtype=torch.bool)], 1)
    with torch.no_grad():
        cache, prompt_mask = store.batch([0, 1, 2])
        every = continuation_logits(model, cache, prompt_mask, memory, answer_ids, answer_mask)
        cache, prompt_mask = store.batch([0, 1, 2])
        some = continuation_logits(model, cache, prompt_mask, memory, answer_ids, answer_mask, select=select)
    assert some.shape == (int(answer_mask.sum()), model.config.vocab_size)
    torch.testing.assert_close(some, every[select], atol=1e-5, rtol=1e-5)
    # the hook is gone afterwards: the next call scores every kept position again
    with torch.no_grad():
        assert causal_logits(model, *prompt_batch(tok, PROMPTS), 2).shape[:2] == (3, 2)


def test_lm_head_reads_contiguous_hidden_states() -> None:
    model, _ = _model("llama")
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), logits_to_keep=2)   # a strided slice
    handle.remove()
    assert seen[0].shape[1] == 2 and seen[0].is_contiguous()


def test_prompt_kv_store_stores_unpadded_prompts() -> None:
    model, tok = _model("llama")
    store = PromptKVStore(model, tok, PROMPTS, batch_size=2)
    for i, prompt in enumerate(PROMPTS):
        n = len(tok(prompt)["input_ids"])
        assert all(k.shape[1] == n for k in store.keys[i])
        assert len(store.keys[i]) == model.config.num_hidden_layers
    _, mask = store.batch([1, 0])
    assert mask.tolist()[0][-1] == 1 and mask[0].sum() == len(tok(PROMPTS[1])["input_ids"])
    assert mask[1].all()


@pytest.mark.parametrize("name", ["llama", "gpt2", "gptj", "gemma3_text", "mixtral"])
def test_prompt_kv_store_teacher_logits(name: str) -> None:
    model, tok = _model(name)
    store = PromptKVStore(model, tok, PROMPTS, batch_size=2, keep_logits=True)
    assert store.last_logits[0].dtype == torch.bfloat16
    with torch.no_grad():
        ids, mask = prompt_batch(tok, PROMPTS)
        plain = causal_logits(model, ids, mask, 1)[:, -1]
        alone = torch.cat([causal_logits(model, *prompt_batch(tok, [p]), 1)[:, -1] for p in PROMPTS])
    teacher = store.teacher_logits([0, 1, 2])
    assert teacher.dtype == torch.float32 and teacher.shape == plain.shape
    scale = plain.abs().max().item()
    torch.testing.assert_close(teacher, plain, atol=1e-2 * scale + 1e-3, rtol=1e-2)
    torch.testing.assert_close(teacher, alone, atol=1e-2 * scale + 1e-3, rtol=1e-2)
    torch.testing.assert_close(store.teacher_logits([2, 0]), teacher[[2, 0]])


# --------------------------------------------------------------------------- tokenization


def test_teacher_forced_batch_layout() -> None:
    _, tok = _model("llama")
    prompts, targets = PROMPTS[:3], TARGETS[:3]
    batch = teacher_forced_batch(tok, prompts, targets)
    rows = [tok(p)["input_ids"] + encode_target(tok, t) for p, t in zip(prompts, targets)]
    tgts = [encode_target(tok, t) for t in targets]
    width, tw = max(map(len, rows)), max(map(len, tgts))
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, width)
    assert batch.target_ids.shape == batch.target_mask.shape == (3, tw)
    assert batch.keep == tw + 1
    assert batch.target_mask.dtype == torch.bool
    for b, (row, t) in enumerate(zip(rows, tgts)):
        pad = width - len(row)
        assert batch.input_ids[b, pad:].tolist() == row
        assert batch.input_ids[b, :pad].tolist() == [tok.pad_token_id] * pad
        assert batch.attention_mask[b].tolist() == [0] * pad + [1] * len(row)
        # Right-aligned targets: the last len(t) tokens of the row, masked on the left.
        assert batch.input_ids[b, -len(t):].tolist() == t
        assert batch.target_ids[b, tw - len(t):].tolist() == t
        assert batch.target_mask[b].tolist() == [False] * (tw - len(t)) + [True] * len(t)
    # `logits[:, :-1]` of the last `keep` positions line up with target_ids: the input token right
    # after position i of the kept window is target_ids[:, i].
    window = batch.input_ids[:, -batch.keep:]
    assert torch.equal(window[:, 1:][batch.target_mask], batch.target_ids[batch.target_mask])


def test_teacher_forced_batch_truncates() -> None:
    _, tok = _model("llama")
    batch = teacher_forced_batch(tok, [PROMPTS[0]], [TARGETS[2]], max_prompt_tokens=3, max_target_tokens=2)
    p = tok(PROMPTS[0])["input_ids"][-3:]
    t = encode_target(tok, TARGETS[2])[:2]
    assert batch.input_ids[0].tolist() == p + t
    assert batch.target_ids[0].tolist() == t


def test_teacher_forced_batch_to() -> None:
    _, tok = _model("llama")
    batch = teacher_forced_batch(tok, PROMPTS[:2], TARGETS[:2]).to("cpu")
    assert batch.keep == batch.target_ids.shape[1] + 1


def test_encode_target_adds_no_special_tokens() -> None:
    _, tok = _model("llama")
    ids = encode_target(tok, "  Paris ")
    assert ids == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert ids == encode_target(tok, "Paris")
    specials = set(tok.all_special_ids)
    assert not specials & set(encode_target(tok, "New York"))

    # A tokenizer that does add special tokens (BERT: [CLS] ... [SEP]) must not add them here.
    _, bert_tok = load_masked_lm("random", random_config={"model_type": "bert", "hidden_size": 32,
                                                          "num_hidden_layers": 1, "num_attention_heads": 2,
                                                          "intermediate_size": 64})
    with_specials = bert_tok(" Paris")["input_ids"]
    assert bert_tok.cls_token_id in with_specials
    ids = encode_target(bert_tok, "Paris")
    assert ids and not set(ids) & set(bert_tok.all_special_ids)


def test_teacher_forced_batch_with_bos_tokenizer(monkeypatch) -> None:
    """If the tokenizer adds a BOS to the prompt, the target still carries none."""
    _, tok = _model("llama")
    orig = type(tok).__call__
    bos = tok.convert_tokens_to_ids("<|im_start|>")

    def with_bos(self, text, *args, add_special_tokens=True, **kwargs):
        enc = orig(self, text, *args, add_special_tokens=add_special_tokens, **kwargs)
        if add_special_tokens:
            enc["input_ids"] = [bos] + enc["input_ids"]
        return enc

    monkeypatch.setattr(type(tok), "__call__", with_bos)
    batch = teacher_forced_batch(tok, ["Hi"], ["Paris"])
    row = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    assert row[0] == bos and row.count(bos) == 1
    assert batch.target_ids[0].tolist() == orig(tok, " Paris", add_special_tokens=False)["input_ids"]


def test_shared_positions_leave_the_text_positions_alone() -> None:
    """Two left-padded rows with two soft tokens after the prompt: shared, the tokens repeat the
    last prompt position and the answer continues from it; otherwise they advance it."""
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    at = torch.tensor([3, 4])                  # row 0: 2 prompt tokens; row 1: 4
    assert soft_token_positions(mask, at, 2, True).tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 2, 3, 3, 3, 4]]
    assert soft_token_positions(mask, at, 2, False).tolist() == [[0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6]]


# --------------------------------------------------------------------------- lm_head_in


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_lm_head_in_bf16_scores_with_gradients_only(name: str) -> None:
    model, tok = _model(name)
    ids, mask = prompt_batch(tok, PROMPTS)
    with torch.no_grad():
        full = causal_logits(model, ids, mask, keep=1)
    weight = model.get_output_embeddings().weight.detach().to(torch.bfloat16)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with lm_head_in(model, weight):
        with torch.no_grad():                              # teachers and evaluation: unchanged
            torch.testing.assert_close(causal_logits(model, ids, mask, keep=1), full, atol=0, rtol=0)
        low = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_for(mask),
                    logits_to_keep=1).logits
    assert low.dtype == torch.float32 and not torch.equal(low, full)
    torch.testing.assert_close(low, full, atol=0.05, rtol=0.02)           # bfloat16 rounding only
    low.sum().backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
    assert "forward" not in vars(model.get_output_embeddings())           # restored on exit
    with lm_head_in(model, None):                                          # None: no change
        assert "forward" not in vars(model.get_output_embeddings())


def test_lm_head_dtype_auto_is_bfloat16_only_with_native_hardware(monkeypatch) -> None:
    assert lm_head_dtype_choice(None) is None and lm_head_dtype_choice("null") is None
    assert lm_head_dtype_choice("auto") == "auto" and lm_head_dtype_choice("float16") == torch.float16
    with pytest.raises(ValueError, match="lm_head_dtype='int8'"):
        lm_head_dtype_choice("int8")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        assert has_native_bfloat16("cpu") is native
        assert resolve_lm_head_dtype("auto", "cpu") == (torch.bfloat16 if native else None)
        # An explicit choice is kept whatever the hardware (the module warns where it is emulated).
        assert resolve_lm_head_dtype(torch.bfloat16, "cpu") == torch.bfloat16
        assert resolve_lm_head_dtype(None, "cpu") is None
    assert has_native_bfloat16("meta") is False
