"""End-to-end runs of train(cfg) on tiny random models: the stages, artifacts, resume."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mindbridge.artifacts import ArtifactError
from train import train

SHARED_KEYS = {"rel", "gen", "loc", "avg", "pre_rel", "pre_gen", "rel_em", "gen_em", "loc_em", "method", "llm",
               "encoder", "dataset", "num_edits", "train_seconds", "edit_seconds", "eval_seconds"}


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One tiny default job (pretrain -> bridge -> eval), shared by the tests below."""
    from tests.conftest import compose
    run = tmp_path_factory.mktemp("default")
    cfg = compose(["debug=fast", "callbacks.progress=null", f"run_dir={run}"])
    return run, train(cfg, run)


def test_default_job_writes_metrics_and_a_memory(default_run):
    run, metrics = default_run
    on_disk = json.loads((run / "metrics.json").read_text())
    assert SHARED_KEYS <= on_disk.keys()
    assert on_disk["num_edits"] == 8 and on_disk["method"] == "mindbridge"
    for key in ("rel", "gen", "loc", "pre_rel", "pre_gen"):
        assert 0.0 <= on_disk[key] <= 100.0
    assert on_disk["avg"] == pytest.approx((on_disk["rel"] + on_disk["gen"] + on_disk["loc"]) / 3)
    memory = run / "memory"
    assert (memory / "encoder" / "model.safetensors").is_file()
    assert (memory / "bridges" / "tiny_llama" / "projector" / "model.safetensors").is_file()
    manifest = json.loads((memory / "manifest.json").read_text())
    assert manifest["num_facts"] == 8 and len((memory / "facts.jsonl").read_text().splitlines()) == 8
    assert not list(memory.rglob("*.bin")) and not list(memory.rglob("*.pt"))


def test_checkpoints_hold_only_trainable_weights(default_run):
    run, _ = default_run
    ckpt = torch.load(run / "checkpoints" / "bridge-tiny_llama" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith("edited.projectors.") for k in ckpt["state_dict"])
    ckpt = torch.load(run / "checkpoints" / "pretrain" / "last.ckpt", weights_only=False)
    assert not any(k.startswith("writer.frozen_copy.") for k in ckpt["state_dict"])
    assert any(k.startswith("writer.encoder.") for k in ckpt["state_dict"])


def test_eval_stage_reproduces_the_metrics(default_run, tiny_cfg, tmp_path):
    run, metrics = default_run
    again = train(tiny_cfg("stage=eval", f"memory={run / 'memory'}"), tmp_path / "eval")
    for key in ("rel", "gen", "loc", "pre_rel"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6)


def test_bridging_another_llm_leaves_the_encoder_untouched(default_run, tiny_cfg, tmp_path):
    run, _ = default_run
    memory = run / "memory"
    before = {p.name: file_digest(p) for p in (memory / "encoder").iterdir()}
    metrics = train(tiny_cfg("stage=bridge", "llm=tiny_gpt2", f"memory={memory}"), tmp_path / "gpt2")
    after = {p.name: file_digest(p) for p in (memory / "encoder").iterdir()}
    assert before == after
    assert (memory / "bridges" / "tiny_gpt2" / "bridge.json").is_file()
    assert metrics["llm"] == "tiny_gpt2" and "rel" in metrics


def test_a_bridge_is_refused_for_another_llm(default_run, tiny_cfg, tmp_path):
    run, _ = default_run
    memory = tmp_path / "memory"
    import shutil
    shutil.copytree(run / "memory", memory)
    # Pretend the tiny_llama bridge belongs to tiny_gptj: its identity no longer matches.
    shutil.copytree(memory / "bridges" / "tiny_llama", memory / "bridges" / "tiny_gptj")
    with pytest.raises(ArtifactError, match="trained for LLM 'tiny_llama'"):
        train(tiny_cfg("stage=eval", "llm=tiny_gptj", f"memory={memory}"), tmp_path / "eval")


def test_memory_refused_for_other_facts(default_run, tiny_cfg, tmp_path):
    run, _ = default_run
    with pytest.raises(ArtifactError, match="facts"):
        train(tiny_cfg("stage=eval", "data.seed=7", f"memory={run / 'memory'}"), tmp_path / "eval")


def test_resume_from_checkpoint_continues_training(tiny_cfg, tmp_path):
    run = tmp_path / "resume"
    # First run: one bridge epoch. Then resume from its last.ckpt to three epochs.
    train(tiny_cfg("model.bridge.epochs=1", run_dir=run), run)
    first = torch.load(run / "checkpoints" / "bridge-tiny_llama" / "last.ckpt", weights_only=False)
    train(tiny_cfg("stage=bridge", "model.bridge.epochs=3", "ckpt_path=last", f"memory={run / 'memory'}",
                   run_dir=run), run)
    resumed = torch.load(run / "checkpoints" / "bridge-tiny_llama" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == first["epoch"] + 2
    assert resumed["global_step"] == 3 * first["global_step"] > 0


def test_ask_answers_with_and_without_the_memory(default_run, tiny_cfg, tmp_path):
    run, _ = default_run
    out = tmp_path / "ask"
    train(tiny_cfg("stage=ask", f"memory={run / 'memory'}", "+question=[Who is X?,Where is Y?]",
                   "+max_new_tokens=4", run_dir=out), out)
    answers = json.loads((out / "answers.json").read_text())
    assert [a["question"] for a in answers] == ["Who is X?", "Where is Y?"]
    assert all(isinstance(a["with_memory"], str) and isinstance(a["without_memory"], str) for a in answers)


def test_lambda_zero_losses_are_switched_off(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    m = train(tiny_cfg("stage=pretrain", "model.pretrain.lambda_exist=0", "model.pretrain.lambda_associate=0",
                       run_dir=run), run)
    assert "pretrain_inject" in m and "pretrain_exist" not in m and "pretrain_associate" not in m


def test_memory_keeps_the_existence_head_and_a_gated_bridge_starts_from_it(default_run, tiny_cfg, tmp_path):
    from mindbridge.artifacts import load_exist_head, read_manifest
    run, _ = default_run
    memory = run / "memory"
    head = load_exist_head(memory, read_manifest(memory))
    assert {k.split(".")[0] for k in head} == {"0", "3"}
    copy = tmp_path / "memory"
    import shutil
    shutil.copytree(memory, copy)
    metrics = train(tiny_cfg("stage=bridge", f"memory={copy}", "model.bridge.projector.gated=true"), tmp_path / "gated")
    assert 0.0 <= metrics["rel"] <= 100.0
    from safetensors.torch import load_file, save_file
    tensors = load_file(copy / "exist_head.safetensors")
    tensors["0.bias"] = tensors["0.bias"] + 1.0
    save_file(tensors, copy / "exist_head.safetensors")
    with pytest.raises(ArtifactError, match="existence head"):
        train(tiny_cfg("stage=bridge", f"memory={copy}", "model.bridge.projector.gated=true"), tmp_path / "tampered")


def _memory_copy_watching_the_bridge(default_run, tmp_path, monkeypatch, before=None, after=None):
    """A copy of the default run's memory, and `Trainer.fit` patched to call `before(module)` and
    `after(module)` around the bridge's fit (to look at what the module trained with)."""
    import shutil

    import lightning as L
    run, _ = default_run
    copy = tmp_path / "memory"
    shutil.copytree(run / "memory", copy)
    original = L.Trainer.fit

    def fit(trainer, module, *args, **kwargs):
        if before:
            before(module)
        result = original(trainer, module, *args, **kwargs)
        if after:
            after(module)
        return result
    monkeypatch.setattr(L.Trainer, "fit", fit)
    return copy


def test_bridge_with_a_bf16_lm_head_and_prefix_augmentation(default_run, tiny_cfg, tmp_path, monkeypatch):
    seen = {}
    copy = _memory_copy_watching_the_bridge(
        default_run, tmp_path, monkeypatch,
        before=lambda module: seen.update(copies=len(module._edit_texts) // len(module._prefix_probs)),
        after=lambda module: seen.update(head=module._head_weight.dtype))
    # "auto" on a CPU that reports native bfloat16 (patched, so the test runs on any CPU).
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    metrics = train(tiny_cfg("stage=bridge", f"memory={copy}", "model.bridge.lm_head_dtype=auto",
                             "model.bridge.prefix_prob=0.5", "model.bridge.prefix_datasets=[zsre]",
                             "model.bridge.prefix_variants=2", "model.bridge.rewordings=0"), tmp_path / "bf16")
    assert seen == {"head": torch.bfloat16, "copies": 3}
    assert 0.0 <= metrics["rel"] <= 100.0 and metrics["bridge_loss"] == metrics["bridge_loss"]   # finite, not NaN
    bridge = json.loads((copy / "bridges" / "tiny_llama" / "bridge.json").read_text())
    assert bridge["hyperparameters"]["lm_head_dtype"] == "auto" and bridge["student_head_dtype"] == "bfloat16"


def test_bridge_over_a_training_vocabulary(default_run, tiny_cfg, tmp_path, monkeypatch):
    seen = {}
    copy = _memory_copy_watching_the_bridge(
        default_run, tmp_path, monkeypatch,
        after=lambda module: seen.update(head_rows=module._head_weight.shape[0],
                                         vocab=module.edited.llm.config.vocab_size))
    metrics = train(tiny_cfg("stage=bridge", f"memory={copy}", "model.bridge.train_vocab_top_k=4",
                             "model.bridge.kl_answer_tokens=2"), tmp_path / "vocab")
    bridge = json.loads((copy / "bridges" / "tiny_llama" / "bridge.json").read_text())
    assert seen["head_rows"] == bridge["student_vocabulary"] == metrics["bridge_vocabulary"] < seen["vocab"]
    assert 0.0 <= metrics["rel"] <= 100.0 and metrics["bridge_loss"] == metrics["bridge_loss"]   # finite, not NaN
