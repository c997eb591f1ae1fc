"""Exact arithmetic of `evaluate_edits` with scripted fake models (real tokenizer, no LLM forward)."""

from __future__ import annotations

import math

import pytest
import torch

from data.records import EditRecord
from mindbridge.evaluation import PROTOCOL, evaluate_edits, scoring_items, token_predictions
from mindbridge.loading import load_causal_lm
from mindbridge.tokenization import encode_target

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def tokenizer():
    return load_causal_lm("random", random_config=TINY_LLAMA)[1]


class ScriptedLM:
    """A `ScorableLM` whose argmax at each answer position is `gold + offset`.

    `plan[prompt]` lists one offset per answer token (0: right, k: the gold id + k, i.e. a
    deterministic wrong token, so two models with the same offset agree on the wrong token).
    """

    def __init__(self, tokenizer, plan: dict[str, list[int]]):
        self.tokenizer, self.plan = tokenizer, plan
        self.calls: list[list[str]] = []

    def logits(self, prompts, input_ids, attention_mask, keep, answer_lengths=None):
        assert answer_lengths is not None
        assert keep == int(answer_lengths.max()) + 1
        self.calls.append(list(prompts))
        vocab = len(self.tokenizer)
        out = torch.zeros(len(prompts), keep, vocab)
        out[:, :, 0] = 1.0        # something to beat everywhere (padding rows, prompt positions)
        for b, prompt in enumerate(prompts):
            n = int(answer_lengths[b])
            gold = input_ids[b, -n:].tolist()
            offsets = self.plan[prompt]
            assert len(offsets) == n, (prompt, gold)
            # The prompt text handed over is this row's prompt, followed by its answer.
            row = input_ids[b][attention_mask[b].bool()].tolist()
            assert row[:-n] == self.tokenizer(prompt)["input_ids"][-len(row) + n:]
            for t, (g, off) in enumerate(zip(gold, offsets)):
                out[b, keep - 1 - n + t, (g + off) % vocab] = 50.0
        return out


def _records():
    r0 = EditRecord(case_id="0", dataset="test", subject="France", prompt="The capital of France is",
                    target_new="Lyon", target_true="Paris",
                    rephrase_prompts=("France's capital city is", "What is the capital city of France?"),
                    loc_prompts=("The Big Apple is", "The sky is usually"), loc_answers=("New York", "blue"))
    r1 = EditRecord(case_id="1", dataset="test", subject="Peter", prompt="Peter the Great founded",
                    target_new="Buenos Aires", target_true="Saint Petersburg",
                    rephrase_prompts=("The city founded by Peter the Great is",),
                    loc_prompts=("The largest city of Argentina is",), loc_answers=("Buenos Aires",))
    return [r0, r1]


# Per prompt, per answer token: offset of the argmax from the gold token (0 = correct).
EDITED = {
    "The capital of France is": [0],                        # rel r0: 1.0, em 1
    "France's capital city is": [0],                        # gen r0 a: 1.0, em 1
    "What is the capital city of France?": [0],             # gen r0 b: see below (1 token)
    "Peter the Great founded": [0, 1],                      # rel r1: 0.5, em 0
    "The city founded by Peter the Great is": [1, 1],       # gen r1: 0.0, em 0
    "The Big Apple is": [0, 1],                             # loc r0 a: same as base
    "The sky is usually": [2],                              # loc r0 b: differs from base
    "The largest city of Argentina is": [0, 3],             # loc r1: half differs from base
}
BASE = {
    "The capital of France is": [1],
    "France's capital city is": [1],
    "What is the capital city of France?": [1],
    "Peter the Great founded": [0, 1],
    "The city founded by Peter the Great is": [1, 2],
    "The Big Apple is": [0, 1],
    "The sky is usually": [1],
    "The largest city of Argentina is": [0, 0],
}


def test_token_counts_assumed_by_the_plans(tokenizer) -> None:
    for rec in _records():
        for prompt, target in ([(rec.prompt, rec.target_new)] + [(p, rec.target_new) for p in rec.rephrase_prompts]
                               + list(zip(rec.loc_prompts, rec.loc_answers))):
            assert len(encode_target(tokenizer, target)) == len(EDITED[prompt]) == len(BASE[prompt]), target


def test_scoring_items_cover_every_prompt() -> None:
    items = scoring_items(_records())
    assert [(i.record, i.kind) for i in items] == [
        (0, "rel"), (0, "gen"), (0, "gen"), (0, "loc"), (0, "loc"), (1, "rel"), (1, "gen"), (1, "loc")]
    assert items[3].target == "New York" and items[1].target == "Lyon"


def test_token_predictions_are_argmax_at_answer_positions(tokenizer) -> None:
    items = scoring_items(_records())
    lm = ScriptedLM(tokenizer, EDITED)
    preds = token_predictions(lm, items, batch_size=3)
    for item, (pred, gold) in zip(items, preds):
        assert gold.tolist() == encode_target(tokenizer, item.target)
        expected = [(g + o) % len(tokenizer) for g, o in zip(gold.tolist(), EDITED[item.prompt])]
        assert pred.tolist() == expected
    # Batched (3 + 3 + 2 prompts), and every prompt seen once.
    assert [len(c) for c in lm.calls] == [3, 3, 2]
    assert sorted(p for c in lm.calls for p in c) == sorted(i.prompt for i in items)


@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_evaluate_edits_exact_arithmetic(tokenizer, batch_size: int) -> None:
    seen = []
    m = evaluate_edits(ScriptedLM(tokenizer, EDITED), ScriptedLM(tokenizer, BASE), _records(),
                       batch_size=batch_size, progress=seen.append)
    assert sum(seen) == 2 * 8     # edited and base each score the 8 prompts

    # rel: r0 1.0, r1 0.5.   em: r0 1, r1 0.
    assert m["rel"] == pytest.approx(75.0)
    assert m["rel_em"] == pytest.approx(50.0)
    # gen: r0 = mean(1.0, 1.0) = 1.0, r1 = 0.0 (per-record average over the paraphrases first).
    assert m["gen"] == pytest.approx(50.0)
    assert m["gen_em"] == pytest.approx(50.0)
    # loc = agreement with the base, not with gold:
    #   r0: a agrees on both tokens (both wrong on token 2) = 1.0, b disagrees = 0.0 -> 0.5
    #   r1: first token agrees, second not -> 0.5
    assert m["loc"] == pytest.approx(50.0)
    #   em: r0 mean(1, 0) = 0.5, r1 0 -> 25
    assert m["loc_em"] == pytest.approx(25.0)
    # loc_correct = agreement with gold: r0 mean(0.5, 0.0) = 0.25, r1 0.5 -> 37.5
    assert m["loc_correct"] == pytest.approx(37.5)
    # pre_loc_correct: r0 mean(0.5, 0.0) = 0.25, r1 1.0 -> 62.5
    assert m["pre_loc_correct"] == pytest.approx(62.5)
    # pre_*: the base's own rel/gen: rel r0 0, r1 0.5; gen r0 0, r1 0.
    assert m["pre_rel"] == pytest.approx(25.0)
    assert m["pre_rel_em"] == pytest.approx(0.0)
    assert m["pre_gen"] == pytest.approx(0.0)
    assert m["pre_gen_em"] == pytest.approx(0.0)
    assert m["avg"] == pytest.approx((75.0 + 50.0 + 50.0) / 3)
    assert m["num_scored_prompts"] == 8
    assert m["protocol"] == PROTOCOL


def test_per_record_averaging_weighs_records_equally(tokenizer) -> None:
    """A record with two paraphrases counts as much as one with one paraphrase."""
    plan = dict(EDITED)
    plan["What is the capital city of France?"] = [1]     # r0 gen: mean(1, 0) = 0.5
    plan["The city founded by Peter the Great is"] = [0, 0]  # r1 gen: 1.0
    m = evaluate_edits(ScriptedLM(tokenizer, plan), ScriptedLM(tokenizer, BASE), _records(), batch_size=4)
    # Per record: mean(0.5, 1.0) = 75; pooling the 3 paraphrases would give (1 + 0 + 1) / 3 = 66.7.
    assert m["gen"] == pytest.approx(75.0)
    assert m["gen_em"] == pytest.approx(75.0)


def test_identical_models_have_full_locality(tokenizer) -> None:
    m = evaluate_edits(ScriptedLM(tokenizer, BASE), ScriptedLM(tokenizer, BASE), _records(), batch_size=8)
    assert m["loc"] == m["loc_em"] == pytest.approx(100.0)
    for kind in ("rel", "rel_em", "gen", "gen_em"):
        assert m[kind] == pytest.approx(m[f"pre_{kind}"])
    assert m["loc_correct"] == pytest.approx(m["pre_loc_correct"])


def test_records_without_paraphrases_or_locality(tokenizer) -> None:
    rec = EditRecord(case_id="9", dataset="test", subject="France", prompt="The capital of France is",
                     target_new="Lyon", target_true=None, rephrase_prompts=(), loc_prompts=(), loc_answers=())
    m = evaluate_edits(ScriptedLM(tokenizer, EDITED), ScriptedLM(tokenizer, BASE), [rec])
    assert m["rel"] == pytest.approx(100.0) and m["pre_rel"] == pytest.approx(0.0)
    assert math.isnan(m["gen"]) and math.isnan(m["loc"]) and math.isnan(m["avg"])
    assert m["num_scored_prompts"] == 1


class PreferringLM:
    """A `ScorableLM` that, after each prompt, puts a high logit on every token of one answer."""

    def __init__(self, tokenizer, prefer: dict[str, str]):
        self.tokenizer, self.prefer = tokenizer, prefer

    def logits(self, prompts, input_ids, attention_mask, keep, answer_lengths=None):
        out = torch.zeros(len(prompts), keep, len(self.tokenizer))
        for b, prompt in enumerate(prompts):
            out[b, :, encode_target(self.tokenizer, self.prefer[prompt])] = 10.0
        return out


def _counterfact_records():
    ra = EditRecord(case_id="0", dataset="counterfact", subject="Danielle Darrieux",
                    prompt="The mother tongue of Danielle Darrieux is", target_new="English", target_true="French",
                    rephrase_prompts=("Danielle Darrieux spoke", "Danielle Darrieux's native language is"),
                    loc_prompts=("Michel Rocard is a native speaker of", "Jean Dujardin speaks"),
                    loc_answers=("French", "French"))
    rb = EditRecord(case_id="1", dataset="counterfact_rome", subject="Toko Yasuda", prompt="Toko Yasuda plays the",
                    target_new="piano", target_true="guitar", rephrase_prompts=("Toko Yasuda is known for playing the",),
                    loc_prompts=("John Lennon plays the",), loc_answers=("guitar",))
    return [ra, rb]


def test_counterfact_probability_comparison(tokenizer) -> None:
    """NeuralDB's CounterFact scores: the new object must beat the true one (rel/gen), and the true
    answer must still beat the new object on neighbourhood prompts (loc)."""
    edited = PreferringLM(tokenizer, {
        "The mother tongue of Danielle Darrieux is": "English", "Danielle Darrieux spoke": "English",
        "Danielle Darrieux's native language is": "French", "Michel Rocard is a native speaker of": "French",
        "Jean Dujardin speaks": "English", "Toko Yasuda plays the": "guitar",
        "Toko Yasuda is known for playing the": "piano", "John Lennon plays the": "guitar"})
    records = _counterfact_records()
    base = PreferringLM(tokenizer, {p: r.target_true for r in records
                                    for p in (r.prompt, *r.rephrase_prompts, *r.loc_prompts)})
    seen = []
    m = evaluate_edits(edited, base, records, batch_size=3, progress=seen.append)
    assert sum(seen) == 4 * 8    # each model scores the 8 prompts with both answers
    assert m["rel_prob"] == pytest.approx(50.0)     # ra wins, rb does not
    assert m["gen_prob"] == pytest.approx(75.0)     # ra mean(1, 0), rb 1
    assert m["loc_prob"] == pytest.approx(75.0)     # ra mean(1, 0), rb 1
    assert (m["pre_rel_prob"], m["pre_gen_prob"], m["pre_loc_prob"]) == pytest.approx((0.0, 0.0, 100.0))
    # Token accuracy is scored as before, beside them.
    assert m["rel"] == pytest.approx(50.0) and m["pre_rel"] == pytest.approx(0.0)


def test_probability_comparison_only_for_counterfact(tokenizer) -> None:
    m = evaluate_edits(ScriptedLM(tokenizer, EDITED), ScriptedLM(tokenizer, BASE), _records())
    assert not [k for k in m if k.endswith("_prob")]
