"""NeuralDB: the gate, the module it wraps in every layout, keys and residuals, the database API,
persistence, γ calibration and one tiny end-to-end `stage=neuraldb` run."""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mindbridge.artifacts import ArtifactError
from mindbridge.lm import causal_logits
from mindbridge.loading import load_causal_lm
from mindbridge.facts import Fact, subject_last_token
from mindbridge.ffn import locate_ffn
from mindbridge.neuraldb import (PAPER_GAMMA, EditHParams, GatedFFNOut, NeuralDB, _PrefixKV, _Row, best_match,
                                 calibrate_gamma, fact_keys, normalize_rows, row_logits)
from mindbridge.tokenization import _left_pad, encode_target, prompt_batch, teacher_forced_batch
from tests.conftest import CONFIG_DIR

SHARED_KEYS = {"rel", "gen", "loc", "avg", "pre_rel", "pre_gen", "rel_em", "gen_em", "loc_em", "method", "llm",
               "encoder", "dataset", "num_edits", "train_seconds", "edit_seconds", "eval_seconds"}
FAST = dict(steps=4, num_prefixes=1, batch_size=4)
FACTS = [Fact("a", "Eiffel Tower", "The Eiffel Tower is located in", "Rome"),
         Fact("b", "Barack Obama", "Where was Barack Obama born?", "Paris city")]
PROBES = ["The Eiffel Tower is located in", "Where was Barack Obama born?", "Hello there, my old friend"]


def _model(name: str, seed: int = 0):
    return _load(name, seed)


@functools.lru_cache(maxsize=None)
def _load(name: str, seed: int):
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "llm" / f"{name}.yaml")
    return load_causal_lm(cfg.source, random_config=OmegaConf.to_container(cfg.random_config), seed=seed)


@contextlib.contextmanager
def attached(name: str, layer: int = 0, seed: int = 0, **kwargs):
    """A NeuralDB on a cached tiny model, always detached afterwards (the model is shared)."""
    model, tok = _model(name, seed)
    db = NeuralDB(model, tok, layer, llm_name=name, **kwargs)
    try:
        yield db
    finally:
        db.remove()


def _logits(model, tok, prompts=PROBES, keep: int = 4) -> torch.Tensor:
    ids, mask = prompt_batch(tok, prompts)
    with torch.no_grad():
        return causal_logits(model, ids, mask, keep)


def _target_nll(lm, tok, facts) -> torch.Tensor:
    b = teacher_forced_batch(tok, [f.prompt for f in facts], [f.target for f in facts])
    logp = lm.logits(None, b.input_ids, b.attention_mask, b.keep)[:, :-1].log_softmax(-1)
    return -(logp.gather(-1, b.target_ids[..., None]).squeeze(-1) * b.target_mask).sum(1) / b.target_mask.sum(1)


# --------------------------------------------------------------------------- the gate on a hand-built database


def _hand_gate(gamma: float = 0.7, chunk_size: int | None = None, inner: nn.Module | None = None) -> GatedFFNOut:
    inner = inner or nn.Linear(4, 3)
    gate = GatedFFNOut(inner, 4, 3, gamma=gamma, chunk_size=chunk_size)
    keys = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 1.0]])
    gate.keys_hat, gate.key_norms = normalize_rows(keys), keys.norm(dim=-1)
    gate.residuals = torch.tensor([[10.0, 0, 0], [0, 20.0, 0], [0, 0, 30.0]])
    return gate


def test_gate_fires_above_gamma_with_the_best_key_at_each_position():
    gate = _hand_gate(gamma=0.7)
    x = torch.tensor([[[2.0, 0.3, 0, 0],       # cos 0.99 with key 0
                       [0.5, 1.0, 0, 0],       # best: key 1 (cos 0.89) over key 0 (0.45)
                       [1.0, 1.0, 0, 0],       # cos 0.71 with keys 0 and 1: a tie keeps the first key
                       [1.0, 0, 1.0, 0],       # best cos 0.71 (key 0) ... just above 0.7
                       [1.0, 1.0, 1.0, 1.0],   # best cos 0.71 (key 2) and 0.5 with 0, 1
                       [0, 0, 0, 0.0]]])       # nothing
    with torch.no_grad():
        base, out = gate.inner(x), gate(x)
    added = out - base
    torch.testing.assert_close(added[0, 0], torch.tensor([10.0, 0, 0]))
    torch.testing.assert_close(added[0, 1], torch.tensor([0, 20.0, 0]))
    torch.testing.assert_close(added[0, 2], torch.tensor([10.0, 0, 0]))
    torch.testing.assert_close(added[0, 4], torch.tensor([0, 0, 30.0]))
    assert torch.equal(out[0, 5], base[0, 5])
    gate.gamma = 0.72                         # now 0.707 no longer clears it
    with torch.no_grad():
        out = gate(x)
    assert torch.equal(out[0, 2:], base[0, 2:]) and not torch.equal(out[0, :2], base[0, :2])


def test_gate_off_empty_or_gamma_above_one_is_bit_identical():
    x = torch.randn(2, 5, 4)
    gate = _hand_gate(gamma=-1.0)             # fires everywhere
    with torch.no_grad():
        base = gate.inner(x)
        assert not torch.equal(gate(x), base)
        with gate.disabled():
            assert torch.equal(gate(x), base)
        gate.gamma = 1.01
        assert torch.equal(gate(x), base)
        empty = GatedFFNOut(gate.inner, 4, 3, gamma=-1.0)
        assert torch.equal(empty(x), base)


def test_chunked_lookup_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    keys = normalize_rows(torch.randn(1000, 16, generator=g))
    queries = normalize_rows(torch.randn(50, 16, generator=g))
    best, index = best_match(queries, keys)
    sims = queries @ keys.T
    torch.testing.assert_close(best, sims.max(1).values)
    assert torch.equal(index, sims.argmax(1))
    for chunk in (1, 7, 999):
        b, i = best_match(queries, keys, chunk_size=chunk)
        assert torch.equal(i, index)
        torch.testing.assert_close(b, best)
    whole = _hand_gate(0.5)
    chunked = _hand_gate(0.5, chunk_size=1, inner=whole.inner)
    x = torch.randn(3, 6, 4, generator=g)
    with torch.no_grad():
        assert torch.equal(whole(x), chunked(x))


# --------------------------------------------------------------------------- layouts

LAYOUTS = [("tiny_llama", 0, "model.layers.0.mlp.down_proj", "out_proj"),
           ("tiny_gpt2", 0, "transformer.h.0.mlp.c_proj", "out_proj"),
           ("tiny_gptj", 0, "transformer.h.0.mlp.fc_out", "out_proj"),
           ("tiny_gemma3", 0, "model.layers.0.mlp.down_proj", "out_proj"),
           ("tiny_mixtral", 0, "model.layers.0.mlp", "moe_block"),
           ("tiny_qwen2_moe", 1, "model.layers.1.mlp", "moe_block"),
           ("tiny_deepseek", 0, "model.layers.0.mlp.down_proj", "out_proj"),
           ("tiny_deepseek", 1, "model.layers.1.mlp", "moe_block")]


@pytest.mark.parametrize("name,layer,path,kind", LAYOUTS)
def test_each_layout_wraps_the_ffn_output_and_an_empty_db_is_bit_identical(name, layer, path, kind):
    model, tok = _model(name)
    before = _logits(model, tok)
    original = model.get_submodule(path)
    site = locate_ffn(model, layer)
    assert (site.path, site.kind) == (path, kind)
    seen: dict[str, torch.Tensor] = {}
    with attached(name, layer) as db:
        assert isinstance(model.get_submodule(path), GatedFFNOut) and db.gate.inner is original
        assert torch.equal(_logits(model, tok), before)
        # The key is the wrapped module's input: the FFN intermediate activation (or the MoE input).
        width = db.gate.keys_hat.shape[1]
        if kind == "out_proj":
            assert width > model.get_input_embeddings().weight.shape[1]     # d1 > d2 in these FFNs
        else:
            assert width == model.get_input_embeddings().weight.shape[1]
        hook = original.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
        try:
            _logits(model, tok, PROBES[:1])
        finally:
            hook.remove()
        keys = db.prompt_keys(PROBES[:1])[0]
        assert keys.shape == (seen["x"].shape[1], width)
        torch.testing.assert_close(keys, seen["x"][0])
    assert model.get_submodule(path) is original
    assert torch.equal(_logits(model, tok), before)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2", "tiny_gptj", "tiny_gemma3", "tiny_mixtral"])
def test_cached_prefix_rows_match_the_full_forward(name):
    """Residual steps run only the tokens from the subject's last one on, over cached prefixes."""
    model, tok = _model(name)
    texts = [("The Eiffel Tower is in", "Eiffel Tower", "Rome"), ("Eiffel is a", "Eiffel", ""),
             ("Once upon a time. Who wrote Hamlet in London?", "Hamlet", "William Shakespeare of Stratford")]
    rows = []
    for text, subject, target in texts:
        ids, s, found = subject_last_token(tok, text, subject)
        assert found
        t = encode_target(tok, target) if target else []
        rows.append(_Row(0, ids[:s], ids[s:] + t, t, 0))
    with attached(name) as db:
        keep = 5
        got = row_logits(model, tok.pad_token_id, db.gate, _PrefixKV(model, [r.prefix for r in rows], tok.pad_token_id),
                         rows, [0, 1, 2], keep)
        # Only some positions through the LM head: the same logits, row-major.
        select = torch.zeros(3, keep, dtype=torch.bool)
        select[0, -1] = True
        select[1, -2:] = True
        select[2, 1:4] = True
        picked = row_logits(model, tok.pad_token_id, db.gate,
                            _PrefixKV(model, [r.prefix for r in rows], tok.pad_token_id), rows, [0, 1, 2], keep,
                            select=select)
    ids, mask = _left_pad([r.prefix + r.cont for r in rows], tok.pad_token_id)
    want = causal_logits(model, ids, mask, keep)
    for b, r in enumerate(rows):
        n = min(keep, len(r.cont))
        torch.testing.assert_close(got[b, keep - n:], want[b, keep - n:], atol=1e-5, rtol=1e-5)
    assert picked.shape == (int(select.sum()), want.shape[-1])
    torch.testing.assert_close(picked, got[select], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- keys and residuals


def test_subject_last_token_is_case_insensitive_and_falls_back_to_the_last_token():
    _, tok = _model("tiny_llama")
    ids, s, found = subject_last_token(tok, "Where was barack OBAMA born?", "Barack Obama")
    assert found and tok.decode(ids[s]).strip().lower().endswith("ama") and tok.decode(ids[s + 1]).strip() == "born"
    # After a template prefix, the subject is searched in the prompt only.
    text = "Obama said so. Where was Barack Obama born?"
    ids, s, found = subject_last_token(tok, text, "Barack Obama", start=text.index("Where"))
    assert found and tok.decode(ids[:s + 1]).endswith("Where was Barack Obama")
    ids, s, found = subject_last_token(tok, "Where was he born?", "Barack Obama")
    assert not found and s == len(ids) - 1


def test_fact_keys_mean_or_weight_the_bare_prompt():
    bare, a, b = torch.tensor([3.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 2.0])
    t = torch.stack([bare, a, b])[None]                              # (1 fact, 3 templates, d)
    torch.testing.assert_close(fact_keys(t, None), t.mean(1))
    # w = 0.5: half the bare prompt's direction, half the prefixed keys' mean direction.
    want = 0.5 * torch.tensor([1.0, 0, 0]) + 0.5 * normalize_rows(((a + b) / 2)[None])[0]
    got = fact_keys(t, 0.5)
    torch.testing.assert_close(normalize_rows(got)[0], normalize_rows(want[None])[0])
    torch.testing.assert_close(got.norm(), t.mean(1).norm())          # the plain mean's norm
    torch.testing.assert_close(normalize_rows(fact_keys(t, 1.0))[0], torch.tensor([1.0, 0, 0]))
    torch.testing.assert_close(fact_keys(t[:, :1], 0.5), t[:, 0])       # no prefixes: the bare key


def test_residuals_make_the_new_target_more_likely_and_keys_are_read_at_the_subject():
    hp = EditHParams(steps=15, lr=0.5, num_prefixes=0, batch_size=2, clamp_norm_factor=100.0, weight_decay=0.0)
    with attached("tiny_llama", gamma=0.5, hparams=hp) as db:
        tok = db.tokenizer
        before = _target_nll(db.unedited, tok, FACTS)
        report = db.add(FACTS)
        after = _target_nll(db, tok, FACTS)
        assert (after < before - 0.05).all(), (before, after)
        assert torch.equal(_target_nll(db.unedited, tok, FACTS), before)
        assert report["facts"] == 2 and db.ids == ["a", "b"]
        # With the bare template only, the key is the prompt's key at the subject's last token.
        for row, fact in enumerate(FACTS):
            ids, s, _ = subject_last_token(tok, fact.prompt, fact.subject)
            key = db.prompt_keys([fact.prompt])[0][s]
            stored = db.gate.keys_hat[row] * db.gate.key_norms[row]
            torch.testing.assert_close(stored, key, atol=1e-5, rtol=1e-4)
        rates = db.fire_rates([f.prompt for f in FACTS], [0, 1])
        assert rates["own"] == 100.0


@pytest.mark.parametrize("bare_weight", [None, 0.5])
def test_stored_keys_combine_the_template_keys_as_configured(bare_weight):
    hp = EditHParams(steps=1, num_prefixes=1, batch_size=2, bare_weight=bare_weight)
    with attached("tiny_llama", hparams=hp) as db:
        db.add(FACTS)
        for row, fact in enumerate(FACTS):
            per_template = []
            for template in db.templates:
                text = template.replace("{}", fact.prompt)
                _, s, found = subject_last_token(db.tokenizer, text, fact.subject, start=template.index("{}"))
                assert found
                per_template.append(db.prompt_keys([text])[0][s])
            want = fact_keys(torch.stack(per_template)[None], bare_weight)[0]
            torch.testing.assert_close(db.gate.keys_hat[row], normalize_rows(want[None])[0], atol=1e-5, rtol=1e-4)


def test_rewordings_join_the_target_nll_but_not_the_key():
    """A reworded prompt adds one NLL row per fact (δ at its subject); the key stays the prompt's."""
    hp = EditHParams(steps=1, num_prefixes=0, batch_size=2)
    reworded = {"a": ["Tourists visiting the Eiffel Tower find themselves in"], "b": []}
    with attached("tiny_llama", hparams=hp) as db:
        db.add(FACTS)
        plain_keys, plain_nll = db.gate.keys_hat.clone(), db.stats["final_nll"].clone()
    with attached("tiny_llama", hparams=hp) as db:
        db.add(FACTS, reworded)
        torch.testing.assert_close(db.gate.keys_hat, plain_keys)
        other = _target_nll(db.unedited, db.tokenizer, [Fact("a", "Eiffel Tower", reworded["a"][0], "Rome")])
        # Step 0 has δ = 0: the fact's NLL is the mean over its rows (the prompt, the rewording).
        torch.testing.assert_close(db.stats["final_nll"][0], (plain_nll[0] + other[0]) / 2, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(db.stats["final_nll"][1], plain_nll[1])
    hp = EditHParams(steps=8, lr=0.5, num_prefixes=0, batch_size=2, clamp_norm_factor=100.0, weight_decay=0.0)
    with attached("tiny_llama", hparams=hp) as db:
        db.add(FACTS)
        plain = db.gate.residuals.clone()
    with attached("tiny_llama", hparams=hp) as db:
        db.add(FACTS, reworded)
        assert not torch.allclose(db.gate.residuals[0], plain[0])
        torch.testing.assert_close(db.gate.residuals[1], plain[1])


def test_the_clamp_bounds_residuals_and_early_stopping_is_per_fact():
    hp = EditHParams(steps=6, lr=5.0, num_prefixes=1, batch_size=2, clamp_norm_factor=0.5, weight_decay=0.0)
    with attached("tiny_gpt2", hparams=hp) as db:
        db.add(FACTS)
        h = []
        for fact in FACTS:
            ids, s, _ = subject_last_token(db.tokenizer, fact.prompt, fact.subject)
            out = {}
            hook = db.block.register_forward_hook(lambda m, a, o: out.setdefault("h", o[0] if isinstance(o, tuple) else o))
            with torch.no_grad(), db.gate.disabled():
                db.model(input_ids=torch.tensor([ids]))
            hook.remove()
            h.append(out["h"][0, s].norm())
        norms = db.gate.residuals.norm(dim=-1)
        assert (norms <= 0.5 * torch.stack(h) * (1 + 1e-4)).all() and (norms > 0).all()
        assert (db.stats["steps"] == 5).all()
    # Losses before any step, then a threshold between them: one fact stops at once (δ = 0).
    with attached("tiny_gpt2", hparams=EditHParams(steps=1, num_prefixes=1)) as db:
        db.add(FACTS)
        first = db.stats["final_loss"]
    assert first[0] != first[1]
    threshold = float(first.mean())
    with attached("tiny_gpt2", hparams=EditHParams(steps=4, num_prefixes=1, early_stop_loss=threshold)) as db:
        db.add(FACTS)
        stopped = int(first.argmin())
        assert db.stats["steps"][stopped] == 0 and db.stats["steps"][1 - stopped] == 3
        assert torch.equal(db.gate.residuals[stopped], torch.zeros_like(db.gate.residuals[stopped]))
        assert db.gate.residuals[1 - stopped].norm() > 0


# --------------------------------------------------------------------------- the database API


def test_add_delete_modify_save_load_round_trip(tmp_path):
    with attached("tiny_llama", hparams=EditHParams(**FAST, clamp_norm_factor=100.0, weight_decay=0.0)) as db:
        model, tok = db.model, db.tokenizer
        base = _logits(model, tok)
        db.add(FACTS)
        with pytest.raises(ValueError, match="already in the database"):
            db.add(FACTS[:1])
        keys_a = db.prompt_keys([FACTS[0].prompt])[0]
        own = float(db.match(keys_a)[0].max())
        other = float(best_match(normalize_rows(keys_a), db.gate.keys_hat[1:])[0].max())
        assert own > other + 1e-3, "precondition: fact a's prompt matches its own key best"
        db.gamma = (own + other) / 2
        edited = _logits(model, tok)
        assert not torch.equal(edited[0], base[0])

        db.save(tmp_path / "db")
        manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
        assert manifest["num_facts"] == 2 and manifest["llm"]["name"] == "tiny_llama"
        assert manifest["gamma"] == pytest.approx(db.gamma) and manifest["site"] == "model.layers.0.mlp.down_proj"

        # Deleting a fact gives its prompt the unedited model's logits back, bit for bit.
        db.delete("a")
        assert db.ids == ["b"] and len(db) == 1 and db.gate.keys_hat.shape[0] == 1
        assert torch.equal(_logits(model, tok, PROBES[:1]), base[:1])
        with pytest.raises(KeyError):
            db.delete("a")

        # Modifying recomputes the fact's residual in place.
        old = db.gate.residuals[0].clone()
        db.modify([Fact("b", "Barack Obama", "Where was Barack Obama born?", "Tokyo")])
        assert db.ids == ["b"] and db.facts[0].target == "Tokyo"
        assert not torch.equal(db.gate.residuals[0], old)
        db.delete(["b"])
        assert len(db) == 0 and torch.equal(_logits(model, tok), base)

    # Loading attaches the saved database again: same facts, tensors, γ and outputs.
    loaded = NeuralDB.load(tmp_path / "db", model, tok, llm_name="tiny_llama")
    try:
        assert loaded.ids == ["a", "b"] and loaded.gamma == pytest.approx(manifest["gamma"])
        assert loaded.prefixes == manifest["prefixes"] and loaded.gamma_source == "config"
        assert torch.equal(_logits(model, tok), edited)
        loaded.delete("b")
        loaded.add(FACTS[1:])                     # sequential appends after loading
        assert loaded.ids == ["a", "b"]
    finally:
        loaded.remove()


def test_a_database_for_another_llm_or_a_modified_file_is_refused(tmp_path):
    with attached("tiny_llama", hparams=EditHParams(**FAST)) as db:
        db.add(FACTS[:1])
        db.save(tmp_path / "db")
    other, tok = _model("tiny_llama", seed=1)                  # same architecture, other weights
    with pytest.raises(ArtifactError, match="was built for LLM 'tiny_llama'.*build a database for this LLM"):
        NeuralDB.load(tmp_path / "db", other, tok, llm_name="tiny_llama_seed1")
    gpt2, tok2 = _model("tiny_gpt2")
    with pytest.raises(ArtifactError, match="was built for LLM"):
        NeuralDB.load(tmp_path / "db", gpt2, tok2)
    model, tok = _model("tiny_llama")
    facts = tmp_path / "db" / "facts.jsonl"
    facts.write_text(facts.read_text().replace("Rome", "Oslo"))
    with pytest.raises(ArtifactError, match="modified"):
        NeuralDB.load(tmp_path / "db", model, tok)
    assert not isinstance(locate_ffn(model, 0).module, GatedFFNOut)
    with pytest.raises(ArtifactError, match="No NeuralDB"):
        NeuralDB.load(tmp_path / "missing", model, tok)


def test_gamma_calibration_rule():
    inside = torch.linspace(0.8, 1.0, 101)
    outside = torch.linspace(0.0, 0.4, 101)
    gamma, stats = calibrate_gamma(inside, outside, in_quantile=0.0, out_quantile=1.0, position=0.5)
    assert gamma == pytest.approx(0.6) and not stats["calib_overlap"] and stats["gamma_rule"] == "between"
    gamma, stats = calibrate_gamma(torch.tensor([0.5, 0.9]), torch.tensor([0.2, 0.7]), 0.0, 1.0)
    assert gamma == pytest.approx(0.7) and stats["calib_overlap"]
    gamma, stats = calibrate_gamma(inside, torch.zeros(0))
    assert gamma == PAPER_GAMMA and stats["gamma_rule"] == "paper_default_no_data"


def test_gamma_calibration_relaxes_the_out_of_scope_quantile_only_when_that_separates():
    inside = torch.linspace(0.7, 1.0, 101)                              # lo = 0.7 at in_quantile 0
    outside = torch.cat([torch.linspace(0.0, 0.5, 100), torch.tensor([0.9, 0.9])])   # a 2% tail at 0.9
    gamma, stats = calibrate_gamma(inside, outside, 0.0, 0.99)
    assert stats["calib_overlap"] and gamma == pytest.approx(stats["calib_out_q"]) and gamma > 0.7
    gamma, stats = calibrate_gamma(inside, outside, 0.0, 0.99, relaxed_out_quantile=0.97)
    relaxed = stats["calib_relaxed_out_q"]
    assert relaxed < 0.5 and stats["gamma_rule"] == "between_relaxed"
    assert gamma == pytest.approx(relaxed + 0.5 * (0.7 - relaxed))
    # A tail of 5% still overlaps at 0.97: γ stays at the 0.99 quantile.
    outside = torch.cat([torch.linspace(0.0, 0.5, 95), torch.full((5,), 0.9)])
    gamma, stats = calibrate_gamma(inside, outside, 0.0, 0.99, relaxed_out_quantile=0.97)
    assert stats["gamma_rule"] == "out_of_scope_quantile" and gamma == pytest.approx(stats["calib_out_q"])


def test_calibrate_sets_gamma_between_edits_and_unrelated_prompts():
    with attached("tiny_llama", hparams=EditHParams(**FAST)) as db:
        db.add(FACTS)
        stats = db.calibrate(["Hello there, my old friend", "What is the capital of Peru?"], in_quantile=0.0,
                             out_quantile=1.0)
        assert db.gamma_source == "calibrated" and stats["calib_num_out"] == 2 and stats["calib_num_in"] == 2
        assert min(stats["calib_in_q"], stats["calib_out_q"]) <= db.gamma <= max(stats["calib_in_q"], stats["calib_out_q"])
        assert db.fire_rates(["Hello there, my old friend"], [None])["any"] == 0.0


# --------------------------------------------------------------------------- the stage


def test_stage_alone_selects_the_neuraldb_model_config(tiny_cfg):
    from lit_modules.editing import method_config, resolve_layer
    cfg = tiny_cfg("stage=neuraldb")
    assert list(cfg.stage.jobs) == ["neuraldb"] and cfg.model.name == "neuraldb"
    hp = method_config(cfg, "neuraldb")
    assert hp.name == "neuraldb" and hp.gamma is None and hp.layers.smollm2 == 5
    model, _ = _model("tiny_llama")
    assert resolve_layer(hp, "smollm2", model) == 5 and resolve_layer(hp, "tiny_llama", model) == 0
    cfg = tiny_cfg("stage=neuraldb", "model.layer=1")
    assert resolve_layer(method_config(cfg, "neuraldb"), "smollm2", model) == 1


def test_stage_neuraldb_end_to_end(tiny_cfg, tmp_path):
    from train import train
    run = tmp_path / "run"
    cfg = tiny_cfg("stage=neuraldb", "model=neuraldb", "model.steps=3", "model.num_prefixes=1",
                   "model.calibration.max_prompts=16", run_dir=run)
    metrics = train(cfg, run)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert SHARED_KEYS <= on_disk.keys()
    assert on_disk["method"] == "neuraldb" and on_disk["encoder"] == "none" and on_disk["num_edits"] == 8
    assert on_disk["train_seconds"] > 0 and on_disk["edit_seconds"] > 0 and on_disk["edit_facts_per_second"] > 0
    assert on_disk["gamma_source"] == "calibrated" and "calib_out_q" in on_disk and "gate_fire_loc_pct" in on_disk
    assert on_disk["num_facts"] == 8 and on_disk["neuraldb_site"] == "model.layers.0.mlp.down_proj"
    for key in ("rel", "gen", "loc", "pre_rel", "pre_gen"):
        assert 0.0 <= on_disk[key] <= 100.0
    assert on_disk["avg"] == pytest.approx((on_disk["rel"] + on_disk["gen"] + on_disk["loc"]) / 3)
    assert metrics["gamma"] == pytest.approx(on_disk["gamma"])
    saved = run / "neuraldb"
    assert {p.name for p in saved.iterdir()} == {"database.safetensors", "facts.jsonl", "manifest.json"}
    assert not (run / "checkpoints").exists()
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["num_facts"] == 8 and manifest["gamma"] == pytest.approx(on_disk["gamma"])

    # Scoring the saved database again (model.database=) gives the same figures without editing.
    again = tmp_path / "again"
    cfg = tiny_cfg("stage=neuraldb", "model=neuraldb", f"model.database={saved}", "model.num_prefixes=1",
                   "model.calibration.max_prompts=16", run_dir=again)
    reused = train(cfg, again)
    assert reused["edit_seconds"] == 0 and reused["neuraldb_reused"] == str(saved)
    for key in ("gamma", "rel", "gen", "loc", "pre_rel"):
        assert reused[key] == pytest.approx(on_disk[key]), key
    # ... and only for the same edits.
    cfg = tiny_cfg("stage=neuraldb", "model=neuraldb", f"model.database={saved}", "data.seed=5", run_dir=tmp_path / "x")
    with pytest.raises(ArtifactError, match="differ from the 8 edits"):
        train(cfg, tmp_path / "x")


def test_counterfact_prompt_types_pairs_each_fact_with_its_own_prompts():
    """benchmarks/counterfact_prompt_types.py: the flat file's rephrase prompt of a fact is labelled
    by what it is in the same fact's ROME record; a fact outside the ROME file is refused."""
    from benchmarks.counterfact_prompt_types import read_facts_files, scoring_sets
    rome, flat = read_facts_files()
    both = [cid for cid in rome if cid in flat][:40]
    facts = [Fact(cid, rome[cid].subject, rome[cid].prompt, rome[cid].target_new) for cid in both]
    rows = scoring_sets(facts, rome, flat)
    kinds = {k for k, *_ in rows}
    assert {"rome_paraphrase", "flat_is_generation"} <= kinds
    for kind, i, prompt, target in rows:
        record = rome[both[i]]
        assert target == record.target_new
        if kind == "rome_paraphrase":
            assert prompt in record.rephrase_prompts
        else:
            assert prompt in flat[both[i]].rephrase_prompts
            assert (prompt in record.generation_prompts) == (kind == "flat_is_generation")
    assert sum(k == "rome_paraphrase" for k, *_ in rows) == sum(len(rome[c].rephrase_prompts) for c in both)
    with pytest.raises(SystemExit, match="not a CounterFact fact in ROME form"):
        scoring_sets([Fact("no-such-case", "X", "X is in", "Y")], rome, flat)
