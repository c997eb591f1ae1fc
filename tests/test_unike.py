"""UniKE: the two wrappers in every layout, intrinsic neurons, latent retrieval and attention, the
disentangling encoders, the ablation switches, one-step vs sequential, and the text, ablation and
multimodal stages end to end on tiny random models."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data.mmedit import read_mmedit
from data.records import DataFileNotFoundError, EditRecord
from lit_modules.registry import run
from mindbridge.evaluation import evaluate_edits
from mindbridge.lm import causal_logits
from mindbridge.loading import ModelUnavailableError, load_causal_lm
from mindbridge.tokenization import prompt_batch
from mindbridge.unike import ABLATIONS, DisentanglingEncoders, Request, UniKE, UniKEHParams
from tests.conftest import CONFIG_DIR

LAYOUTS = ["tiny_llama", "tiny_gpt2", "tiny_gptj"]
SHARED_KEYS = {"rel", "gen", "loc", "avg", "pre_rel", "pre_gen", "rel_em", "gen_em", "loc_em", "method", "llm",
               "encoder", "dataset", "num_edits", "train_seconds", "edit_seconds", "eval_seconds"}
PROBES = ["The Eiffel Tower is located in", "Where was Barack Obama born?", "Hello there, my old friend"]
EDITS = [Request("The Eiffel Tower is located in", "Rome"), Request("Barack Obama was born in", "Paris")]
UNRELATED = [Request(f"Some unrelated sentence number {i} about the weather", "") for i in range(12)]
# Tiny random models need larger steps than real ones to move a 49k-way argmax.
FAST = dict(num_layers=2, latent_layers=None, neurons_per_edit=3, top_k=4, steps=80, value_lr=0.5)


@functools.lru_cache(maxsize=None)
def _load(name: str):
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "llm" / f"{name}.yaml")
    return load_causal_lm(cfg.source, random_config=OmegaConf.to_container(cfg.random_config), seed=0)


def _logits(model, tok, prompts=PROBES, keep: int = 3) -> torch.Tensor:
    ids, mask = prompt_batch(tok, prompts)
    with torch.no_grad():
        return causal_logits(model, ids, mask, keep)


def _editor(name: str, **hp) -> UniKE:
    model, tok = _load(name)
    return UniKE(model, tok, UniKEHParams(**{**FAST, **hp}))


def _pool(editor: UniKE, n: int = 16):
    return editor.build_pool([Request(f"Question {i}: who made item {i}?", f"maker {i}", f"someone {i + 1}")
                              for i in range(n)])


def _record(req: Request, rephrase: str, loc: str) -> EditRecord:
    return EditRecord("0", "t", "", req.prompt, req.target, None, (rephrase,), (loc,), ("yes",))


# --------------------------------------------------------------------------- wrappers


@pytest.mark.parametrize("name", LAYOUTS)
def test_wrappers_change_nothing_without_edits_and_detach_cleanly(name):
    model, tok = _load(name)
    base = _logits(model, tok)
    editor = _editor(name)
    try:
        assert torch.equal(_logits(model, tok), base)
        _pool(editor)                       # a pool but w = 0 and no neurons: still the base model
        editor.state.adaptive_weight, editor.state.fixed_weight = False, 0.0
        assert torch.allclose(_logits(model, tok), base, atol=1e-5)
    finally:
        editor.remove()
    assert torch.equal(_logits(model, tok), base)
    assert "Latent" not in repr(model) and "ExtraNeurons" not in repr(model)


@pytest.mark.parametrize("name", LAYOUTS)
def test_extra_neurons_learn_the_edit_and_stay_silent_on_memory(name):
    editor = _editor(name, mode="intrinsic")
    try:
        editor.set_memory_queries(UNRELATED)
        report = editor.edit(EDITS[:1])
        assert report["edit_correct_pct"] == 100.0
        assert editor.added_params == 2 * 3 * (2 * 64 + 1)            # layers x n_e x (key + value + bias)
        rec = _record(EDITS[0], "The Eiffel Tower lies in", UNRELATED[0].prompt)
        with editor.active_edits([0]):
            m = evaluate_edits(editor, editor.unedited, [rec])
        assert m["rel"] == 100.0 and m["pre_rel"] < 100.0
        # The memory loss pushed every new neuron below zero on the unrelated tokens it saw.
        for i, layer in enumerate(editor.layers):
            pre = editor.memory_queries[i] @ layer.ffn.keys + layer.ffn.bias
            assert (pre > 0).float().mean() < 0.05
        fired = editor.probe([EDITS[0]], [0])["fire_pct"]
        assert fired > 50.0
    finally:
        editor.remove()


def test_one_step_rows_see_only_their_own_edit_and_sequential_sees_all():
    editor = _editor("tiny_llama", mode="intrinsic", steps=200)
    try:
        editor.set_memory_queries(UNRELATED)
        assert editor.edit(EDITS)["edit_correct_pct"] == 100.0        # both trained in one batch, rows apart
        recs = [_record(e, e.prompt + " indeed", "Hello there") for e in EDITS]
        with editor.active_edits([]):
            assert evaluate_edits(editor, editor.unedited, recs)["loc"] == 100.0
            none = evaluate_edits(editor, editor.unedited, recs)["rel"]
        with editor.active_edits([0]):
            only0 = evaluate_edits(editor, editor.unedited, recs[:1])["rel"]
        assert only0 == 100.0 and none < 100.0
        mars = Request("The capital of Mars is", "Olympus")
        assert editor.edit([mars], sequential=True)["edit_correct_pct"] == 100.0
        # Trained with every earlier edit switched on, so it holds when all are on (scored after the last edit).
        with editor.active_edits(None):
            assert evaluate_edits(editor, editor.unedited, [_record(mars, "Mars's capital is", "Hi")])["rel"] == 100.0
        assert editor.num_edits == 3
    finally:
        editor.remove()


# --------------------------------------------------------------------------- latent knowledge


def test_retrieval_uses_centred_cosine_and_respects_ownership():
    editor = _editor("tiny_llama")
    try:
        att = editor.layers[-1].attention
        d = att.h_sem.shape[1]
        sem = torch.eye(d)[:4] * 5 + 1.0                  # a shared offset that raw cosine would favour
        att.center = torch.ones(d)
        att.add_entries(sem, sem, torch.tensor([-1, -1, 0, 1]))
        query = torch.eye(d)[2:3] * 3 + 1.0
        idx, _ = att.retrieve(query, None, 1)
        assert idx.item() == 2
        allowed = editor.state.allowed(att.owner, 1) if editor.state.active is not None else None
        assert allowed is None
        editor.state.active = torch.tensor([[False, True]])             # row may use edit 1 only
        idx, sims = att.retrieve(query, editor.state.allowed(att.owner, 1), 4)
        assert 2 not in idx[0][torch.isfinite(sims[0])].tolist()
    finally:
        editor.state.active = None
        editor.remove()


def test_latent_attention_mixes_from_the_last_prompt_token_on():
    model, tok = _load("tiny_llama")
    base = _logits(model, tok, keep=8)
    editor = _editor("tiny_llama", mode="latent")
    try:
        _pool(editor)
        editor.state.fixed_weight = 1.0                  # the pure knowledge path
        ids, mask = prompt_batch(tok, PROBES)
        with editor.configured(answer_lengths=torch.tensor([2, 2, 2])):
            with torch.no_grad():
                out = causal_logits(model, ids, mask, 8)
        # Positions before the last prompt token are untouched; from it on the output changes.
        assert torch.allclose(out[:, :-3], base[:, :-3], atol=1e-5)
        assert not torch.allclose(out[:, -3:], base[:, -3:], atol=1e-3)
        # generate() goes through the wrappers and reuses the retrieval while decoding.
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert gen.shape[1] == ids.shape[1] + 3
    finally:
        editor.remove()


def test_knowledge_weight_semantics_prose_and_equation_are_complements():
    editor = _editor("tiny_llama")
    try:
        pool = _pool(editor)
        enc = editor.new_encoders()
        editor.set_encoders(enc, pool)
        att = editor.layers[-1].attention
        query = pool.h_sem[-1][:3]
        idx, sims = att.retrieve(query, None, 4)
        know, valid = att.knowledge(idx, sims)
        _, attn_last = att.latent_attention(query[:, None], know, valid)
        w_prose = att.knowledge_weight(query, know, attn_last)
        editor.state.alpha_semantics = "equation"
        w_eq = att.knowledge_weight(query, know, attn_last)
        assert torch.allclose(w_prose + w_eq, torch.ones(3)) and ((w_prose >= 0) & (w_prose <= 1)).all()
    finally:
        editor.remove()


@pytest.mark.parametrize("name", LAYOUTS)
def test_training_from_the_first_intrinsic_layer_is_exact(name):
    """upper_layers_only runs only the layers from the first intrinsic one, fed their cached input:
    the same loss trajectory and the same neurons as running the whole model every step."""
    results = []
    for upper in (True, False):
        editor = _editor(name, layers=[1], latent_layers=[0], steps=4, upper_layers_only=upper,
                         neuron_training="both", knowledge_tokens="answer", top_k=1, fixed_weight=0.7, mode="both")
        try:
            _pool(editor)
            editor.set_memory_queries(UNRELATED)
            report = editor.edit(EDITS)
            results.append((report["final_nll"], editor.layers[-1].ffn.values.clone()))
        finally:
            editor.remove()
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-4)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_latent_and_intrinsic_layers_can_differ_and_a_shallow_model_falls_back():
    editor = _editor("tiny_llama", layers=[1], latent_layers=[0])
    try:
        assert [(l.index, l.latent, l.ffn is not None) for l in editor.layers] == [(0, True, False), (1, False, True)]
        _pool(editor)
        assert editor.layers[0].attention.h_sem.shape[0] == 16 and editor.layers[1].attention.h_sem.shape[0] == 0
        assert editor.describe()["unike_latent_layers"] == "0" and editor.describe()["unike_layers"] == "1"
    finally:
        editor.remove()
    with pytest.warns(UserWarning, match="latent_layers"):
        editor = _editor("tiny_llama", latent_layers=[-10, -9])
    try:
        assert [l.index for l in editor.latent_layers] == [0, 1]
    finally:
        editor.remove()


def test_knowledge_entries_hold_the_answer_tokens_and_queries_the_prompt_mean():
    editor = _editor("tiny_llama", knowledge_tokens="answer", max_knowledge_tokens=2, query_state="mean")
    try:
        req = Request("The Eiffel Tower is located in", "the city of Rome")
        states = editor.knowledge_states([req], [req.target])
        n_ans = len(editor.tokenizer(" the city of Rome", add_special_tokens=False)["input_ids"])
        assert states.mask.tolist() == [[True, True]] and n_ans > 2          # first 2 answer tokens
        ids, mask = prompt_batch(editor.tokenizer, [req.prompt + " the city of Rome"])
        with editor.configured(intrinsic=False, latent=False, recording=True), torch.no_grad():
            editor._forward(ids, mask, 1)
        x = editor.layers[0].attention.recorded[0]
        prompt_len = x.shape[0] - n_ans
        assert torch.allclose(states.tokens[0][0], x[prompt_len:prompt_len + 2], atol=1e-5)
        assert torch.allclose(states.h_sem[0][0], x[:prompt_len].mean(0), atol=1e-5)
        editor.hp.knowledge_tokens = "last"
        last = editor.knowledge_states([req], [req.target])
        assert last.tokens[0].shape[1] == 1 and torch.allclose(last.tokens[0][0, 0], x[-1], atol=1e-5)
    finally:
        editor.remove()


def test_calibrated_knowledge_weight_is_a_ramp_and_calibration_uses_no_edit_slot():
    editor = _editor("tiny_llama", similarity="retrieval", top_k=1, query_state="mean")
    try:
        pool = _pool(editor)
        editor.set_encoders(editor.new_encoders(), pool)
        pseudo = [Request(f"Question {i}: who made item {i}?", f"maker {i}") for i in (3, 5, 7)]
        reworded = [Request(f"Who was the maker of item {i}? Question {i}", "") for i in (3, 5, 7)]
        unrelated = [Request(f"Unrelated line {i}: the weather on day {i} was mild", "") for i in range(40)]
        info = editor.calibrate_weights(pseudo, reworded, unrelated)
        att = editor.latent_layers[-1].attention
        # low is the 95th percentile of the unrelated prompts' similarity: at most 5% lie above it.
        assert att.weight_high > att.weight_low and info["calibration_unrelated_on_pct"] <= 5.0 + 1e-4
        assert (att.owner == -1).all() and editor.num_edits == 0       # pseudo-edits are gone again
        # w = clamp((s - low) / (high - low), 0, 1) of the best retrieval cosine.
        query = pool.h_sem[-1][:4]
        idx, sims = att.retrieve(query, None, 1)
        know, valid = att.knowledge(idx, sims)
        _, attn_last = att.latent_attention(query[:, None], know, valid)
        w = att.knowledge_weight(query, know, attn_last, sims)
        expected = ((sims[:, 0] - att.weight_low) / (att.weight_high - att.weight_low)).clamp(0, 1)
        assert torch.allclose(w, expected)
    finally:
        editor.remove()


def test_neurons_trained_with_and_without_the_latent_path_hold_the_edit_both_ways():
    editor = _editor("tiny_llama", mode="both", neuron_training="both", knowledge_tokens="answer", top_k=1,
                     fixed_weight=0.5, steps=150)
    try:
        _pool(editor)
        editor.set_memory_queries(UNRELATED)
        reworded = Request(EDITS[0].prompt, EDITS[0].target, rewordings=("Where is the Eiffel Tower?",))
        report = editor.edit([reworded])
        assert report["edit_correct_pct"] == 100.0 and report["rewording_correct_pct"] == 100.0
        rec = _record(EDITS[0], "Where is the Eiffel Tower?", UNRELATED[0].prompt)
        with editor.active_edits([0]):
            assert evaluate_edits(editor, editor.unedited, [rec])["rel"] == 100.0
            editor.state.latent = False                       # as wherever the knowledge weight is 0
            m = evaluate_edits(editor, editor.unedited, [rec])
            editor.state.latent = True
        assert m["rel"] == 100.0 and m["gen"] == 100.0
    finally:
        editor.remove()


# --------------------------------------------------------------------------- disentangling


def test_contrastive_losses_learn_truth_and_semantics():
    torch.manual_seed(0)
    n, d = 64, 16
    truth = torch.randn(d)
    sem = torch.randn(1, n, d)
    pos = sem + truth + 0.1 * torch.randn(1, n, d)
    neg = sem - truth + 0.1 * torch.randn(1, n, d)
    enc = DisentanglingEncoders(1, d, d_t=8, temperature=0.1)
    before = {k: float(v) for k, v in enc.loss(sem, pos, neg).items()}
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    for _ in range(150):
        loss = enc.loss(sem, pos, neg)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {k: float(v) for k, v in enc.loss(sem, pos, neg).items()}
    assert after["truth_loss"] < 0.5 * before["truth_loss"]
    assert after["semantic_loss"] < before["semantic_loss"]
    zeta, r2 = enc.truthful_directions(pos, neg)
    # ζ′ = W_ζ ζ points along the true pos - neg direction (spec §8.8).
    assert torch.nn.functional.cosine_similarity(zeta[0], truth, dim=0) > 0.9 and r2[0] > 0.9


def test_ablation_modes_switch_the_mechanisms():
    editor = _editor("tiny_llama")
    try:
        for mode, (intrinsic, latent, disentangle) in ABLATIONS.items():
            editor.set_mode(mode)
            st = editor.state
            assert (st.intrinsic, st.latent, st.adaptive_weight) == (intrinsic, latent, disentangle)
            assert (st.beta != 0) == disentangle
        with pytest.raises(ValueError, match="Unknown UniKE mode"):
            editor.set_mode("everything")
    finally:
        editor.remove()


def test_truthful_direction_is_added_to_the_new_values():
    editor = _editor("tiny_llama", mode="full", steps=1)
    try:
        pool = _pool(editor)
        info = editor.set_encoders(editor.new_encoders(), pool)
        assert info["zeta_norm_mean"] > 0
        editor.set_memory_queries(UNRELATED)
        editor.edit(EDITS[:1])
        ffn = editor.layers[-1].ffn
        q = torch.randn(1, 1, ffn.keys.shape[0])
        ffn.tap.last = q
        editor.state.batch_shape = (1, 1)
        fire = torch.relu(q @ ffn.keys + ffn.bias)
        h = torch.zeros(1, 1, ffn.inner.in_features)            # Llama's down_proj input
        with editor.active_edits(None):
            extra = ffn(h) - ffn.inner(h)
        expected = fire @ (ffn.values + editor.state.beta * ffn.zeta)
        assert torch.allclose(extra, expected, atol=1e-5)
    finally:
        editor.remove()


# --------------------------------------------------------------------------- stages


def test_stage_unike_end_to_end(tiny_cfg, tmp_path):
    cfg = tiny_cfg("stage=unike", "model=unike", "model.steps=5", "model.encoders.epochs=2", "model.top_k=4",
                   "threads=1")
    m = run(cfg, tmp_path / "run")
    assert SHARED_KEYS <= set(m)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["method"] == "unike" and saved["unike_protocol"] == "one_step" and saved["num_edits"] == 8
    assert saved["pool_size"] > 0 and saved["memory_queries"] > 0 and saved["extra_params"] > 0
    assert 0 <= saved["rel"] <= 100 and saved["num_scored_prompts"] > 0


def test_stage_unike_ablation_reports_every_row(tiny_cfg, tmp_path):
    cfg = tiny_cfg("stage=unike_ablation", "model=unike", "model.steps=3", "model.encoders.epochs=1",
                   "model.top_k=4", "model.sequential=true", "threads=1")
    m = run(cfg, tmp_path / "run")
    rows = json.loads((tmp_path / "run" / "unike_ablation.json").read_text())
    assert [r["mode"] for r in rows] == list(ABLATIONS)
    assert all(f"{mode}_avg" in m for mode in ABLATIONS) and m["unike_protocol"] == "sequential"
    assert "only latent IKE" in (tmp_path / "run" / "unike_ablation.md").read_text()


def test_text_stage_refuses_a_vision_language_model(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="stage=unike_mm"):
        run(tiny_cfg("stage=unike", "llm=tiny_blip2"), tmp_path / "run")
    with pytest.raises(ValueError, match="vision-language model"):
        run(tiny_cfg("stage=unike_mm"), tmp_path / "run2")


# --------------------------------------------------------------------------- multimodal


def _mmedit_files(tmp_path: Path, n: int = 8, skip: str | None = None) -> tuple[Path, Path]:
    """The first n bundled E-VQA records and random images at the paths they name."""
    from PIL import Image
    recs = json.loads(Path(CONFIG_DIR).parent.joinpath("data/bundled/mmedit/vqa_eval.json").read_text())[:n]
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for r in recs:
        for key in ("image", "image_rephrase", "m_loc"):
            path = root / r[key]
            if r[key] == skip:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    data = tmp_path / "vqa.json"
    data.write_text(json.dumps(recs))
    return data, root


def test_mmedit_reader_applies_the_vqa_template():
    recs = read_mmedit(None, "vqa")
    assert len(recs) == 2093
    r = recs[0]
    assert r.prompt == "Question: How many tennis balls are in the picture? Short answer:"
    assert r.target == "2" and r.wrong == "no" and r.loc_prompt.startswith("nq question:")
    assert read_mmedit(None, "caption")[0].prompt == "a photo of"


def test_stage_unike_mm_end_to_end_on_a_tiny_blip2(tiny_cfg, tmp_path):
    data, root = _mmedit_files(tmp_path)
    cfg = tiny_cfg("stage=unike_mm", "llm=tiny_blip2", f"stage.mmedit.path={data}", f"stage.mmedit.image_root={root}",
                   "stage.mmedit.num_edits=2", "model=unike", "model.steps=40", "model.value_lr=0.5",
                   "model.encoders.epochs=2", "model.top_k=4", "threads=1")
    m = run(cfg, tmp_path / "run")
    for key in ("rel", "t_gen", "m_gen", "t_loc", "m_loc", "gen", "loc", "avg"):
        assert 0 <= m[key] <= 100, key
    assert m["pool_size"] > 0 and m["memory_queries"] > 0 and m["dataset"] == "mmedit_vqa"
    assert m["rel"] > m["pre_rel"]                      # the edit took on the image question


def test_missing_image_is_named(tiny_cfg, tmp_path):
    recs = json.loads(Path(CONFIG_DIR).parent.joinpath("data/bundled/mmedit/vqa_eval.json").read_text())[:8]
    data, root = _mmedit_files(tmp_path, skip=recs[3]["image"])
    cfg = tiny_cfg("stage=unike_mm", "llm=tiny_blip2", f"stage.mmedit.path={data}", f"stage.mmedit.image_root={root}",
                   "stage.mmedit.num_edits=7")
    with pytest.raises(DataFileNotFoundError, match=recs[3]["image"].split("/")[-1]):
        run(cfg, tmp_path / "run")


def test_upstream_blip2_fails_offline_with_one_sentence(monkeypatch):
    from mindbridge.unike_mm import load_vision_lm
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "llm" / "blip2_opt.yaml")
    with pytest.raises(ModelUnavailableError) as err:
        load_vision_lm(cfg.source, hub_id=cfg.hub_id)
    assert "Salesforce/blip2-opt-2.7b" in str(err.value) and "\n" not in str(err.value)
