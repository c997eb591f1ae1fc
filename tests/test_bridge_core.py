"""mindbridge.bridge: projector, losses and the memory-augmented LM on tiny random models."""

from __future__ import annotations

import functools

import pytest
import torch

from mindbridge.bridge import (
    MemoryAugmentedLM,
    MemoryProjector,
    MemoryProjectorConfig,
    answer_loss,
    distill_kl,
)
from mindbridge.encoder import MemoryEncoder
from mindbridge.lm import causal_logits
from mindbridge.loading import load_causal_lm, load_masked_lm
from mindbridge.tokenization import TeacherForcedBatch, prompt_batch, teacher_forced_batch

TINY_LLMS = {
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4},
    "gptj": {"model_type": "gptj", "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8},
}
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64}


@functools.lru_cache(maxsize=None)
def _llm(name: str):
    return load_causal_lm("random", random_config=TINY_LLMS[name])


@functools.lru_cache(maxsize=None)
def _encoder() -> MemoryEncoder:
    mlm, tok = load_masked_lm("random", random_config=TINY_BERT)
    return MemoryEncoder(mlm.requires_grad_(False), tok, "cls", 48)


def _projector(num_tokens: int = 2, position: str = "prefix", depth: int = 2, seed: int = 0,
               share_positions: bool = False) -> MemoryProjector:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = MemoryProjector(MemoryProjectorConfig(encoder_dim=32, llm_dim=64, num_tokens=num_tokens,
                                                     depth=depth, position=position,
                                                     share_positions=share_positions))
    return proj.eval()


# --------------------------------------------------------------------------- projector


@pytest.mark.parametrize("num_tokens, depth", [(1, 1), (3, 2), (2, 3)])
def test_projector_output_shape(num_tokens: int, depth: int) -> None:
    proj = _projector(num_tokens, depth=depth)
    out = proj(torch.randn(5, 32))
    assert out.shape == (5, num_tokens, 64)
    assert proj.config.hidden_dim == 64          # default 2 * encoder_dim


def test_projector_config_rejects_unknown_position() -> None:
    with pytest.raises(ValueError):
        MemoryProjectorConfig(encoder_dim=32, llm_dim=64, position="middle")
    with pytest.raises(ValueError, match="share_positions"):
        MemoryProjectorConfig(encoder_dim=32, llm_dim=64, position="before_last", share_positions=True)


def test_set_feature_statistics_standardises() -> None:
    proj = _projector(1, depth=1)
    g = torch.Generator().manual_seed(0)
    feats = 7.0 + 3.0 * torch.randn(64, 32, generator=g)
    feats[:, 0] = 5.0                                         # a constant column: scale floored
    proj.set_feature_statistics(feats)
    torch.testing.assert_close(proj.feature_mean, feats.mean(0))
    assert proj.feature_scale[0].item() == pytest.approx(1e-4)
    seen = []
    proj.net.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    proj(feats)
    z = seen[0]
    torch.testing.assert_close(z[:, 1:].mean(0), torch.zeros(31), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[:, 1:].std(0), torch.ones(31), atol=1e-5, rtol=1e-5)
    assert torch.all(z[:, 0] == 0)


def test_projector_save_and_load_round_trip(tmp_path) -> None:
    proj = _projector(2, position="suffix")
    proj.set_feature_statistics(torch.randn(16, 32) * 2 + 1)
    proj.save_pretrained(tmp_path / "proj", safe_serialization=True)
    assert (tmp_path / "proj" / "model.safetensors").is_file()
    loaded = MemoryProjector.from_pretrained(tmp_path / "proj", use_safetensors=True).eval()
    assert torch.equal(loaded.feature_mean, proj.feature_mean)
    assert torch.equal(loaded.feature_scale, proj.feature_scale)
    assert loaded.config.position == "suffix" and loaded.config.num_tokens == 2
    assert loaded.config.encoder_dim == 32 and loaded.config.llm_dim == 64
    for (n, a), (_, b) in zip(proj.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randn(3, 32)
    torch.testing.assert_close(loaded(x), proj(x))


# --------------------------------------------------------------------------- losses


def _hand_batch() -> TeacherForcedBatch:
    target_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    target_mask = torch.tensor([[False, True, True], [True, True, True]])
    return TeacherForcedBatch(torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6, dtype=torch.long),
                              target_ids, target_mask)


def test_answer_loss_perfect_logits() -> None:
    batch = _hand_batch()
    logits = torch.zeros(2, batch.keep, 12)
    logits[:, :-1].scatter_(-1, batch.target_ids[..., None], 100.0)
    logits[0, 0] = 0.0
    logits[0, 0, 3] = 100.0      # a masked position may predict anything
    logits[:, -1, 11] = 100.0    # the last kept position predicts nothing scored
    loss, acc = answer_loss(logits, batch)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert acc.item() == pytest.approx(1.0)


def test_answer_loss_is_masked_mean_nll() -> None:
    batch = _hand_batch()
    logits = torch.randn(2, batch.keep, 12, generator=torch.Generator().manual_seed(0))
    loss, acc = answer_loss(logits, batch)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.target_ids[..., None])[..., 0]
    expected = -(logp[batch.target_mask]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    pred = logits[:, :-1].argmax(-1)
    assert acc.item() == pytest.approx((pred == batch.target_ids)[batch.target_mask].float().mean().item())


def test_distill_kl() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 50, generator=g)
    assert distill_kl(teacher, teacher.clone()).item() == pytest.approx(0.0, abs=1e-5)
    student = teacher + torch.randn(4, 50, generator=g)
    kl = distill_kl(teacher, student)
    assert kl.item() > 1e-3
    # Matches KL(P_teacher || P_student) at temperature T, times T^2, averaged over rows.
    t = 2.0
    p = torch.softmax(teacher / t, -1)
    ref = (p * (torch.log_softmax(teacher / t, -1) - torch.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    assert distill_kl(teacher, student, temperature=t).item() == pytest.approx(ref.item(), rel=1e-3)
    # Gradient reaches the student only.
    student.requires_grad_(True)
    distill_kl(teacher, student).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


# --------------------------------------------------------------------------- MemoryAugmentedLM


def test_memory_augmented_lm_needs_matching_pairs() -> None:
    llm, tok = _llm("llama")
    with pytest.raises(ValueError):
        MemoryAugmentedLM(llm, tok, [], [])
    with pytest.raises(ValueError):
        MemoryAugmentedLM(llm, tok, [_encoder()], [_projector(), _projector()])


def test_memory_tokens_concatenate_multiple_memories() -> None:
    llm, tok = _llm("llama")
    enc = _encoder()
    lm = MemoryAugmentedLM(llm, tok, [enc, enc], [_projector(1), _projector(2, seed=1)])
    toks = lm.memory_tokens(["Where is the Eiffel Tower?"])
    assert toks.shape == (1, 3, 64)
    feats = [enc.encode(["Where is the Eiffel Tower?"])] * 2
    torch.testing.assert_close(lm.memory_tokens(features=feats), toks)


def test_insert_at_prefix_and_suffix() -> None:
    llm, tok = _llm("llama")
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    prefix = MemoryAugmentedLM(llm, tok, [_encoder()], [_projector(position="prefix")])
    suffix = MemoryAugmentedLM(llm, tok, [_encoder()], [_projector(position="suffix")])
    assert prefix.insert_at(mask, torch.tensor([1, 2])).tolist() == [2, 0]
    assert suffix.insert_at(mask, torch.tensor([1, 2])).tolist() == [4, 3]
    assert suffix.insert_at(mask, None).tolist() == [5, 5]
    before_last = MemoryAugmentedLM(llm, tok, [_encoder()], [_projector(position="before_last")])
    assert before_last.insert_at(mask, torch.tensor([1, 2])).tolist() == [3, 2]
    assert before_last.insert_at(mask, None).tolist() == [4, 4]


@pytest.mark.parametrize("position", ["prefix", "suffix", "before_last"])
def test_logits_match_causal_logits(position: str) -> None:
    llm, tok = _llm("llama")
    lm = MemoryAugmentedLM(llm, tok, [_encoder()], [_projector(2, position=position)])
    prompts, targets = ["The Eiffel Tower is in", "Hi"], ["Paris", "New York"]
    batch = teacher_forced_batch(tok, prompts, targets)
    lengths = batch.target_mask.sum(1)
    with torch.no_grad():
        got = lm.logits(prompts, batch.input_ids, batch.attention_mask, batch.keep, lengths)
        memory = lm.memory_tokens(prompts)
        at = (batch.attention_mask == 0).sum(1) if position == "prefix" else batch.input_ids.shape[1] - lengths
        at = at - 1 if position == "before_last" else at
        ref = causal_logits(llm, batch.input_ids, batch.attention_mask, batch.keep, memory, at)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gptj"])
@pytest.mark.parametrize("position", ["prefix", "suffix", "before_last"])
def test_generate_runs_and_without_memory_matches_plain(name: str, position: str) -> None:
    llm, tok = _llm(name)
    lm = MemoryAugmentedLM(llm, tok, [_encoder()], [_projector(2, position=position)])
    prompts = ["The Eiffel Tower is located in", "Hi"]
    texts = lm.generate(prompts, max_new_tokens=4)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)

    prompt = prompts[0]
    ids, mask = prompt_batch(tok, [prompt])
    with torch.no_grad():
        plain = llm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    plain_text = tok.decode(plain[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert lm.generate([prompt], max_new_tokens=5, use_memory=False) == [plain_text]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("position", ["prefix", "suffix", "before_last"])
def test_generate_first_token_is_argmax_with_memory(name: str, position: str) -> None:
    llm, tok = _llm(name)
    lm = MemoryAugmentedLM(llm, tok, [_encoder()], [_projector(2, position=position, seed=3)])
    prompt = "The Eiffel Tower is located in"
    ids, mask = prompt_batch(tok, [prompt])
    with torch.no_grad():
        logits = lm.logits([prompt], ids, mask, 1)
    expected = tok.decode(logits[0, -1].argmax().item(), skip_special_tokens=True).strip()
    assert lm.generate([prompt], max_new_tokens=1) == [expected]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_generate_with_shared_positions_continues_the_scored_sequence(name: str, position: str) -> None:
    """Greedy generation with shared memory positions picks, at every step, the argmax of the
    scoring path (`logits` with the generated tokens teacher-forced), which numbers them the same."""
    llm, tok = _llm(name)
    lm = MemoryAugmentedLM(llm, tok, [_encoder()], [_projector(2, position=position, seed=3, share_positions=True)])
    prompt = "The Eiffel Tower is located in"
    ids, mask = prompt_batch(tok, [prompt])
    steps = []
    with torch.no_grad():
        for _ in range(3):
            full = torch.cat([ids, torch.tensor([steps], dtype=torch.long)], dim=1)
            logits = lm.logits([prompt], full, torch.ones_like(full), 1, torch.tensor([len(steps)]))
            steps.append(int(logits[0, -1].argmax()))
    assert lm.generate([prompt], max_new_tokens=3) == [tok.decode(steps, skip_special_tokens=True).strip()]
    unshared = MemoryAugmentedLM(llm, tok, [_encoder()], [_projector(2, position=position, seed=3)])
    with torch.no_grad():
        assert not torch.allclose(unshared.logits([prompt], ids, mask, 1), lm.logits([prompt], ids, mask, 1))


def test_zero_init_output_starts_every_memory_at_one_vector() -> None:
    proj = MemoryProjector(MemoryProjectorConfig(encoder_dim=8, llm_dim=6, depth=2, zero_init_output=True))
    out = proj(torch.randn(5, 8))
    assert torch.equal(out, torch.zeros_like(out))
    plain = MemoryProjector(MemoryProjectorConfig(encoder_dim=8, llm_dim=6, depth=2))
    assert plain(torch.randn(5, 8)).std() > 0


def test_gated_projector_mixes_memory_and_null_token(tmp_path) -> None:
    cfg = MemoryProjectorConfig(encoder_dim=8, llm_dim=6, depth=2, num_tokens=2, gated=True)
    proj = MemoryProjector(cfg).eval()
    with torch.no_grad():
        proj.null_tokens.copy_(torch.randn(2, 6))
    memory = torch.randn(4, 8)
    g = proj.gate_values(memory)
    assert g.shape == (4,) and ((g > 0) & (g < 1)).all()
    own = proj.net((memory - proj.feature_mean) / proj.feature_scale).view(4, 2, 6)
    expected = g[:, None, None] * own + (1 - g[:, None, None]) * proj.null_tokens
    torch.testing.assert_close(proj(memory), expected)
    with torch.no_grad():                   # a closed gate gives exactly the null tokens
        proj.gate[-1].weight.zero_()
        proj.gate[-1].bias.fill_(-1e4)
    torch.testing.assert_close(proj(memory), proj.null_tokens.expand(4, -1, -1))
    proj.save_pretrained(tmp_path / "p", safe_serialization=True)
    again = MemoryProjector.from_pretrained(tmp_path / "p", use_safetensors=True).eval()
    torch.testing.assert_close(again(memory), proj(memory))


def test_gate_started_from_the_existence_head_is_its_in_scope_probability() -> None:
    from mindbridge.pretraining import mlp
    torch.manual_seed(0)
    head = mlp(8, 4, 2, depth=2)
    proj = MemoryProjector(MemoryProjectorConfig(encoder_dim=8, llm_dim=6, gated=True, gate_hidden=4))
    proj.init_gate_from_exist_head(head.state_dict())
    memory = torch.randn(5, 8)
    torch.testing.assert_close(proj.gate_values(memory), torch.softmax(head(memory), -1)[:, 1])
    with pytest.raises(ValueError, match="shape"):
        proj.init_gate_from_exist_head(mlp(8, 3, 2, depth=2).state_dict())


# --------------------------------------------------------------------------- bridge training step


def _bridge_module(position: str = "suffix", prefixes: tuple[str, ...] = (), prefix_probs=None,
                   edit_targets=("Rome", "Goethe"), **hparams):
    from lit_modules.bridge import MemoryBridgeModule
    llm, tok = _llm("llama")
    module = MemoryBridgeModule(llm, tok, _encoder(), _projector(1, position=position), **hparams)
    edits = ["The Eiffel Tower is in", "Who wrote Hamlet?"]
    outs = ["Where is Rome?", "Name a colour:", "Who is the author of Faust?"]
    module.prepare(edits, outs, paraphrase_pairs=[("Who wrote Faust?", "Faust was written by whom?"),
                                                  ("Where is Rome?", "In which country is Rome?")],
                   prefixes=prefixes, prefix_probs=prefix_probs, edit_targets=edit_targets,
                   old_targets=["Paris", None], out_answers=["Italy", None, "Goethe"])
    return module, outs


def _out_batch(tok, outs: list[str], answers: list[str | None]) -> dict:
    from mindbridge.tokenization import answer_batch
    ids, mask = prompt_batch(tok, outs)
    answer_ids, answer_mask = answer_batch(tok, answers)
    return {"index": torch.arange(len(outs)), "prompt": outs, "answer": answers, "input_ids": ids,
            "attention_mask": mask, "answer_ids": answer_ids, "answer_mask": answer_mask}


@pytest.mark.parametrize("position", ["suffix", "before_last"])
def test_kl_on_answer_pairs_cached_prompts_equal_full_forward(position: str) -> None:
    module, outs = _bridge_module(position, kl_answer_tokens=32)
    module.eval()
    _, tok = _llm("llama")
    out = _out_batch(tok, outs, ["Italy, in Europe", None, "Goethe"])
    with torch.no_grad():
        teacher, student = module._out_of_scope_logits(out)
        n_answer = out["answer_mask"].sum().item()
        # one pair after each prompt, one more per answer token but the first
        assert teacher.shape[0] == student.shape[0] == len(outs) + n_answer - 2
        module._out_kv = None                  # the full-forward path (prefix memories, LoRA)
        teacher_full, student_full = module._out_of_scope_logits(out)
    torch.testing.assert_close(teacher, teacher_full, atol=2e-2, rtol=0)   # the cache keeps bf16 logits
    torch.testing.assert_close(student, student_full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("position", ["suffix", "before_last"])
def test_answer_logits_cached_prompts_equal_full_forward(position: str) -> None:
    module, _ = _bridge_module(position)
    module.eval()
    _, tok = _llm("llama")
    prompts, targets = ["The Eiffel Tower is in", "Who wrote Hamlet?"], ["Paris, France", "Shakespeare"]
    edit = {"index": torch.arange(2), "tf": teacher_forced_batch(tok, prompts, targets)}
    with torch.no_grad():
        cached = module._answer_logits(edit)
        module._edit_kv = None
        full = module._answer_logits(edit)
    assert cached.shape == (edit["tf"].target_mask.sum(), module.edited.llm.config.vocab_size)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_kl_answer_tokens_caps_the_answer_positions() -> None:
    module, outs = _bridge_module(kl_answer_tokens=2)
    module.eval()
    _, tok = _llm("llama")
    out = _out_batch(tok, outs, ["Italy, in southern Europe", None, "Johann Wolfgang von Goethe"])
    with torch.no_grad():
        teacher, student = module._out_of_scope_logits(out)
    assert teacher.shape[0] == student.shape[0] == len(outs) + 2     # one extra pair per answer


def test_answer_teacher_logits_are_computed_once_per_prompt() -> None:
    module, outs = _bridge_module(kl_answer_tokens=2)
    module.eval()
    _, tok = _llm("llama")
    out = _out_batch(tok, outs, ["Italy, in southern Europe", None, "Johann Wolfgang von Goethe"])
    calls = []
    batch = module._out_kv.batch
    module._out_kv.batch = lambda index: calls.append(list(index)) or batch(index)
    with torch.no_grad():
        first = module._out_of_scope_logits(out)
        second = module._out_of_scope_logits(out)
    assert len(calls) == 3              # student, teacher, then the student only
    assert sorted(module._answer_teachers) == [0, 1, 2]
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


def test_kl_on_answer_off_scores_only_the_position_after_the_prompt() -> None:
    module, outs = _bridge_module()
    module.eval()
    _, tok = _llm("llama")
    with torch.no_grad():
        teacher, student = module._out_of_scope_logits(_out_batch(tok, outs, ["Italy", None, "Goethe"]))
    assert teacher.shape[0] == student.shape[0] == len(outs)


def test_paraphrase_jitter_moves_rows_by_non_edited_displacements() -> None:
    module, _ = _bridge_module(paraphrase_jitter=1.0)
    enc = _encoder()
    expected = (enc.encode(["Faust was written by whom?", "In which country is Rome?"])
                - enc.encode(["Who wrote Faust?", "Where is Rome?"]))
    torch.testing.assert_close(module._displacements[0], expected)
    table = module._edit_features
    module.train()
    moved = module._features(table, torch.tensor([0, 1, 1, 0]))[0] - table[0][torch.tensor([0, 1, 1, 0])]
    # every row moved by exactly one of the displacements
    dist = torch.cdist(moved, expected)
    assert (dist.min(1).values < 1e-5).all()
    module.eval()
    torch.testing.assert_close(module._features(table, torch.tensor([0, 1]))[0], table[0][:2])


PREFIXES = ("Rome is in Italy.", "Red is a colour.")


def test_prefix_augmentation_caches_prefixed_copies_of_every_edit() -> None:
    module, _ = _bridge_module(prefixes=PREFIXES, prefix_prob=1.0, prefix_variants=3)
    edits = ["The Eiffel Tower is in", "Who wrote Hamlet?"]
    texts = module._edit_texts
    assert texts[:2] == edits and len(texts) == 8
    for row, text in enumerate(texts[2:], start=2):
        prefix, _, rest = text.partition(". ")
        assert f"{prefix}." in PREFIXES and rest == edits[row % 2]
    assert len(module._edit_features[0]) == len(module._edit_kv) == 8
    index = torch.tensor([0, 1, 1, 0])
    module.train()
    rows = module._edit_rows(index)
    assert (rows >= 2).all() and torch.equal(rows % 2, index)       # always a prefixed copy of the same edit
    module.eval()
    assert module._edit_rows(index) is index                        # never when scoring


def test_prefix_augmentation_off_reads_the_bare_prompts() -> None:
    module, _ = _bridge_module(prefixes=PREFIXES, prefix_prob=0.0)
    assert module._edit_texts == ["The Eiffel Tower is in", "Who wrote Hamlet?"]
    module.train()
    index = torch.tensor([0, 1])
    assert module._edit_rows(index) is index


def test_prefix_probability_per_edit() -> None:
    # The stage gives CounterFact edits the prefix probability and others 0 (`prefix_datasets`).
    module, _ = _bridge_module(prefixes=PREFIXES, prefix_probs=[1.0, 0.0], prefix_variants=2)
    assert len(module._edit_texts) == 6
    module.train()
    index = torch.tensor([0, 1] * 20)
    rows = module._edit_rows(index)
    assert (rows[index == 0] >= 2).all() and (rows[index == 1] == 1).all()
    with pytest.raises(ValueError, match="3 prefix probabilities for 2 edits"):
        _bridge_module(prefixes=PREFIXES, prefix_probs=[1.0, 0.0, 0.5])


def test_prefixed_rows_cached_equal_full_forward() -> None:
    module, _ = _bridge_module(prefixes=PREFIXES, prefix_prob=0.5, prefix_variants=2)
    _, tok = _llm("llama")
    prompts, targets = ["The Eiffel Tower is in", "Who wrote Hamlet?"] * 3, ["Paris, France", "Shakespeare"] * 3
    edit = {"index": torch.tensor([0, 1] * 3), "target": targets, "tf": teacher_forced_batch(tok, prompts, targets)}
    module.train()
    with torch.no_grad():
        torch.manual_seed(4)
        cached = module._answer_logits(edit)
        module._edit_kv = None                       # the full forward re-tokenises the prefixed prompts
        torch.manual_seed(4)
        full = module._answer_logits(edit)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_prefix_augmentation_without_prefixes_is_refused() -> None:
    with pytest.raises(ValueError, match="distractor prefixes"):
        _bridge_module(prefixes=(), prefix_prob=0.5)


def test_lm_head_dtype_must_be_a_floating_point_dtype(monkeypatch) -> None:
    with pytest.raises(ValueError, match="lm_head_dtype='int8'"):
        _bridge_module(lm_head_dtype="int8")
    with pytest.raises(ValueError, match="lm_head_dtype='fp13'"):
        _bridge_module(lm_head_dtype="fp13")
    module, _ = _bridge_module(lm_head_dtype="bfloat16")
    assert module._head_weight is None                                   # made on the fit device
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.warns(UserWarning, match="no native bfloat16"):
        module.on_fit_start()
    assert module._head_weight.dtype == torch.bfloat16 and module.student_head_dtype == "bfloat16"
    assert "_head_weight" not in "".join(module.state_dict())           # never checkpointed
    auto, _ = _bridge_module(lm_head_dtype="auto")
    auto.on_fit_start()                                                  # emulated here: fp32
    assert auto._head_weight is None and auto.student_head_dtype == "float32"


# --------------------------------------------------------------------------- training vocabulary


def test_training_vocabulary_restricts_and_maps_positions() -> None:
    from mindbridge.bridge import TrainingVocabulary
    vocab = TrainingVocabulary(torch.tensor([7, 3, 3, 11]), vocab_size=16)
    assert vocab.ids.tolist() == [3, 7, 11] and len(vocab) == 3
    logits = torch.arange(32.0).view(2, 16)
    assert vocab.restrict(logits).tolist() == [[3, 7, 11], [19, 23, 27]]
    assert vocab.positions(torch.tensor([11, 3])).tolist() == [2, 0]
    assert vocab.rows(torch.arange(16.0)[:, None]).flatten().tolist() == [3, 7, 11]
    with pytest.raises(ValueError, match=r"token ids \[5\] are not in the training vocabulary"):
        vocab.positions(torch.tensor([3, 5]))
    with pytest.raises(ValueError, match="must lie in"):
        TrainingVocabulary(torch.tensor([16]), vocab_size=16)


def test_training_vocabulary_from_the_unedited_model_holds_targets_and_top_tokens() -> None:
    from mindbridge.bridge import TrainingVocabulary
    from mindbridge.tokenization import encode_answer_tokens
    llm, tok = _llm("llama")
    prompts, answers = ["The Eiffel Tower is in", "Name a colour:"], ["Paris, France", None]
    vocab = TrainingVocabulary.from_unedited_model(llm, tok, prompts, answers, top_k=3, extra_answers=["Rome"])
    ids = set(vocab.ids.tolist())
    assert set(encode_answer_tokens(tok, "Paris, France")) <= ids and set(encode_answer_tokens(tok, "Rome")) <= ids
    tf = teacher_forced_batch(tok, prompts[:1], answers[:1])
    with torch.no_grad():
        full = causal_logits(llm, tf.input_ids, tf.attention_mask, keep=tf.target_ids.shape[1] + 1)
        bare = causal_logits(llm, *prompt_batch(tok, prompts[1:]), keep=1)
    # the top-3 after the prompt and after every answer token but the last, and after the bare prompt
    scored = torch.cat([full[0, :-1].topk(3).indices.flatten(), bare[0, -1].topk(3).indices])
    assert set(scored.tolist()) <= ids
    assert len(ids) < llm.config.vocab_size


def test_training_vocabulary_of_every_token_gives_the_full_losses() -> None:
    """With every token a candidate the restricted step is the full one, loss and gradients."""
    losses, grads = [], []
    for top_k in (None, 10**6):
        torch.manual_seed(0)
        module, outs = _bridge_module(kl_answer_tokens=2, train_vocab_top_k=top_k, feature_noise=0.0)
        _, tok = _llm("llama")
        module.on_fit_start()
        module.eval()                            # no dropout: the two steps see the same projector
        batch = {"edit": {"index": torch.arange(2), "prompt": ["x", "y"],
                          "tf": teacher_forced_batch(tok, ["The Eiffel Tower is in", "Who wrote Hamlet?"],
                                                     ["Rome", "Goethe"])},
                 "out": _out_batch(tok, outs, ["Italy", None, "Goethe"])}
        module.log = lambda *a, **k: None
        loss = module.training_step(batch, 0)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in module.projector.parameters() if p.grad is not None]))
        if top_k:
            assert len(module.vocabulary) == module.edited.llm.config.vocab_size
            assert module._head_weight.shape[0] == len(module.vocabulary)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_training_vocabulary_scores_the_student_over_the_candidates_only() -> None:
    module, outs = _bridge_module(kl_answer_tokens=2, train_vocab_top_k=2)
    _, tok = _llm("llama")
    module.on_fit_start()
    size = len(module.vocabulary)
    assert 0 < size < module.edited.llm.config.vocab_size
    # The KL's teachers were computed while the vocabulary was built, and their top-2 are in it.
    ids = set(module.vocabulary.ids.tolist())
    assert sorted(module._answer_teachers) == [0, 1, 2]
    teachers = [module._out_kv.teacher_logits([0, 1, 2]), *module._answer_teachers.values()]
    assert all(set(t.float().topk(2, dim=-1).indices.flatten().tolist()) <= ids for t in teachers)
    seen = []
    head = module.edited.llm.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: seen.append(out.shape[-1]))
    from mindbridge.lm import lm_head_in
    edit = {"index": torch.arange(2), "tf": teacher_forced_batch(tok, ["The Eiffel Tower is in", "Who wrote Hamlet?"],
                                                               ["Rome", "Goethe"])}
    try:
        with lm_head_in(module.edited.llm, module._head_weight, module.vocabulary.ids):
            student = module._answer_logits(edit)
            with torch.no_grad():
                plain = module._answer_logits(edit)
    finally:
        handle.remove()
    assert student.shape[-1] == size and student.requires_grad
    assert plain.shape[-1] == module.edited.llm.config.vocab_size        # teachers, evaluation: all tokens
    torch.testing.assert_close(student.detach(), module.vocabulary.restrict(plain), atol=1e-5, rtol=1e-5)
    l1, _ = answer_loss(student, edit["tf"], module.vocabulary)
    assert torch.isfinite(l1)


def test_training_vocabulary_needs_the_edit_targets() -> None:
    with pytest.raises(ValueError, match="train_vocab_top_k needs the edit targets"):
        _bridge_module(train_vocab_top_k=4, edit_targets=None)


def test_training_vocabulary_with_a_bfloat16_head_copies_only_the_candidate_rows(monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    module, _ = _bridge_module(train_vocab_top_k=2, lm_head_dtype="auto")
    module.on_fit_start()
    weight = module.edited.llm.get_output_embeddings().weight
    assert module._head_weight.dtype == torch.bfloat16 and module.student_head_dtype == "bfloat16"
    torch.testing.assert_close(module._head_weight, module.vocabulary.rows(weight).to(torch.bfloat16))
