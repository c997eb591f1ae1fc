"""Faults: a training run killed with SIGKILL resumes from its last checkpoint (`ckpt_path=last`)
and ends exactly where an uninterrupted run ends; a killed write never leaves an artifact that loads.

The runs are real `python train.py` subprocesses on tiny random models. A checkpoint is written
after every optimizer step here (`callbacks.step_checkpoint.every_n_train_steps=1`), so the kill
lands mid-epoch with a mid-epoch checkpoint behind it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mindbridge.artifacts import ArtifactError, load_bridge, load_memory, read_manifest

ROOT = Path(__file__).resolve().parents[1]

# 16 edits in batches of 4: 4 optimizer steps per epoch; pretrain 3 epochs, bridge 4 epochs.
ARGS = ("debug=fast", "threads=1", "callbacks.progress=null", "data.num_edits=16", "model.bridge.epochs=4",
        "model.pretrain.joint_epochs=3", "callbacks.step_checkpoint.every_n_train_steps=1")
STEPS_PER_EPOCH = 4
QUALITY = ("rel", "gen", "loc", "avg", "pre_rel", "pre_gen", "rel_em", "gen_em", "loc_em")


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _command(run: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run}", *ARGS, *extra]


def _run(run: Path, *extra: str) -> dict:
    proc = subprocess.run(_command(run, *extra), cwd=run.parent, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run / "metrics.json").read_text())


def _global_step(ckpt: Path) -> int | None:
    """The step of a checkpoint, or None while there is none (Lightning writes it atomically)."""
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return None


def _kill_mid_epoch(run: Path, stage: str, after_step: int, *extra: str) -> int:
    """Start a run and SIGKILL it once `stage` has checkpointed a step past `after_step` that is not
    the end of an epoch. Returns the step of the checkpoint the kill left behind."""
    ckpt = run / "checkpoints" / stage / "last.ckpt"
    proc = subprocess.Popen(_command(run, *extra), cwd=run.parent, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            step = _global_step(ckpt) if ckpt.is_file() else None
            if step is not None and step > after_step and step % STEPS_PER_EPOCH:
                proc.send_signal(signal.SIGKILL)
                break
            assert proc.poll() is None, "the run finished before it could be killed"
            time.sleep(0.05)
        else:
            raise AssertionError(f"no mid-epoch checkpoint of {stage} appeared")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return _global_step(ckpt)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    return run, _run(run)


def test_killed_mid_epoch_twice_resumes_to_the_same_result(uninterrupted, tmp_path):
    """Kill during memory pretraining, resume; kill again during bridging, resume again: the memory
    and the bridge are bit-identical to an uninterrupted run's and so are the scores."""
    ref_run, ref = uninterrupted
    run = tmp_path / "run"
    step = _kill_mid_epoch(run, "pretrain", after_step=STEPS_PER_EPOCH)      # in the second epoch or later
    assert step % STEPS_PER_EPOCH and not (run / "memory").exists()
    # The resumed process is itself killed, now in the bridge stage.
    proc_step = _kill_mid_epoch(run, "bridge-tiny_llama", STEPS_PER_EPOCH, "ckpt_path=last")
    assert proc_step % STEPS_PER_EPOCH
    assert (run / "memory" / "manifest.json").is_file() and not (run / "metrics.json").exists()
    resumed = _run(run, "ckpt_path=last")

    for key in QUALITY:
        assert resumed[key] == pytest.approx(ref[key], abs=1e-9), key
    # Same trained weights, bit for bit: the same hashes in the artifacts.
    mine, theirs = read_manifest(run / "memory"), read_manifest(ref_run / "memory")
    assert mine["encoder_sha256"] == theirs["encoder_sha256"]
    assert mine["exist_head_sha256"] == theirs["exist_head_sha256"]
    bridge = json.loads((run / "memory" / "bridges" / "tiny_llama" / "bridge.json").read_text())
    ref_bridge = json.loads((ref_run / "memory" / "bridges" / "tiny_llama" / "bridge.json").read_text())
    assert bridge["projector_sha256"] == ref_bridge["projector_sha256"]


def test_resume_without_a_checkpoint_starts_fresh_and_a_missing_path_is_one_sentence(tmp_path):
    from tests.test_cli import assert_one_sentence_error
    run = tmp_path / "run"
    proc = subprocess.run(_command(run, "stage=pretrain", f"ckpt_path={tmp_path / 'nope.ckpt'}"), cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert_one_sentence_error(proc, "nope.ckpt")


def test_resume_refuses_a_checkpoint_of_other_facts(tiny_cfg, tmp_path):
    from train import train
    run = tmp_path / "run"
    train(tiny_cfg("stage=pretrain", run_dir=run), run)
    with pytest.raises(ArtifactError, match="other facts"):
        train(tiny_cfg("stage=pretrain", "data.seed=5", "ckpt_path=last", "model.pretrain.joint_epochs=2",
                       run_dir=run), run)


def test_checkpoints_load_with_weights_only(uninterrupted):
    """Resuming never unpickles arbitrary objects: the checkpoints hold tensors and plain data."""
    run, _ = uninterrupted
    for stage in ("pretrain", "bridge-tiny_llama"):
        ckpt = torch.load(run / "checkpoints" / stage / "last.ckpt", map_location="cpu", weights_only=True)
        assert "rng_states" in ckpt and ckpt["state_dict"]


def test_a_write_killed_midway_leaves_no_loadable_artifact(uninterrupted, tmp_path):
    """SIGKILL a process inside `save_memory` (after the encoder is written, before the manifest):
    the memory directory does not exist and the old one, if any, is still whole."""
    run, _ = uninterrupted
    target = tmp_path / "memory"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from mindbridge import artifacts
from mindbridge.artifacts import load_memory, save_memory, read_facts
from data.records import record_from_dict, content_hash
encoder, manifest = load_memory({str(run / 'memory')!r})
facts = [record_from_dict(f) for f in read_facts({str(run / 'memory')!r})]
def die(*a, **k):   # the manifest is the last file written: die just before it
    os.kill(os.getpid(), signal.SIGKILL)
artifacts.sealed = die
save_memory({str(target)!r}, encoder, facts, content_hash(facts), {{}})
"""
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not target.exists()
    leftovers = list(tmp_path.glob(".memory.tmp-*"))
    assert leftovers and (leftovers[0] / "encoder" / "model.safetensors").is_file()   # it was killed mid-write
    with pytest.raises(ArtifactError, match="No memory"):
        load_memory(target)
    # A half-written sibling is never picked up in place of the memory either.
    with pytest.raises(ArtifactError):
        load_memory(leftovers[0])


def test_a_killed_overwrite_keeps_the_previous_memory(uninterrupted, tmp_path):
    run, _ = uninterrupted
    import shutil
    target = tmp_path / "memory"
    shutil.copytree(run / "memory", target)
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from mindbridge import artifacts
from mindbridge.artifacts import load_memory, save_memory, read_facts
from data.records import record_from_dict, content_hash
encoder, manifest = load_memory({str(target)!r})
facts = [record_from_dict(f) for f in read_facts({str(target)!r})][:3]
artifacts.sealed = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
save_memory({str(target)!r}, encoder, facts, content_hash(facts), {{}})
"""
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    encoder, manifest = load_memory(target)
    assert manifest["num_facts"] == 16
    identity = json.loads((target / "bridges" / "tiny_llama" / "bridge.json").read_text())["llm"]
    load_bridge(target, "tiny_llama", identity, manifest)
