"""Stage I pieces (mindbridge.pretraining, mindbridge.encoder) on a tiny random BERT."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from mindbridge.encoder import MemoryEncoder, masked_lm_head, pool
from mindbridge.loading import load_masked_lm
from mindbridge.pretraining import (
    MaskedBatch,
    MemoryWriter,
    associate_batch,
    fit_mlm_head,
    inject_batch,
    masked_lm_loss,
    mlp,
)

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64}

FACTS = [("Eiffel Tower", "The Eiffel Tower is located in", "Paris"),
         ("Danube", "The Danube flows into the", "Black Sea"),
         ("Nobody", "Water boils at", "one hundred degrees")]   # subject not in the prompt


@pytest.fixture(scope="module")
def bert():
    return load_masked_lm("random", random_config=TINY_BERT, seed=0)


@pytest.fixture()
def encoder(bert):
    import copy
    mlm, tok = bert
    return MemoryEncoder(copy.deepcopy(mlm), tok, "cls", 48)


class ScriptedRng:
    """`random.Random` stand-in returning scripted values, then `rest` forever."""

    def __init__(self, values, rest=0.99):
        self.values, self.rest = list(values), rest

    def random(self) -> float:
        return self.values.pop(0) if self.values else self.rest


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _masked_tokens(batch: MaskedBatch, b: int) -> list[int]:
    sel = batch.labels[b] != -100
    return batch.labels[b][sel].tolist()


def _check_consistent(tok, batch: MaskedBatch, texts: list[str], offset: int = 0) -> None:
    """Masked positions carry [MASK] and the original id as label; all others are untouched."""
    plain = tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")["input_ids"]
    ids = batch.input_ids[:, offset:]
    labels = batch.labels[:, offset:]
    sel = labels != -100
    assert (ids[sel] == tok.mask_token_id).all()
    assert torch.equal(labels[sel], plain[sel])
    assert torch.equal(ids[~sel], plain[~sel])
    special = torch.isin(plain, torch.tensor(tok.all_special_ids))
    assert not (sel & special).any()


# --------------------------------------------------------------------------- inject


@pytest.mark.parametrize("span_prob, expected", [(1.0, ["Eiffel Tower", "Danube", "one hundred degrees"]),
                                                 (0.0, ["Paris", "Black Sea", "one hundred degrees"])])
def test_inject_masks_subject_or_object_span(bert, span_prob, expected) -> None:
    _, tok = bert
    batch = inject_batch(tok, FACTS, random.Random(0), max_length=48, span_prob=span_prob, word_prob=0.0)
    texts = [f"{p} {o}." for _, p, o in FACTS]
    _check_consistent(tok, batch, texts)
    assert batch.attention_mask.tolist() == tok(texts, padding=True, return_tensors="pt")["attention_mask"].tolist()
    for b, span in enumerate(expected):
        assert _masked_tokens(batch, b) == _ids(tok, span)
        pos = (batch.labels[b] != -100).nonzero().flatten().tolist()
        assert pos == list(range(pos[0], pos[0] + len(pos)))          # one contiguous span
    # The final "." of the object text is never part of the object span.
    assert _ids(tok, ".")[0] not in _masked_tokens(batch, 0)


def test_inject_follows_the_rng_draws(bert) -> None:
    _, tok = bert
    # Fact 0 draws 0.3 < 0.5 (subject), fact 1 draws 0.7 (object); fact 2 has no subject and
    # draws nothing; every word draw then returns 0.99 >= word_prob.
    batch = inject_batch(tok, FACTS, ScriptedRng([0.3, 0.7]), max_length=48, span_prob=0.5, word_prob=0.1)
    assert _masked_tokens(batch, 0) == _ids(tok, "Eiffel Tower")
    assert _masked_tokens(batch, 1) == _ids(tok, "Black Sea")
    assert _masked_tokens(batch, 2) == _ids(tok, "one hundred degrees")


def test_inject_word_prob_one_masks_every_real_token_but_no_special(bert) -> None:
    _, tok = bert
    batch = inject_batch(tok, FACTS, random.Random(0), max_length=48, span_prob=0.5, word_prob=1.0)
    texts = [f"{p} {o}." for _, p, o in FACTS]
    _check_consistent(tok, batch, texts)
    plain = tok(texts, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    real = (plain["attention_mask"] == 1) & (plain["special_tokens_mask"] == 0)
    assert torch.equal(batch.labels != -100, real)
    assert (batch.input_ids[:, 0] == tok.cls_token_id).all()
    assert (batch.input_ids[plain["attention_mask"] == 0] == tok.pad_token_id).all()


def test_inject_is_case_insensitive_and_truncates(bert) -> None:
    _, tok = bert
    facts = [("eiffel tower", "The Eiffel Tower is located in", "Paris")]
    batch = inject_batch(tok, facts, random.Random(0), max_length=48, span_prob=1.0, word_prob=0.0)
    assert _masked_tokens(batch, 0) == _ids(tok, "Eiffel Tower")
    short = inject_batch(tok, facts, random.Random(0), max_length=5, span_prob=0.0, word_prob=0.0)
    assert short.input_ids.shape[1] == 5
    assert (short.labels == -100).all()            # the object was truncated away


# --------------------------------------------------------------------------- associate


def test_associate_masks_exactly_the_object(bert) -> None:
    _, tok = bert
    facts = [(p, o) for _, p, o in FACTS]
    batch = associate_batch(tok, facts, max_length=48)
    texts = [f"{p} {o}" for p, o in facts]
    plain = tok(texts, padding=True, return_tensors="pt")
    assert batch.input_ids.shape == (3, plain["input_ids"].shape[1] + 1)
    # Position 0 is the slot: a placeholder id, attended, never scored.
    assert (batch.input_ids[:, 0] == tok.pad_token_id).all()
    assert (batch.attention_mask[:, 0] == 1).all()
    assert (batch.labels[:, 0] == -100).all()
    assert torch.equal(batch.attention_mask[:, 1:], plain["attention_mask"])
    assert (batch.input_ids[:, 1] == tok.cls_token_id).all()
    _check_consistent(tok, batch, texts, offset=1)
    for b, (_, obj) in enumerate(facts):
        assert _masked_tokens(batch, b) == _ids(tok, obj)


def test_associate_respects_max_length_including_slot(bert) -> None:
    _, tok = bert
    batch = associate_batch(tok, [("The Eiffel Tower is located in", "Paris")], max_length=6)
    assert batch.input_ids.shape[1] == 6


# --------------------------------------------------------------------------- losses


def test_masked_lm_loss_tiny_case() -> None:
    head = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    hidden = torch.tensor([[[9.0, 9.0], [2.0, 0.0], [0.0, 3.0]]], requires_grad=True)
    labels = torch.tensor([[-100, 0, 2]])
    loss, acc = masked_lm_loss(head, hidden, labels)
    # Position 1: logits (2, 0, 2), gold 0; position 2: logits (0, 3, 3), gold 2.
    l1 = -torch.log_softmax(torch.tensor([2.0, 0.0, 2.0]), 0)[0]
    l2 = -torch.log_softmax(torch.tensor([0.0, 3.0, 3.0]), 0)[2]
    assert loss.item() == pytest.approx(((l1 + l2) / 2).item(), rel=1e-6)
    # argmax ties resolve to the first index: position 1 -> 0 (right), position 2 -> 1 (wrong).
    assert acc.item() == pytest.approx(0.5)
    loss.backward()
    assert hidden.grad[0, 0].abs().sum() == 0 and hidden.grad[0, 1:].abs().sum() > 0


def test_masked_lm_loss_without_labels_is_zero_and_differentiable() -> None:
    head = nn.Linear(2, 3)
    hidden = torch.randn(2, 3, 2, requires_grad=True)
    loss, acc = masked_lm_loss(head, hidden, torch.full((2, 3), -100))
    assert loss.item() == 0.0 and acc.item() == 0.0
    loss.backward()
    assert hidden.grad is not None


def test_memory_writer_losses_and_gradients(encoder) -> None:
    tok = encoder.tokenizer
    writer = MemoryWriter(encoder).train()
    assert not writer.frozen_copy.training
    assert all(not p.requires_grad for p in writer.frozen_copy.parameters())
    inject = inject_batch(tok, FACTS, random.Random(0), max_length=48)
    questions = [p for _, p, _ in FACTS]
    associate = (questions, associate_batch(tok, [(p, o) for _, p, o in FACTS], max_length=48))
    exist = (["Where is the Eiffel Tower?", "What colour is a zebra?"], torch.tensor([1, 0]))
    out = writer.losses(inject, associate, exist)
    for key in ("inject", "associate", "exist", "inject_acc", "associate_acc", "exist_acc"):
        assert key in out and torch.isfinite(out[key]), key
    assert out["exist"].item() > 0 and out["associate"].item() > 0 and out["inject"].item() > 0

    (out["inject"] + out["associate"] + out["exist"]).backward()

    def has_grad(module: nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert has_grad(encoder.body)
    assert has_grad(writer.exist_head)
    assert has_grad(writer.associate_projector)
    assert all(p.grad is None for p in writer.frozen_copy.parameters())
    # The frozen copy is a separate set of tensors, not the encoder's.
    enc_ptrs = {p.data_ptr() for p in encoder.parameters()}
    assert not enc_ptrs & {p.data_ptr() for p in writer.frozen_copy.parameters()}


def test_memory_writer_partial_batches(encoder) -> None:
    writer = MemoryWriter(encoder)
    out = writer.losses(None, None, (["a fact", "another"], torch.tensor([0, 1])))
    assert set(out) == {"exist", "exist_acc"}
    out = writer.losses(inject_batch(encoder.tokenizer, FACTS[:1], random.Random(0), 48), None, None)
    assert set(out) == {"inject", "inject_acc"}


def test_associate_loss_reaches_only_projector_and_encoder(encoder) -> None:
    writer = MemoryWriter(encoder)
    facts = [(p, o) for _, p, o in FACTS]
    out = writer.losses(None, ([p for p, _ in facts], associate_batch(encoder.tokenizer, facts, 48)), None)
    out["associate"].backward()
    assert any(p.grad is not None for p in writer.associate_projector.parameters())
    assert any(p.grad is not None for p in encoder.body.parameters())
    assert all(p.grad is None for p in writer.exist_head.parameters())
    assert all(p.grad is None for p in writer.frozen_copy.parameters())


# --------------------------------------------------------------------------- fit_mlm_head


def test_fit_mlm_head_changes_only_the_head(encoder) -> None:
    body_before = {k: v.clone() for k, v in encoder.body.state_dict().items()}
    head_named = {n: p for n, p in encoder.head.named_parameters() if "decoder.weight" not in n}
    head_before = {n: p.detach().clone() for n, p in head_named.items()}
    texts = ["The Eiffel Tower is located in Paris.", "The Danube flows into the Black Sea.",
             "Water boils at one hundred degrees.", "Mount Everest is the highest mountain."] * 4
    acc = fit_mlm_head(encoder, texts, steps=3, batch_size=4, lr=1e-2)
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    for k, v in encoder.body.state_dict().items():
        assert torch.equal(v, body_before[k]), k
    changed = [n for n, p in head_named.items() if not torch.equal(p.detach(), head_before[n])]
    assert changed, "the head's transform should have been trained"
    assert math.isnan(fit_mlm_head(encoder, [], steps=3))
    assert math.isnan(fit_mlm_head(encoder, texts, steps=0))


# --------------------------------------------------------------------------- mlp / pool / head


@pytest.mark.parametrize("depth, n_linear", [(1, 1), (2, 2), (3, 3)])
def test_mlp_depth_and_shapes(depth: int, n_linear: int) -> None:
    net = mlp(8, 16, 4, depth=depth, dropout=0.1)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert len(linears) == n_linear
    assert linears[0].in_features == 8 and linears[-1].out_features == 4
    assert all(lin.out_features == 16 for lin in linears[:-1])
    assert net(torch.randn(5, 8)).shape == (5, 4)
    assert not isinstance(net[-1], (nn.ReLU, nn.Dropout))
    if depth == 1:
        assert len(net) == 1


def test_mlp_rejects_depth_zero() -> None:
    with pytest.raises(ValueError):
        mlp(8, 16, 4, depth=0)


def test_pool_cls_and_mean() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                           [[0.0, 0.0], [2.0, 2.0], [4.0, 4.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[2.0, 3.0], [2.0, 2.0]]))
    with pytest.raises(ValueError):
        pool(hidden, mask, "max")


def test_memory_encoder_features(encoder) -> None:
    texts = ["The Eiffel Tower is located in", "Hi"]
    feats = encoder.features(texts)
    assert feats.shape == (2, encoder.hidden_size) == (2, 32)
    enc = encoder.encode(texts, batch_size=1)
    assert not enc.requires_grad
    encoder.eval()
    torch.testing.assert_close(encoder.features(texts), enc, atol=1e-5, rtol=1e-5)
    assert masked_lm_head(encoder.mlm) is encoder.head


# --------------------------------------------------------------------------- prefix augmentation


def test_prefix_augmentation_draws_from_the_pool(encoder) -> None:
    from lit_modules.pretrain import MemoryPretrainModule
    prompts = [p for _, p, _ in FACTS]
    pool = ["What is the capital of Peru?", "Who wrote Hamlet?"]
    off = MemoryPretrainModule(encoder, prefix_prob=0.0)
    assert off.with_prefixes(prompts, pool) == prompts
    always = MemoryPretrainModule(encoder, prefix_prob=1.0, seed=3)
    out = always.with_prefixes(prompts, pool)
    for text, prompt in zip(out, prompts):
        prefix = text.removesuffix(" " + prompt)
        assert text.endswith(" " + prompt) and prefix in pool
    some = MemoryPretrainModule(encoder, prefix_prob=0.5, seed=0).with_prefixes(prompts * 40, pool)
    changed = sum(a != b for a, b in zip(some, prompts * 40))
    assert 30 < changed < 90                      # about half of 120
    assert always.with_prefixes(prompts, []) == prompts


def test_prefix_augmented_training_step_reaches_every_loss(encoder) -> None:
    from lit_modules.pretrain import MemoryPretrainModule
    module = MemoryPretrainModule(encoder, prefix_prob=1.0, joint_from_start=True)
    module.log = lambda *a, **k: None
    batch = {"edit": {"subject": [f[0] for f in FACTS], "prompt": [f[1] for f in FACTS],
                      "target": [f[2] for f in FACTS]},
             "out": {"prompt": ["Who wrote Hamlet?", "What is the capital of Peru?", "How tall is K2?"]}}
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n.split(".")[0] for n, p in module.writer.named_parameters() if p.grad is not None}
    assert {"encoder", "exist_head", "associate_projector"} <= grads


def test_inject_copies_reads_each_fact_that_many_times_under_its_own_masks(encoder, monkeypatch) -> None:
    """`inject_copies=2`: L_inject's batch holds every fact twice, with masks drawn apiece."""
    import lit_modules.pretrain as pretrain
    from lit_modules.pretrain import MemoryPretrainModule
    seen = []
    real = pretrain.inject_batch

    def watching(tok, facts, *args, **kwargs):
        batch = real(tok, facts, *args, **kwargs)
        seen.append((facts, batch))
        return batch

    monkeypatch.setattr(pretrain, "inject_batch", watching)
    batch = {"edit": {"subject": [f[0] for f in FACTS], "prompt": [f[1] for f in FACTS],
                      "target": [f[2] for f in FACTS]},
             "out": {"prompt": ["Who wrote Hamlet?", "What is the capital of Peru?", "How tall is K2?"]}}
    for copies in (1, 2):
        module = MemoryPretrainModule(encoder, joint_from_start=True, inject_copies=copies, word_mask_prob=0.5)
        module.log = lambda *a, **k: None
        assert torch.isfinite(module.training_step(batch, 0))
    (one, _), (two, batch2) = seen
    assert two == one + one and len(batch2.input_ids) == 2 * len(FACTS)
    n = len(FACTS)
    # The copies are masked independently: with word masks at 0.5 some copy differs from its twin.
    assert not torch.equal(batch2.labels[:n], batch2.labels[n:])


# --------------------------------------------------------------------------- how much is written


def test_masked_recall_scores_exactly_the_masked_span(encoder, monkeypatch) -> None:
    from mindbridge.pretraining import masked_recall
    tok = encoder.tokenizer
    obj = masked_recall(encoder, FACTS, "object")
    assert 0.0 <= obj <= 1.0
    # A head that always answers with the gold token of the masked position scores 1.0: feed the
    # labels back through a hook on the head's input selection.
    seen = []
    real_head = encoder.head

    class Oracle(nn.Module):
        def forward(self, hidden):
            logits = torch.full((*hidden.shape[:2], tok.vocab_size), -1.0)
            gold = seen.pop(0)
            logits[0, torch.arange(len(gold)), gold] = 1.0
            return logits
    real_inject = __import__("mindbridge.pretraining", fromlist=["inject_batch"]).inject_batch

    def recording(*args, **kwargs):
        batch = real_inject(*args, **kwargs)
        seen.append(batch.labels[batch.labels != -100])
        return batch
    monkeypatch.setattr("mindbridge.pretraining.inject_batch", recording)
    encoder.head = Oracle()
    try:
        assert masked_recall(encoder, FACTS, "object") == 1.0
        assert masked_recall(encoder, FACTS, "subject") == 1.0
    finally:
        encoder.head = real_head


def test_masked_recall_on_the_subject_skips_facts_that_do_not_name_it(encoder, monkeypatch) -> None:
    from mindbridge import pretraining
    counted = []
    real = pretraining.inject_batch

    def recording(tok, facts, *args, **kwargs):
        counted.extend(facts)
        return real(tok, facts, *args, **kwargs)
    monkeypatch.setattr(pretraining, "inject_batch", recording)
    pretraining.masked_recall(encoder, FACTS, "subject")
    assert [f[0] for f in counted] == ["Eiffel Tower", "Danube"]
    with pytest.raises(ValueError, match="span"):
        pretraining.masked_recall(encoder, FACTS, "relation")


# --------------------------------------------------------------------------- no work on padding


def test_by_length_matches_one_padded_pass_at_every_real_token(encoder) -> None:
    from mindbridge.encoder import by_length
    texts = ["a", "The Eiffel Tower is located in Paris, France", "Who wrote Dune?", "b c d e f g h",
             "What is the capital city of the country of Peru?"]
    enc = encoder.tokenize(texts)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    calls = []

    def forward(m, i):
        calls.append(tuple(i.shape))
        return encoder.hidden(i, m)
    with torch.no_grad():
        full = encoder.hidden(ids, mask)
        grouped = by_length(forward, mask, ids, rows=2)
    real = mask.bool()
    torch.testing.assert_close(grouped[real], full[real], atol=1e-5, rtol=1e-5)
    # Three groups of at most two rows, each only as wide as its longest row.
    lengths = sorted(mask.sum(1).tolist())
    assert calls == [(2, lengths[1]), (2, lengths[3]), (1, lengths[4])]


def test_by_length_leaves_left_padded_rows_in_one_pass(encoder) -> None:
    from mindbridge.encoder import by_length
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    calls = []
    by_length(lambda m, i: calls.append(i.shape) or torch.zeros(*i.shape, 4), mask, torch.ones(2, 3, dtype=torch.long))
    assert calls == [torch.Size([2, 3])]


def test_grouping_by_length_leaves_the_losses_unchanged(encoder) -> None:
    writer = MemoryWriter(encoder).eval()
    facts = FACTS * 3
    inject = inject_batch(encoder.tokenizer, facts, random.Random(0), 48)
    associate = ([p for _, p, _ in facts], associate_batch(encoder.tokenizer, [(p, o) for _, p, o in facts], 48))
    exist = ([p for _, p, _ in FACTS] + ["Who wrote Hamlet?", "How tall is K2?", "Hi"], torch.tensor([1, 1, 1, 0, 0, 0]))
    with torch.no_grad():
        writer.bucket_rows = 1000                 # one group: the whole batch at its widest row
        whole = writer.losses(inject, associate, exist)
        writer.bucket_rows = 2
        grouped = writer.losses(inject, associate, exist)
    for key in whole:
        torch.testing.assert_close(grouped[key], whole[key], atol=1e-5, rtol=1e-5)
