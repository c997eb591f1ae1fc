"""The shared datamodule: split rules, batches, connect(), the cycling out-of-scope stream."""
from __future__ import annotations

import pytest

from data.datamodule import CyclingSampler, EditDataModule
from mindbridge.loading import load_causal_lm

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def test_bundled_zsre_split_has_no_overlap():
    dm = EditDataModule("zsre", num_edits=50, seed=3)
    dm.setup()
    evaluated = {p.strip().casefold() for r in dm.edits for p in (r.prompt, *r.rephrase_prompts, *r.loc_prompts)}
    assert len(dm.edits) == 50
    assert not evaluated & {o.prompt.strip().casefold() for o in dm.out_of_scope}
    assert {r.prompt for r in dm.edits} != {r.prompt for r in EditDataModule("zsre", num_edits=50, seed=4).edits}


def test_counterfact_uses_the_never_edited_pool():
    dm = EditDataModule("counterfact", num_edits=20, seed=0, max_out_of_scope=100)
    assert len(dm.edits) == 20 and len(dm.out_of_scope) == 100
    assert dm.stats()["dataset"] == "counterfact"


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="data.path"):
        EditDataModule("nope").setup()


def test_epoch_follows_the_edit_set_and_out_of_scope_cycles():
    dm = EditDataModule("zsre", num_edits=10, seed=0, batch_size=4, out_batch_size=3, max_out_of_scope=5)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3                                   # ceil(10 / 4) edit batches
    edits = [i for b, _, _ in batches for i in b["edit"]["index"].tolist()]
    assert sorted(edits) == list(range(10))
    outs = [i for b, _, _ in batches for i in b["out"]["index"].tolist()]
    assert len(outs) == 9 and set(outs) <= set(range(5))
    # every out-of-scope prompt is seen before any is repeated
    assert sorted(outs[:5]) == list(range(5))


def test_held_out_out_of_scope_records_never_enter_the_stream():
    dm = EditDataModule("zsre", num_edits=10, seed=0, batch_size=4, out_batch_size=6, max_out_of_scope=12)
    dm.connect(held_out=4)
    held = dm.held_out_out_of_scope
    assert len(held) == 4 and len(dm.training_out_of_scope) == 8
    assert set(held) | set(dm.training_out_of_scope) == set(dm.out_of_scope)
    streamed = {p for b, _, _ in dm.train_dataloader() for p in b["out"]["prompt"]}
    assert streamed == {r.prompt for r in dm.training_out_of_scope}            # 18 draws cycle over all 8
    assert held == dm.held_out_out_of_scope                                  # the same sample every time
    with pytest.raises(ValueError, match="Cannot hold out 12 of the 12"):
        dm.connect(held_out=12)


def test_cycling_sampler_continues_across_epochs():
    s = CyclingSampler(4, 6, seed=1)
    first, second = list(s), list(s)
    assert sorted(first[:4]) == [0, 1, 2, 3] and sorted(first[4:] + second[:2]) == [0, 1, 2, 3]


def test_connect_adds_llm_tensors():
    _, tok = load_causal_lm("random", random_config=TINY)
    dm = EditDataModule("zsre", num_edits=6, seed=0, batch_size=3, max_out_of_scope=6)
    text_only = next(iter(dm.train_dataloader()))[0]
    assert "tf" not in text_only["edit"] and "input_ids" not in text_only["out"]
    dm.connect(tok)
    batch = next(iter(dm.train_dataloader()))[0]
    tf = batch["edit"]["tf"]
    assert tf.input_ids.shape[0] == 3 and tf.target_mask.any(1).all()
    target = tok(" " + batch["edit"]["target"][0], add_special_tokens=False)["input_ids"]
    assert tf.target_ids[0][tf.target_mask[0]].tolist() == target
    assert batch["out"]["input_ids"].shape[0] == 3
