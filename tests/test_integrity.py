"""Integrity: every artifact records hashes of what it depends on and is refused, with one
sentence saying what differs, when a file is truncated or tampered with or when it is loaded with
another LLM or other facts. Only safetensors and JSON are ever read from an artifact.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from mindbridge.artifacts import (ArtifactError, load_bridge, load_exist_head, load_gate, load_memory, read_facts,
                                  read_manifest, save_memory)
from train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny pretrain -> bridge -> eval run; tests work on copies of its memory."""
    from tests.conftest import compose
    run = tmp_path_factory.mktemp("built")
    cfg = compose(["debug=fast", "callbacks.progress=null", f"run_dir={run}"])
    return run, train(cfg, run)


@pytest.fixture()
def memory(built, tmp_path) -> Path:
    copy = tmp_path / "memory"
    shutil.copytree(built[0] / "memory", copy)
    return copy


def identity(memory: Path) -> dict:
    return json.loads((memory / "bridges" / "tiny_llama" / "bridge.json").read_text())["llm"]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def one_sentence(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.endswith((".", ")")) and "Traceback" not in msg
    return msg


# --------------------------------------------------------------------------- truncated files


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.5, 0.999])
def test_a_truncated_encoder_is_refused(memory, keep):
    truncate(memory / "encoder" / "model.safetensors", keep)
    with pytest.raises(ArtifactError) as exc:
        load_memory(memory)
    msg = one_sentence(exc)
    assert "model.safetensors" in msg and ("truncated or corrupt" in msg or "do not match the hash" in msg)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_a_truncated_projector_is_refused(memory, keep):
    truncate(memory / "bridges" / "tiny_llama" / "projector" / "model.safetensors", keep)
    with pytest.raises(ArtifactError) as exc:
        load_bridge(memory, "tiny_llama", identity(memory))
    assert "projector" in one_sentence(exc).lower()


def test_a_truncated_existence_head_is_refused(memory):
    truncate(memory / "exist_head.safetensors", 0.6)
    with pytest.raises(ArtifactError, match="truncated or corrupt") as exc:
        load_exist_head(memory, read_manifest(memory))
    one_sentence(exc)


def test_a_truncated_manifest_is_refused(memory):
    truncate(memory / "manifest.json", 0.5)
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(memory)


# --------------------------------------------------------------------------- tampered content


def _tamper_tensor(path: Path) -> None:
    """Change one number of one tensor, keeping the file a valid safetensors file of the same shapes."""
    tensors = load_file(str(path))
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 0.5
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_a_tampered_encoder_tensor_is_refused(memory):
    _tamper_tensor(memory / "encoder" / "model.safetensors")
    with pytest.raises(ArtifactError, match="do not match the hash in its manifest"):
        load_memory(memory)


def test_a_tampered_projector_tensor_is_refused(memory):
    _tamper_tensor(memory / "bridges" / "tiny_llama" / "projector" / "model.safetensors")
    with pytest.raises(ArtifactError, match="do not match the hash in bridge.json"):
        load_bridge(memory, "tiny_llama", identity(memory))


@pytest.mark.parametrize(("key", "value"), [("pooling", "mean"), ("max_length", 7), ("num_facts", 3),
                                            ("encoder_sha256", "0" * 64)])
def test_a_tampered_memory_manifest_is_refused(memory, key, value):
    path = memory / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest[key] != value
    manifest[key] = value
    path.write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ArtifactError, match="was edited after it was written") as exc:
        load_memory(memory)
    assert "manifest.json" in one_sentence(exc)


@pytest.mark.parametrize(("key", "value"), [("threshold", -1.0), ("false_open_rate", 0.5), ("score", "exist_head")])
def test_the_gate_settings_are_covered_by_the_manifest_hash(memory, key, value):
    path = memory / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["gate"][key] != value
    manifest["gate"][key] = value
    path.write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ArtifactError, match="was edited after it was written") as exc:
        load_gate(memory, read_manifest(memory))
    one_sentence(exc)


def test_tampered_or_truncated_gate_keys_are_refused(memory):
    _tamper_tensor(memory / "gate_keys.safetensors")
    with pytest.raises(ArtifactError, match="gate keys .* do not match the hash") as exc:
        load_gate(memory, read_manifest(memory))
    one_sentence(exc)
    truncate(memory / "gate_keys.safetensors", 0.5)
    with pytest.raises(ArtifactError, match="truncated or corrupt") as exc:
        load_gate(memory, read_manifest(memory))
    one_sentence(exc)


def test_the_gate_round_trips(memory):
    manifest = read_manifest(memory)
    gate = load_gate(memory, manifest)
    assert len(gate.keys) == manifest["num_facts"] and gate.threshold == manifest["gate"]["threshold"]


def test_a_tampered_bridge_manifest_is_refused(memory):
    path = memory / "bridges" / "tiny_llama" / "bridge.json"
    meta = json.loads(path.read_text())
    meta["llm"]["name"] = "someone_else"
    path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="bridge.json was edited"):
        load_bridge(memory, "tiny_llama", identity(memory))


def test_tampered_facts_are_refused(memory):
    path = memory / "facts.jsonl"
    first = json.loads(path.read_text().split("\n")[0])
    path.write_text(path.read_text().replace(json.dumps(first["target_new"]), json.dumps("Somewhere else"), 1))
    with pytest.raises(ArtifactError, match="facts.*do not match the hash") as exc:
        read_facts(memory)
    one_sentence(exc)


def test_facts_with_unicode_line_separators_round_trip(memory, tmp_path):
    """facts.jsonl is written with the text as it is: U+2028 / U+0085 must not split a line."""
    from data.records import EditRecord, content_hash
    encoder, _ = load_memory(memory)
    facts = [EditRecord("0", "zsre", "A\u2028B", "Where is A\u2028B\x85?", "C\u2029D", None, (), (), ())]
    out = save_memory(tmp_path / "odd", encoder, facts, content_hash(facts), {})
    assert read_facts(out) == [dict(facts[0].__dict__, rephrase_prompts=[], loc_prompts=[], loc_answers=[],
                                    attribute_prompts=[], generation_prompts=[])]


# --------------------------------------------------------------------------- what an artifact depends on


def test_a_bridge_is_refused_for_another_llm(memory, tiny_cfg, tmp_path):
    shutil.copytree(memory / "bridges" / "tiny_llama", memory / "bridges" / "tiny_gpt2")
    with pytest.raises(ArtifactError, match="trained for LLM 'tiny_llama' .* but the loaded LLM 'tiny_gpt2'") as exc:
        train(tiny_cfg("stage=eval", "llm=tiny_gpt2", f"memory={memory}"), tmp_path / "eval")
    one_sentence(exc)


def test_a_bridge_is_refused_for_the_same_architecture_with_other_weights(memory, tiny_cfg, tmp_path):
    with pytest.raises(ArtifactError, match="weights") as exc:
        train(tiny_cfg("stage=eval", "seed=3", f"memory={memory}"), tmp_path / "eval")   # another random LLM
    one_sentence(exc)


def test_a_memory_is_refused_for_other_facts(memory, tiny_cfg, tmp_path):
    with pytest.raises(ArtifactError, match="differ from the .* edits selected by data=zsre data.seed=7") as exc:
        train(tiny_cfg("stage=eval", "data.seed=7", f"memory={memory}"), tmp_path / "eval")
    one_sentence(exc)


def test_a_bridge_is_refused_for_another_encoder(memory, built, tiny_cfg, tmp_path):
    """Pretraining again (another seed) replaces the encoder; the old bridge must not come back."""
    other = tmp_path / "other"
    train(tiny_cfg("stage=pretrain", "model.pretrain.joint_epochs=2", f"memory={other}"), tmp_path / "pre")
    shutil.copytree(memory / "bridges" / "tiny_llama", other / "bridges" / "tiny_llama")
    with pytest.raises(ArtifactError, match="trained against encoder .* but this memory's encoder is"):
        load_bridge(other, "tiny_llama", identity(memory))


def test_a_tampered_artifact_through_the_cli_is_one_sentence(memory, tmp_path):
    from tests.test_cli import assert_one_sentence_error, run_cli
    truncate(memory / "bridges" / "tiny_llama" / "projector" / "model.safetensors", 0.3)
    proc = run_cli("debug=fast", "stage=eval", f"memory={memory}", tmp_path=tmp_path)
    assert_one_sentence_error(proc, "truncated or corrupt")
    assert proc.returncode == 2


def test_neuraldb_truncated_or_tampered_is_refused(tmp_path):
    from mindbridge.facts import Fact
    from mindbridge.neuraldb import EditHParams, NeuralDB
    from tests.test_neuraldb import _model
    model, tok = _model("tiny_llama")
    db = NeuralDB(model, tok, 0, llm_name="tiny_llama", hparams=EditHParams(steps=2, num_prefixes=1, batch_size=2))
    try:
        db.add([Fact("a", "Eiffel Tower", "The Eiffel Tower is located in", "Rome")])
        db.save(tmp_path / "db")
    finally:
        db.remove()
    good = tmp_path / "good"
    shutil.copytree(tmp_path / "db", good)
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    manifest["gamma"] = 0.0                                        # would make the gate fire everywhere
    (tmp_path / "db" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="was edited after it was written"):
        NeuralDB.load(tmp_path / "db", model, tok, llm_name="tiny_llama")
    truncate(good / "database.safetensors", 0.5)
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        NeuralDB.load(good, model, tok, llm_name="tiny_llama")


# --------------------------------------------------------------------------- no pickle


def test_no_code_unpickles_anything():
    """Artifacts are read with safetensors / JSON / from_pretrained(use_safetensors=True) only, and the
    one place checkpoints are loaded (Lightning's resume) is told weights_only=True."""
    pattern = re.compile(r"\bpickle\b|torch\.load\(|weights_only\s*=\s*False|use_safetensors\s*=\s*False")
    offenders = []
    for folder in ("mindbridge", "lit_modules", "data"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line) and not line.lstrip().startswith("#"):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders
    stages = (ROOT / "lit_modules" / "stages.py").read_text()
    fits = re.findall(r"trainer\.fit\((.*?)\)\n", stages, flags=re.S)
    assert fits and all("weights_only=True" in f for f in fits if "ckpt_path" in f)


def test_every_artifact_file_is_safetensors_or_text(built):
    run, _ = built
    for path in (run / "memory").rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert head != b"\x80\x04" and head[:1] != b"\x80", path           # no pickle stream
            assert path.suffix in {".safetensors", ".json", ".jsonl", ".txt", ".model", ""} or path.name.endswith(
                "tokenizer.json"), path
