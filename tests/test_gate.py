"""mindbridge.gate: the memory read gate, its calibration, and gated reading on tiny models."""

from __future__ import annotations

import functools

import pytest
import torch

from mindbridge.bridge import MemoryAugmentedLM, MemoryProjector, MemoryProjectorConfig
from mindbridge.encoder import MemoryEncoder
from mindbridge.gate import MemoryGate, build_gate, calibrate_threshold, nearest_similarity
from mindbridge.lm import PlainLM
from mindbridge.loading import load_causal_lm, load_masked_lm
from mindbridge.tokenization import teacher_forced_batch

TINY_LLMS = {
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4},
    "gptj": {"model_type": "gptj", "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8},
    "gemma3": {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
    "mixtral": {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                "num_experts_per_tok": 2},
}
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64}

FACTS = ["The Eiffel Tower is located in", "Who wrote the novel Dune?"]
OTHERS = ["What is the boiling point of water?", "Name a river in Africa.", "Hi"]


@functools.lru_cache(maxsize=None)
def _llm(name: str):
    return load_causal_lm("random", random_config=TINY_LLMS[name])


@functools.lru_cache(maxsize=None)
def _encoder() -> MemoryEncoder:
    mlm, tok = load_masked_lm("random", random_config=TINY_BERT)
    return MemoryEncoder(mlm.requires_grad_(False), tok, "mean", 48)


def _projector(position: str = "suffix", seed: int = 0) -> MemoryProjector:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = MemoryProjector(MemoryProjectorConfig(encoder_dim=32, llm_dim=64, num_tokens=1, position=position,
                                                     share_positions=position != "before_last"))
        # A large output so that the memory visibly changes the LLM's answers.
        torch.nn.init.normal_(proj.net[-1].bias, std=3.0)
    return proj.eval()


def _gate(threshold: float) -> MemoryGate:
    return MemoryGate(_encoder().encode(FACTS), threshold)


# --------------------------------------------------------------------------- scores and calibration


def test_nearest_similarity_is_exact_across_key_chunks() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1)
    queries = torch.randn(7, 8, generator=g)
    best, where = nearest_similarity(queries, keys, chunk=6)
    full = torch.nn.functional.normalize(queries, dim=-1) @ keys.T
    torch.testing.assert_close(best, full.max(1).values)
    assert torch.equal(where, full.argmax(1))


def test_a_stored_fact_opens_its_own_gate() -> None:
    gate = _gate(0.999)
    assert gate.is_open(_encoder().encode(FACTS)).all()
    assert gate.scores(_encoder().encode(FACTS)) == pytest.approx([1.0, 1.0], abs=1e-5)


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.1, 0.25, 0.5])
def test_calibration_lets_at_most_the_given_fraction_through(rate: float) -> None:
    scores = torch.rand(400, generator=torch.Generator().manual_seed(1))
    threshold = calibrate_threshold(scores, rate)
    opened = int((scores >= threshold).sum())
    # As many as the rate allows (rounded down), no more and no fewer.
    assert opened == int(rate * len(scores))


def test_calibration_refuses_nothing_to_calibrate_on_and_bad_rates() -> None:
    with pytest.raises(ValueError, match="held-out"):
        calibrate_threshold(torch.empty(0), 0.01)
    with pytest.raises(ValueError, match="false_open_rate"):
        calibrate_threshold(torch.rand(10), 1.0)


def test_build_gate_calibrates_on_the_held_out_prompts_only() -> None:
    gate, info = build_gate(_encoder(), FACTS, OTHERS, false_open_rate=0.0)
    assert info["calibration_prompts"] == len(OTHERS) and info["calibration_open_rate"] == 0.0
    assert not gate.is_open(_encoder().encode(OTHERS)).any()
    assert gate.is_open(_encoder().encode(FACTS)).all()


# --------------------------------------------------------------------------- gated reading


def _teacher_forced(tok, prompts):
    batch = teacher_forced_batch(tok, prompts, ["Paris"] * len(prompts))
    return batch, batch.target_mask.sum(1)


@pytest.mark.parametrize("name", list(TINY_LLMS))
@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_a_closed_gate_gives_the_unedited_logits_bit_for_bit(name: str, position: str) -> None:
    llm, tok = _llm(name)
    prompts = FACTS + OTHERS
    batch, lengths = _teacher_forced(tok, prompts)
    closed = MemoryAugmentedLM(llm, tok, [_encoder()], [_projector(position)], [_gate(2.0)])   # never opens
    with torch.no_grad():
        got = closed.logits(prompts, batch.input_ids, batch.attention_mask, batch.keep, lengths)
    plain = PlainLM(llm, tok).logits(prompts, batch.input_ids, batch.attention_mask, batch.keep, lengths)
    assert torch.equal(got, plain)


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral"])
def test_a_mixed_batch_reads_the_memory_only_where_the_gate_opens(name: str) -> None:
    llm, tok = _llm(name)
    prompts = FACTS + OTHERS
    batch, lengths = _teacher_forced(tok, prompts)
    projector = _projector()
    gate = _gate(0.999)
    opened = gate.is_open(_encoder().encode(prompts))
    assert opened.tolist() == [True, True, False, False, False]
    gated = MemoryAugmentedLM(llm, tok, [_encoder()], [projector], [gate])
    always = MemoryAugmentedLM(llm, tok, [_encoder()], [projector])
    with torch.no_grad():
        got = gated.logits(prompts, batch.input_ids, batch.attention_mask, batch.keep, lengths)
        read = always.logits(prompts, batch.input_ids, batch.attention_mask, batch.keep, lengths)
    plain = PlainLM(llm, tok).logits(prompts, batch.input_ids, batch.attention_mask, batch.keep, lengths)
    assert torch.equal(got[~opened], plain[~opened])
    torch.testing.assert_close(got[opened], read[opened], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[opened], plain[opened], atol=1e-3)       # the memory was read


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_answers_closed_prompts_as_the_unedited_llm(name: str) -> None:
    llm, tok = _llm(name)
    prompts = FACTS + OTHERS
    gated = MemoryAugmentedLM(llm, tok, [_encoder()], [_projector()], [_gate(0.999)])
    always = MemoryAugmentedLM(llm, tok, [_encoder()], [_projector()])
    got = gated.generate(prompts, max_new_tokens=4)
    unedited = [gated.generate([p], max_new_tokens=4, use_memory=False)[0] for p in OTHERS]
    assert got[len(FACTS):] == unedited
    assert got[:len(FACTS)] == [always.generate([p], max_new_tokens=4)[0] for p in FACTS]


def test_each_memory_gates_its_own_token_block() -> None:
    llm, tok = _llm("llama")
    enc = _encoder()
    first = MemoryGate(enc.encode(FACTS[:1]), 0.999)          # holds the first fact only
    second = MemoryGate(enc.encode(FACTS[1:]), 0.999)         # holds the second only
    proj_a, proj_b = _projector(seed=1), _projector(seed=2)
    both = MemoryAugmentedLM(llm, tok, [enc, enc], [proj_a, proj_b], [first, second])
    only_a = MemoryAugmentedLM(llm, tok, [enc], [proj_a])
    only_b = MemoryAugmentedLM(llm, tok, [enc], [proj_b])
    assert both.open_gates(both.memory_features(FACTS)).tolist() == [[True, False], [False, True]]
    for prompt, alone in zip(FACTS, (only_a, only_b)):
        batch, lengths = _teacher_forced(tok, [prompt])
        with torch.no_grad():
            got = both.logits([prompt], batch.input_ids, batch.attention_mask, batch.keep, lengths)
            want = alone.logits([prompt], batch.input_ids, batch.attention_mask, batch.keep, lengths)
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- the pipeline


def test_the_threshold_is_calibrated_on_prompts_stage_one_never_trains_on(tiny_cfg, tmp_path, monkeypatch):
    """Calibration prompts: out-of-scope prompts held out of Stage I's stream; never an
    evaluation prompt (edit, paraphrase or locality) of any edit."""
    import lit_modules.stages as stages
    from lit_modules.pretrain import MemoryPretrainModule
    from train import train

    seen: dict[str, list] = {"calibration": [], "trained": [], "edits": []}
    real_build, real_step = stages.build_gate, MemoryPretrainModule.training_step

    def build(encoder, fact_prompts, held_out_prompts, rate):
        seen["calibration"] += held_out_prompts
        seen["edits"] += fact_prompts
        return real_build(encoder, fact_prompts, held_out_prompts, rate)

    def step(self, batch, batch_idx):
        seen["trained"] += batch["out"]["prompt"]
        return real_step(self, batch, batch_idx)
    monkeypatch.setattr(stages, "build_gate", build)
    monkeypatch.setattr(MemoryPretrainModule, "training_step", step)
    metrics = train(tiny_cfg("stage=pretrain"), tmp_path / "run")

    cfg = tiny_cfg()
    from data.datamodule import EditDataModule
    from omegaconf import OmegaConf
    dm = EditDataModule(**OmegaConf.to_container(cfg.data, resolve=True))
    dm.setup()
    evaluation = {p for r in dm.edits for p in (r.prompt, *r.rephrase_prompts, *r.loc_prompts)}
    calibration = set(seen["calibration"])
    assert calibration and seen["trained"]
    assert not calibration & evaluation
    assert not calibration & set(seen["trained"])
    assert sorted(seen["edits"]) == sorted(r.prompt for r in dm.edits)
    assert metrics["gate_calibration_prompts"] == len(seen["calibration"])


def test_the_gate_benchmark_times_gated_generation_against_the_unedited_llm(tiny_cfg, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from train import train
    run = tmp_path / "run"
    train(tiny_cfg(run_dir=run), run)
    out = tmp_path / "memory_gate.json"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "benchmarks" / "memory_gate.py"), "--memory", str(run / "memory"),
                    "--llm", "tiny_llama", "--prompts", "2", "--tokens", "2", "--repeats", "1", "--sizes", "64",
                    "--threads", "1", "--out", str(out)], check=True, cwd=root, capture_output=True)
    result = json.loads(out.read_text())
    assert set(result["generation"]) == {"edit", "locality"}
    assert result["generation"]["edit"]["gate_open_rate"] == 100.0      # a stored prompt opens its gate
    for row in result["generation"].values():
        assert row["seconds_unedited"] > 0 and row["gated_over_unedited"] > 0
    assert result["gate_cost"]["ms_per_prompt_features"] > 0
    assert [s["keys"] for s in result["search_scaling"]] == [64]
