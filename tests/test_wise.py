"""WISE: the side memory in every layout, per-example routing and its pinning while decoding, the
margin-loss editing, masks, TIES merging, shards (Merge / Retrieve), persistence and the stage."""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mindbridge.artifacts import ArtifactError
from mindbridge.lm import causal_logits
from mindbridge.loading import load_causal_lm
from mindbridge.facts import Fact
from mindbridge.tokenization import prompt_batch, teacher_forced_batch
from mindbridge.wise import (WISE, BlockRunner, Memory, WISEHParams, WISELayer, length_buckets, prompt_tokens,
                             random_mask, reduce_gaps, ties_merge, trim_magnitude, without_first_token)
from tests.conftest import CONFIG_DIR

SHARED_KEYS = {"rel", "gen", "loc", "avg", "pre_rel", "pre_gen", "rel_em", "gen_em", "loc_em", "method", "llm",
               "encoder", "dataset", "num_edits", "train_seconds", "edit_seconds", "eval_seconds"}
FACTS = [Fact("a", "Eiffel Tower", "The Eiffel Tower is located in", "Rome"),
         Fact("b", "Barack Obama", "Where was Barack Obama born?", "Paris city"),
         Fact("c", "Danube", "Which sea does the Danube flow into?", "the Baltic")]
IRRELEVANT = ["Hello there, my old friend. Nice", "The weather today is sunny and warm"]
PROBES = ["The Eiffel Tower is located in", "Hello there, my old friend", "Where was Barack Obama born?"]
# Tiny random models: activations are ~100x smaller than a real LLM's, so are the margins.
TINY = dict(n_iter=25, lr=20.0, alpha=0.02, beta=0.3, gamma=0.2, prefix_lengths=(3,), prefixes_per_length=2,
            norm_constraint=None)


@functools.lru_cache(maxsize=None)
def _load(name: str, seed: int = 0):
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "llm" / f"{name}.yaml")
    return load_causal_lm(cfg.source, random_config=OmegaConf.to_container(cfg.random_config), seed=seed)


@contextlib.contextmanager
def attached(name: str, layer: int = 1, **hp):
    model, tok = _load(name)
    wise = WISE(model, tok, layer, hparams=WISEHParams(**{**TINY, **hp}), llm_name=name)
    try:
        yield wise
    finally:
        wise.remove()


def _logits(model, tok, prompts=PROBES, keep: int = 3) -> torch.Tensor:
    ids, mask = prompt_batch(tok, prompts)
    with torch.no_grad():
        return causal_logits(model, ids, mask, keep)


def _perturbed(wise: WISE, scale: float = 0.5, seed: int = 0) -> Memory:
    g = torch.Generator().manual_seed(seed)
    return Memory({n: w.detach() + scale * torch.randn(w.shape, generator=g)
                   for n, w in wise.wrapper.main_weights().items()}, min_act=0.0, shards=[0], edits=1)


# --------------------------------------------------------------------------- layouts

LAYOUTS = [("tiny_llama", "model.layers.1.mlp.down_proj", ["weight"]),
           ("tiny_gpt2", "transformer.h.1.mlp.c_proj", ["weight"]),
           ("tiny_gptj", "transformer.h.1.mlp.fc_out", ["weight"]),
           ("tiny_gemma3", "model.layers.1.mlp.down_proj", ["weight"]),
           ("tiny_mixtral", "model.layers.1.mlp", ["experts.down_proj"]),
           ("tiny_qwen2_moe", "model.layers.1.mlp", ["experts.down_proj", "shared_expert.down_proj.weight"])]
NAMES = [n for n, _, _ in LAYOUTS]


@pytest.mark.parametrize("name,path,values", LAYOUTS)
def test_each_layout_copies_its_value_matrices_and_an_empty_side_memory_is_bit_identical(name, path, values):
    model, tok = _load(name)
    before = _logits(model, tok)
    original = model.get_submodule(path)
    with attached(name) as wise:
        assert isinstance(model.get_submodule(path), WISELayer) and wise.wrapper.inner is original
        assert wise.wrapper.value_names == values
        for n in values:        # a copy with the main memory's shape (Conv1D keeps its (in, out) layout)
            main = original.get_parameter(n)
            assert wise.side.weights[n].shape == main.shape and wise.side.weights[n] is not main
            assert torch.equal(wise.side.weights[n], main)
        assert torch.equal(_logits(model, tok), before)
    assert model.get_submodule(path) is original
    assert torch.equal(_logits(model, tok), before)


@pytest.mark.parametrize("name", NAMES)
def test_running_from_the_side_memory_layer_on_cached_inputs_equals_the_full_forward(name):
    """Editing steps run only the layers from the wrapped one up; this must not change the logits."""
    model, tok = _load(name)
    with attached(name) as wise:
        memory = _perturbed(wise, 0.3)
        ids, mask = prompt_batch(tok, PROBES)
        runner = BlockRunner(model, wise.layer)
        hidden = runner.capture(ids, mask)
        wise.wrapper.editing = memory.weights
        try:
            with torch.no_grad():
                got = runner.logits(hidden, ids, mask, 4)
                want = causal_logits(model, ids, mask, 4)
        finally:
            wise.wrapper.editing = None
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- routing


@pytest.mark.parametrize("name", NAMES)
def test_routing_is_decided_per_example_inside_a_mixed_batch(name):
    model, tok = _load(name)
    base = _logits(model, tok)
    with attached(name) as wise:
        memory = _perturbed(wise, 0.5)
        wise.wrapper.candidates = [(memory, 0.0)]
        _, gaps = wise.routes(PROBES)
        gaps = gaps[:, 0]
        hi, lo = int(gaps.argmax()), int(gaps.argmin())
        assert gaps[hi] > gaps[lo]
        eps = float((gaps[hi] + gaps[lo]) / 2)
        wise.wrapper.candidates = [(memory, eps)]
        route, _ = wise.routes(PROBES)
        assert route[hi] == 0 and route[lo] == -1
        ids, mask = prompt_batch(tok, PROBES)
        mixed = wise.logits(PROBES, ids, mask, 3)
        with wise.wrapper.set_mode("side"):
            side = causal_logits(model, ids, mask, 3)
        # A row routed to the main memory is the unedited model exactly; a routed row is the side memory's.
        assert torch.equal(mixed[lo], base[lo])
        torch.testing.assert_close(mixed[hi], side[hi])
        assert not torch.allclose(side[lo], base[lo])
        # Each row alone gets the decision it got inside the batch.
        for row in (hi, lo):
            alone, _ = wise.routes([PROBES[row]])
            assert int(alone[0]) == int(route[row])


def test_routing_ignores_the_teacher_forced_answer_tokens():
    model, tok = _load("tiny_llama")
    with attached("tiny_llama") as wise:
        memory = _perturbed(wise, 0.5)
        wise.wrapper.candidates = [(memory, 0.0)]
        seen = []
        wise.wrapper.probe = lambda layer: seen.append(layer.last_gaps.clone())
        b = teacher_forced_batch(tok, ["The Eiffel Tower is located in"], ["Rome and a very long answer"])
        wise.logits(None, b.input_ids, b.attention_mask, b.keep, b.target_mask.sum(1))
        wise.wrapper.probe = None
        _, prompt_only = wise.routes(["The Eiffel Tower is located in"])
        torch.testing.assert_close(seen[0], prompt_only, atol=1e-5, rtol=1e-4)


def test_the_route_is_pinned_for_every_decoding_step():
    model, tok = _load("tiny_llama")
    with attached("tiny_llama") as wise:
        memory = _perturbed(wise, 0.5)
        wise.wrapper.candidates = [(memory, 0.0)]
        _, gaps = wise.routes(PROBES)
        gaps = gaps[:, 0]
        eps = float(gaps.median())
        wise.wrapper.candidates = [(memory, eps)]
        want, _ = wise.routes(PROBES)
        assert (want == 0).any() and (want == -1).any()
        seen = []
        wise.wrapper.probe = lambda layer: seen.append(layer.last_route.clone())
        mixed = wise.generate(PROBES, max_new_tokens=4)
        wise.wrapper.probe = None
        assert len(seen) == 4 and all(torch.equal(r, want) for r in seen)
        # Each row generates what the memory it was routed to generates.
        base = wise.generate(PROBES, max_new_tokens=4, use_wise=False)
        with wise.wrapper.set_mode("side"):
            side = wise.generate(PROBES, max_new_tokens=4)
        for row, r in enumerate(want.tolist()):
            assert mixed[row] == (side[row] if r == 0 else base[row])


def test_top1_retrieval_picks_the_memory_with_the_largest_gap_above_its_threshold():
    model, tok = _load("tiny_llama")
    with attached("tiny_llama") as wise:
        small, large = _perturbed(wise, 0.1, seed=1), _perturbed(wise, 0.8, seed=2)
        wise.wrapper.candidates = [(small, 0.0), (large, 0.0)]
        route, gaps = wise.routes(PROBES)
        assert (gaps[:, 1] > gaps[:, 0]).all() and (route == 1).all()
        wise.wrapper.candidates = [(small, 0.0), (large, 1e9)]      # above no threshold: next best
        route, _ = wise.routes(PROBES)
        assert (route == 0).all()
        wise.wrapper.candidates = [(small, 1e9), (large, 1e9)]
        route, _ = wise.routes(PROBES)
        assert (route == -1).all()
        # retrieve_by=ratio: the gap relative to each memory's own ε decides. Thresholds just under
        # each row's gaps, the small memory's much lower, make it the winner on every row.
        wise.wrapper.candidates = [(small, float(gaps[:, 0].min()) / 4), (large, float(gaps[:, 1].min()) * 0.99)]
        assert (wise.routes(PROBES)[0] == 1).all()
        wise.wrapper.retrieve_by = "ratio"
        assert (wise.routes(PROBES)[0] == 0).all()


def test_activation_gap_reductions():
    gaps = torch.tensor([[1.0, 2.0, 9.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(reduce_gaps(gaps, mask, "masked", True), torch.tensor([1.5, 4.0]))
    assert torch.equal(reduce_gaps(gaps, mask, "faithful", True), torch.tensor([4.0, 4.0]))
    # The first real token (an attention sink) can be left out; a one-token row keeps it.
    left_padded = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])
    assert torch.equal(without_first_token(left_padded), torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]]))
    long = torch.arange(101.0)[None]
    assert reduce_gaps(long, None, "faithful", True).item() == 100.0          # max token above 100 tokens
    assert reduce_gaps(long, None, "faithful", False).item() == 50.0


# --------------------------------------------------------------------------- merging and masks


def test_ties_merge_on_hand_made_deltas():
    base = torch.zeros(4)
    t1, t2 = torch.tensor([3.0, -2.0, 0.1, 1.0]), torch.tensor([1.5, 4.0, -0.2, -1.0])
    # density 1: no trim; signs elected from the sum [4.5, 2, -0.1, 0] -> [+, +, -, +];
    # the disjoint mean averages only the entries that agree.
    merged = ties_merge(base, [t1, t2], [0.5, 0.5], density=1.0)
    torch.testing.assert_close(merged, torch.tensor([2.25, 4.0, -0.2, 1.0]))
    # density 0.5: t1 -> [3, -2, 0, 0], t2 -> [1.5, 4, 0, 0]; signs [+, +, +, +]; -2 disagrees.
    merged = ties_merge(base, [t1, t2], [0.5, 0.5], density=0.5)
    torch.testing.assert_close(merged, torch.tensor([2.25, 4.0, 0.0, 0.0]))
    # The base is added back; unequal weights elect from the weighted sum [2.1, -0.4, 0.02, 0.4]
    # and weigh the agreeing entries.
    merged = ties_merge(torch.ones(4), [t1 + 1, t2 + 1], [0.6, 0.2], density=1.0)
    torch.testing.assert_close(merged, 1 + torch.tensor([(0.6 * 3 + 0.2 * 1.5) / 0.8, -2.0, 0.1, 1.0]))
    # linear at density 1 is the mean of the task vectors (spec §9).
    torch.testing.assert_close(ties_merge(base, [t1, t2], [0.5, 0.5], alg="linear"), (t1 + t2) / 2)


def test_trim_keeps_the_density_fraction_of_largest_magnitudes():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    kept = trim_magnitude(x, 0.53)
    assert int((kept != 0).sum()) == 530
    assert kept.abs().max() == x.abs().max() and (kept[kept != 0].abs().min() >= x.abs()[kept == 0].max())


def test_mask_ratio_and_overlap():
    g = torch.Generator().manual_seed(0)
    a, b = random_mask(torch.Size([400, 500]), 0.2, g), random_mask(torch.Size([400, 500]), 0.2, g)
    assert abs(a.float().mean().item() - 0.2) < 0.005
    assert abs((a & b).float().mean().item() - 0.04) < 0.003          # Thm 2.1: rho^2
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2", "tiny_mixtral"])
def test_edits_change_only_the_masked_entries_and_never_the_main_memory(name):
    model, tok = _load(name)
    main_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with attached(name, n_iter=4, weight_decay=0.0) as wise:
        wise.edit(FACTS[:1], IRRELEVANT[:1])
        for n, side in wise.side.weights.items():
            delta = side - wise.wrapper.main_weights()[n]
            mask = wise.masks[n]
            assert torch.all(delta[~mask] == 0) and bool((delta[mask] != 0).any())
    for n, p in model.named_parameters():
        assert torch.equal(p, main_before[n]), n


def test_code_faithful_weight_decay_leaks_outside_the_mask():
    with attached("tiny_llama", n_iter=3, weight_decay=1e-2, code_faithful_wd=True) as wise:
        wise.edit(FACTS[:1], IRRELEVANT[:1])
        delta = wise.side.weights["weight"] - wise.wrapper.main_weights()["weight"]
        assert bool((delta[~wise.masks["weight"]] != 0).any())
    with attached("tiny_llama", n_iter=3, weight_decay=1e-2) as wise:
        wise.edit(FACTS[:1], IRRELEVANT[:1])
        delta = wise.side.weights["weight"] - wise.wrapper.main_weights()["weight"]
        assert torch.all(delta[~wise.masks["weight"]] == 0)


# --------------------------------------------------------------------------- editing


def _target_scores(wise: WISE, tok, facts) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL of the target, fraction of target tokens that are the argmax), per fact."""
    b = teacher_forced_batch(tok, [f.prompt for f in facts], [f.target for f in facts])
    logits = wise.logits(None, b.input_ids, b.attention_mask, b.keep, b.target_mask.sum(1))[:, :-1]
    logp = logits.log_softmax(-1).gather(-1, b.target_ids[..., None]).squeeze(-1)
    n = b.target_mask.sum(1)
    hit = (logits.argmax(-1) == b.target_ids) & b.target_mask
    return -(logp * b.target_mask).sum(1) / n, hit.sum(1) / n


def _target_nll(wise: WISE, tok, facts) -> torch.Tensor:
    return _target_scores(wise, tok, facts)[0]


@pytest.mark.parametrize("name", NAMES)
def test_an_edit_routes_its_prompt_to_the_side_memory_and_makes_the_target_likely(name):
    model, tok = _load(name)
    with attached(name, mask_ratio=1.0) as wise:
        before, acc_before = _target_scores(wise, tok, FACTS[:1])
        report = wise.edit(FACTS[:1], IRRELEVANT)
        wise.commit()
        assert report["act_min"] > 0 and wise.side.edits == 1
        (memory, eps), = wise.wrapper.candidates
        assert memory is wise.side and eps == pytest.approx(wise.hparams.act_ratio * wise.side.min_act)
        route, gaps = wise.routes([FACTS[0].prompt] + IRRELEVANT)
        assert route[0] == 0, gaps
        after, acc_after = _target_scores(wise, tok, FACTS[:1])
        assert acc_before < 1.0 and after < before - 0.3
        # The evaluator's criterion: every target token is the argmax. Not for the tiny Gemma: its
        # FFN output is normalised (post_feedforward_layernorm) and its logits span about one nat,
        # so the last layer's FFN alone cannot lift a random token to the top (the NLL plateaus).
        if name != "tiny_gemma3":
            assert acc_after == 1.0
        # The margin loss pushed the gap on the edit above the irrelevant texts'.
        assert gaps[0, 0] > gaps[1:, 0].max()


def test_batched_edits_have_their_own_losses_and_early_stopping():
    model, tok = _load("tiny_llama")
    with attached("tiny_llama", batch_size=3, n_iter=40, early_stop_loss=1e9, early_stop_delta=1e9) as wise:
        report = wise.edit(FACTS, IRRELEVANT)
        assert report["edits"] == 3 and report["steps"] == 2.0       # every edit stops at its 2nd look
        assert [e["position"] for e in wise.edit_log] == [0, 1, 2]
    with attached("tiny_llama", batch_size=3, n_iter=6, mask_ratio=1.0) as wise:
        before = _target_nll(wise, tok, FACTS)
        wise.edit(FACTS, IRRELEVANT)
        assert wise.side.edits == 3 and all(e["steps"] == 6 for e in wise.edit_log)
        assert (_target_nll(wise, tok, FACTS) < before).all()


def test_length_buckets_cover_every_row_once_within_the_slack():
    lengths = [30, 9, 10, 28, 3, 31, 12, 25]
    groups = length_buckets(lengths, slack=0.2)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest = lengths[g[0]]
        assert all(0.8 * longest <= lengths[i] <= longest for i in g)
    assert length_buckets(lengths, slack=1.0) == [sorted(range(8), key=lambda i: -lengths[i])]


def test_prompt_tokens_locate_the_edit_prompt_after_a_random_prefix():
    _, tok = _load("tiny_llama")
    prompt = "Where was Barack Obama born?"
    bare, start = prompt_tokens(tok, "{}", prompt)
    assert tok.decode(bare[start:]).strip() == prompt
    ids, start = prompt_tokens(tok, "Once upon a time {}", prompt)
    assert tok.decode(ids[start:]).strip() == prompt and tok.decode(ids[:start]).strip().endswith("time")
    ids, start = prompt_tokens(tok, "Once upon a time {}", prompt, max_tokens=4)    # cut from the left
    assert len(ids) == 4 and start == 0


def test_length_bucketing_does_not_change_the_edit():
    """Rows grouped by length (less padding) train the same side memory as one padded batch."""
    reports, weights = [], []
    for slack in (0.0, 1.0):
        with attached("tiny_llama", batch_size=3, n_iter=4, mask_ratio=1.0, bucket_slack=slack) as wise:
            reports.append(wise.edit(FACTS, IRRELEVANT))
            weights.append({n: t.detach().clone() for n, t in wise.side.weights.items()})
    assert reports[0]["final_loss"] == pytest.approx(reports[1]["final_loss"], rel=1e-4)
    for n in weights[0]:
        torch.testing.assert_close(weights[0][n], weights[1][n], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- shards, merge, retrieve


def test_merge_variant_merges_shards_with_ties_into_one_memory():
    with attached("tiny_llama", n_iter=2, save_freq=1, merge_freq=2, variant="merge") as wise:
        masks = []
        for f in FACTS[:2]:
            masks.append(wise.masks["weight"].clone())
            wise.edit([f], IRRELEVANT[:1])
            state = wise.commit()
        assert state == {"saved": True, "merged": True} and not torch.equal(masks[0], masks[1])
        assert len(wise.memories) == 1 and wise.memories[0].kind == "merged" and wise.memories[0].shards == [0, 1]
        assert not wise.pending and wise.side.edits == 0 and wise.merges == 1
        (memory, eps), = wise.wrapper.candidates
        assert eps == pytest.approx(wise.hparams.act_ratio * wise.global_min_act)
        # A third edit trains a fresh shard; the router sees the merged memory and the new shard, one ε.
        wise.edit(FACTS[2:], IRRELEVANT[:1])
        assert len(wise.wrapper.candidates) == 2 and len({e for _, e in wise.wrapper.candidates}) == 1
        wise.commit()
        wise.finish()                                     # leftover shard re-merged with the old memory (0.6)
        assert len(wise.memories) == 1 and wise.memories[0].shards == [2, 0, 1] and wise.merges == 2


def test_retrieve_variant_keeps_one_memory_per_merge_with_its_own_threshold():
    with attached("tiny_llama", n_iter=2, save_freq=1, merge_freq=2, variant="retrieve") as wise:
        for f in FACTS:
            wise.edit([f], IRRELEVANT[:1])
            wise.commit()
        kinds = [m.kind for m in wise.memories]
        assert kinds == ["merged", "shard"] and wise.merges == 1
        expected = [m.min_act * wise.hparams.act_ratio for m in wise.memories]
        assert [e for _, e in wise.wrapper.candidates] == pytest.approx(expected)
        holder = wise.memory_of_edit()
        assert holder == {"a": 0, "b": 0, "c": 1}


def test_replay_holds_the_new_memory_below_alpha_on_earlier_shards_edits():
    """L_memo [P App. B.3]: the memory written for fact b is trained to stay quiet on fact a's edit."""
    gaps = {}
    for replay in (0, 1):
        with attached("tiny_llama", n_iter=8, save_freq=1, merge_freq=100, variant="retrieve",
                      replay_per_edit=replay) as wise:
            first = wise.edit(FACTS[:1], IRRELEVANT[:1])
            wise.commit()
            assert first["replayed"] == 0                  # nothing saved yet to replay
            second = wise.edit(FACTS[1:2], IRRELEVANT[:1])
            wise.commit()
            assert second["replayed"] == replay
            assert wise.edit_log[0]["text"] == f"{FACTS[0].prompt} {FACTS[0].target}"
            _, g = wise.routes([FACTS[0].prompt])
            gaps[replay] = float(g[0, 1])                  # the second memory's gap on the first edit
    assert gaps[1] < gaps[0]
    with pytest.raises(ValueError, match="variant=retrieve"):
        WISEHParams.from_dict({"replay_per_edit": 2})


def test_no_merge_below_save_freq():
    with attached("tiny_llama", n_iter=2) as wise:
        for f in FACTS:
            wise.edit([f], IRRELEVANT[:1])
            wise.commit()
        wise.finish()
        assert wise.merges == 0 and not wise.memories and wise.side.edits == 3



def test_short_batch_mid_stream_is_a_shard_of_its_own():
    """Batches of 2 into shards of 2: a batch of 1 closes its shard, so the next batch of 2 is not
    trained on top of it (a 3-edit memory whose first edit was partly overwritten)."""
    with attached("tiny_llama", n_iter=2, batch_size=2, save_freq=2, merge_freq=100, variant="retrieve") as wise:
        wise.edit(FACTS[:1], IRRELEVANT[:1])
        assert wise.commit()["saved"]
        wise.edit(FACTS[1:], IRRELEVANT[:1])
        assert wise.commit()["saved"]
        assert [m.edits for m in wise.memories] == [1, 2] and wise.side.edits == 0
    with attached("tiny_llama", n_iter=2, batch_size=1, save_freq=2, merge_freq=100, variant="retrieve") as wise:
        wise.edit(FACTS[:1], IRRELEVANT[:1])
        assert not wise.commit()["saved"]                 # batch 1: the shard still has room
        wise.edit(FACTS[1:2], IRRELEVANT[:1])
        assert wise.commit()["saved"]
        assert [m.edits for m in wise.memories] == [2]



def test_eps_quantile_keeps_the_held_out_texts_on_the_main_memory():
    """eps_quantile=1 with calibration texts: ε is at least the largest Δ_act among them on the
    memory's final weights, so none of them is routed to it; without it (the paper's ε from the
    edits) the tiny memory takes them. The margin loss never sees the calibration texts."""
    routed = {}
    for q in (None, 1.0):
        with attached("tiny_llama", batch_size=3, save_freq=3, merge_freq=3, variant="retrieve",
                      act_ratio=0.05, eps_quantile=q) as wise:
            wise.calibrate(PROBES)
            wise.edit(FACTS, IRRELEVANT)
            wise.commit()
            (memory, eps), = wise.wrapper.candidates
            assert len(memory.calibration_acts) == len(PROBES)
            with torch.no_grad():
                fresh = wise._irrelevant_gaps(wise._irrelevant_tokens(PROBES), memory.weights).tolist()
            assert memory.calibration_acts == pytest.approx(fresh)
            if q == 1.0:
                assert eps == pytest.approx(max(max(memory.calibration_acts), 0.05 * memory.min_act))
            route, _ = wise.routes(PROBES)
            routed[q] = int((route >= 0).sum())
    assert routed[1.0] == 0 and routed[None] == len(PROBES)
    with pytest.raises(ValueError, match="eps_quantile"):
        WISEHParams.from_dict({"eps_quantile": 0.0})


def test_a_merged_memory_is_calibrated_on_its_own_weights():
    with attached("tiny_llama", n_iter=2, save_freq=1, merge_freq=2, variant="retrieve", eps_quantile=0.5) as wise:
        wise.calibrate(PROBES)
        for f in FACTS[:2]:
            wise.edit([f], IRRELEVANT)
            wise.commit()
        merged, = wise.memories
        assert merged.kind == "merged"
        with torch.no_grad():
            fresh = wise._irrelevant_gaps(wise._irrelevant_tokens(PROBES), merged.weights).tolist()
        assert merged.calibration_acts == pytest.approx(fresh)


# --------------------------------------------------------------------------- persistence


def test_save_load_round_trip_and_refusals(tmp_path):
    model, tok = _load("tiny_llama")
    with attached("tiny_llama", n_iter=2, save_freq=1, merge_freq=2, variant="retrieve", eps_quantile=0.5) as wise:
        wise.calibrate(PROBES)
        for f in FACTS:
            wise.edit([f], IRRELEVANT)
            wise.commit()
        calibration_acts = [m.calibration_acts for m in wise.memories]
        ids, mask = prompt_batch(tok, PROBES + [f.prompt for f in FACTS])
        want = wise.logits(None, ids, mask, 3)
        thresholds = [e for _, e in wise.wrapper.candidates]
        out = wise.save(tmp_path / "wise")
        identity = wise.llm_identity
    assert {p.name for p in out.iterdir()} == {"wise.safetensors", "manifest.json", "edits.jsonl"}
    loaded = WISE.load(out, model, tok, llm_identity=identity)
    try:
        assert [e for _, e in loaded.wrapper.candidates] == pytest.approx(thresholds)
        assert torch.equal(loaded.logits(None, ids, mask, 3), want)
        assert [m.kind for m in loaded.memories] == ["merged", "shard"] and loaded.total_edits == 3
        assert [m.calibration_acts for m in loaded.memories] == calibration_acts
        assert len(calibration_acts[0]) == len(PROBES) and loaded.calibration_texts == PROBES
        assert len(loaded.edit_log) == 3
    finally:
        loaded.remove()
    other, other_tok = _load("tiny_llama", seed=1)
    with pytest.raises(ArtifactError, match="built for LLM"):
        WISE.load(out, other, other_tok, llm_name="tiny_llama")
    with pytest.raises(ArtifactError, match="missing"):
        WISE.load(tmp_path / "nothing", model, tok, llm_identity=identity)
    # Tensors changed after writing: their hash no longer matches the manifest.
    tensors_file = out / "wise.safetensors"
    original = tensors_file.read_bytes()
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tensors_file))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(tensors_file))
    with pytest.raises(ArtifactError, match="modified after it was written"):
        WISE.load(out, model, tok, llm_identity=identity)
    tensors_file.write_bytes(original[: len(original) // 2])          # truncated: one sentence, no trace
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        WISE.load(out, model, tok, llm_identity=identity)
    tensors_file.write_bytes(original)
    # The manifest is sealed: editing it (say, to make a tampered tensor file pass) is refused.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tensors_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="edited after it was written"):
        WISE.load(out, model, tok, llm_identity=identity)


def test_bad_hyperparameters_are_one_sentence():
    with pytest.raises(ValueError, match="variant"):
        WISEHParams.from_dict({"variant": "both"})
    with pytest.raises(ValueError, match="multiple of save_freq"):
        WISEHParams.from_dict({"save_freq": 3, "merge_freq": 4})


# --------------------------------------------------------------------------- the stage


def test_stage_alone_selects_the_wise_model_config(tiny_cfg):
    from lit_modules.editing import method_config, resolve_layer
    cfg = tiny_cfg("stage=wise")
    assert list(cfg.stage.jobs) == ["wise"] and cfg.model.name == "wise"
    hp = method_config(cfg, "wise")
    assert hp.name == "wise" and hp.variant == "retrieve" and hp.layers.smollm2 == 23
    assert (hp.batch_size, hp.save_freq) == (16, 16)           # one memory per batch of edits
    assert hp.irrelevant_answers is False                       # L_a reads what the router reads
    model, _ = _load("tiny_llama")
    assert resolve_layer(hp, "tiny_llama", model) == 0


def test_irrelevant_texts_with_or_without_the_answer():
    from lit_modules.wise import irrelevant_texts
    out = {"prompt": ["Who wrote Dune?", "Capital of Peru?"], "answer": ["Frank Herbert", ""]}
    assert irrelevant_texts(out) == ["Who wrote Dune? Frank Herbert", "Capital of Peru?"]
    assert irrelevant_texts(out, with_answers=False) == ["Who wrote Dune?", "Capital of Peru?"]


def test_the_paper_preset_restores_the_papers_settings(tiny_cfg):
    from lit_modules.editing import method_config as config
    hp = WISEHParams.from_dict(OmegaConf.to_container(config(tiny_cfg("stage=wise", "model=wise_paper"), "wise")))
    assert (hp.variant, hp.optimizer, hp.lr, hp.n_iter, hp.batch_size) == ("merge", "sgd", 1.0, 70, 1)
    assert (hp.save_freq, hp.merge_freq, hp.irrelevant_per_edit, hp.train_gap_tokens) == (500, 1000, 1, "all")
    assert (hp.act_ratio, hp.retrieve_by, hp.irrelevant_answers) == (0.88, "gap", True)
    assert hp.prefixes_per_length == 5 and config(tiny_cfg("stage=wise", "model=wise_paper"), "wise").layers.smollm2 == 27


def test_a_method_option_needs_no_model_group_and_another_methods_config_is_refused(tiny_cfg):
    from lit_modules.editing import method_config
    assert tiny_cfg("stage=wise", "model.n_iter=5").model.n_iter == 5
    with pytest.raises(ValueError, match="stage=wise runs wise, but model=mindbridge"):
        method_config(tiny_cfg("stage=wise", "model=mindbridge"), "wise")


@pytest.mark.parametrize("variant", ["merge", "retrieve"])
def test_stage_wise_end_to_end(tiny_cfg, tmp_path, variant):
    from train import train
    run = tmp_path / "run"
    cfg = tiny_cfg("stage=wise", "model=wise", f"model.variant={variant}", "model.n_iter=2",
                   "model.prefix_lengths=[3]", "model.prefixes_per_length=1", "model.save_freq=2",
                   "model.merge_freq=4", "model.batch_size=2", run_dir=run)
    train(cfg, run)
    m = json.loads((run / "metrics.json").read_text())
    assert SHARED_KEYS <= m.keys() and m["method"] == f"wise-{variant}" and m["num_edits"] == 8
    for key in ("route_rel_pct", "route_gen_pct", "route_loc_pct", "route_rel_own_pct", "rel_stream_q1",
                "rel_stream_q4", "edits_per_minute", "wise_thresholds"):
        assert key in m, key
    assert m["avg"] == pytest.approx((m["rel"] + m["gen"] + m["loc"]) / 3)
    assert m["wise_merges"] == 2 and m["wise_site"] == "model.layers.0.mlp.down_proj"
    saved = run / "wise"
    assert {p.name for p in saved.iterdir()} == {"wise.safetensors", "manifest.json", "edits.jsonl"}
    log = json.loads((run / "wise_edit_log.json").read_text())
    assert sorted(e["position"] for e in log) == list(range(8))
    assert not (run / "checkpoints").exists()       # the side memories are the artifact, not Lightning checkpoints


def test_stage_pairs_each_edit_with_irrelevant_per_edit_texts(tiny_cfg, tmp_path, monkeypatch):
    from mindbridge.wise import WISE
    from train import train
    seen: list[tuple[int, int]] = []
    trained_on: set[str] = set()
    calibrated_on: list[str] = []
    real = WISE.edit

    def spy(self, facts, irrelevant):
        seen.append((len(facts), len(irrelevant)))
        trained_on.update(irrelevant)
        calibrated_on[:] = self.calibration_texts
        return real(self, facts, irrelevant)
    monkeypatch.setattr(WISE, "edit", spy)
    run = tmp_path / "run"
    cfg = tiny_cfg("stage=wise", "model=wise", "model.n_iter=1", "model.prefix_lengths=[3]",
                   "model.prefixes_per_length=1", "model.batch_size=2", "model.irrelevant_per_edit=3",
                   "model.calibration_prompts=5", run_dir=run)
    train(cfg, run)
    assert seen == [(2, 6)] * 4
    m = json.loads((run / "metrics.json").read_text())
    assert m["wise_irrelevant_per_edit"] == 3 and m["wise_calibration_prompts"] == 5
    # eps_quantile's calibration prompts are held out of what the margin loss trains against.
    assert len(set(calibrated_on)) == 5 and not trained_on & set(calibrated_on)
