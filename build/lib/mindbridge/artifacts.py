"""Memory and bridge artifacts: plain directories of safetensors + JSON, checked at load.

    memory/
      encoder/            E_m (`save_pretrained`, safetensors) and its tokenizer
      facts.jsonl         the exact facts the memory holds
      manifest.json       hashes of the encoder weights and of the facts, pooling, provenance
      bridges/<llm>/      projector/ (safetensors) + bridge.json (LLM identity, encoder hash)

Every directory is written under a temporary name and renamed when complete, so a killed run
never leaves a half-written artifact that later loads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mindbridge.atomic import write_dir_atomically
from mindbridge.bridge import MemoryProjector, attach_lora, lora_state
from mindbridge.encoder import MemoryEncoder
from mindbridge.gate import GATE_SCORE, MemoryGate
from mindbridge.loading import tensors_fingerprint, weights_fingerprint

FORMAT_VERSION = 1


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or does not match what it is loaded with."""


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{what} is incomplete: {path} is missing.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{what} is corrupt: {path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}).") from None


SEAL_KEY = "manifest_sha256"


def sealed(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` plus a sha256 of its own canonical JSON, so an edited manifest is noticed."""
    return {**meta, SEAL_KEY: _json_sha256(meta)}


def _json_sha256(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != SEAL_KEY}
    body = json.loads(json.dumps(body, default=str))       # hash what the file holds (str keys, lists)
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def check_seal(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    # Artifacts written before the seal existed have none; they are checked by their other hashes.
    if SEAL_KEY in meta and meta[SEAL_KEY] != _json_sha256(meta):
        raise ArtifactError(f"{path} was edited after it was written (its content no longer matches its "
                            f"{SEAL_KEY}); restore it or write the artifact again.")
    return meta


def open_llm_artifact(directory: str | Path, kind: str, what: str, identity: dict[str, Any], redo: str) -> dict:
    """The manifest of an artifact built inside one LLM (a NeuralDB, WISE side memories), refused in
    one sentence when it is missing, not JSON, edited, of another kind or built for another LLM
    (`redo`: how to build one for this LLM)."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"No {what} at {directory}: manifest.json is missing.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"The {what} at {directory} is corrupt: manifest.json is not valid JSON.") from None
    check_seal(manifest, path)
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{directory} is not a {what} (manifest kind {manifest.get('kind')!r}).")
    built = manifest.get("llm") or {}
    for key in ("config_hash", "weights"):
        if built.get(key) != identity.get(key):
            raise ArtifactError(f"The {what} at {directory} was built for LLM '{built.get('name')}' "
                                f"({key} {str(built.get(key))[:12]}) but the loaded LLM '{identity.get('name')}' "
                                f"has {key} {str(identity.get(key))[:12]}; {redo}.")
    return manifest


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_or_refuse(what: str, path: Path, load):
    """`load()` with a corrupt or truncated file reported as one sentence instead of a library trace."""
    try:
        return load()
    except ArtifactError:
        raise
    except Exception as exc:  # safetensors, transformers and peft each raise their own types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{what} cannot be read from {path}; the file is truncated or corrupt ({first}).") from None


def _write_on_rank_zero(final: Path, write) -> Path:
    """`write_dir_atomically` by one process: under torch.distributed only rank 0 writes and every
    rank waits until the artifact is complete before it goes on (to load it, say)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return write_dir_atomically(final, write)
    if dist.get_rank() == 0:
        write_dir_atomically(final, write)
    dist.barrier()
    return Path(final)


EXIST_HEAD_FILE = "exist_head.safetensors"
GATE_KEYS_FILE = "gate_keys.safetensors"


def save_memory(directory: str | Path, encoder: MemoryEncoder, facts: Sequence, facts_hash: str,
                info: dict[str, Any], exist_head: dict[str, torch.Tensor] | None = None,
                gate: MemoryGate | None = None, gate_info: dict[str, Any] | None = None) -> Path:
    """Save E_m, its facts and a manifest. `facts` are `EditRecord`s (dataclasses).

    `exist_head` (the state dict of Stage I's existence head H) is kept beside the encoder:
    a gated projector can start its gate from it. `gate` (the memory read gate: one key per
    fact and a calibrated threshold) is saved with its settings in the manifest, under its hash.
    """
    def write(tmp: Path) -> None:
        encoder.mlm.save_pretrained(tmp / "encoder", safe_serialization=True)
        encoder.tokenizer.save_pretrained(tmp / "encoder")
        if exist_head is not None:
            save_file({k: v.detach().contiguous() for k, v in exist_head.items()}, str(tmp / EXIST_HEAD_FILE))
        gate_meta = None
        if gate is not None:
            keys = {"keys": gate.keys.detach().cpu().contiguous()}
            save_file(keys, str(tmp / GATE_KEYS_FILE))
            gate_meta = {"score": GATE_SCORE, "threshold": gate.threshold, "keys_sha256": tensors_fingerprint(keys),
                         **(gate_info or {})}
        with open(tmp / "facts.jsonl", "w", encoding="utf-8") as fh:
            for rec in facts:
                fh.write(json.dumps(dataclasses.asdict(rec), ensure_ascii=False) + "\n")
        manifest = {"format_version": FORMAT_VERSION, "kind": "mindbridge_memory",
                    "encoder_sha256": weights_fingerprint(encoder.mlm), "facts_sha256": facts_hash,
                    "facts_file_sha256": _file_sha256(tmp / "facts.jsonl"),
                    "num_facts": len(facts), "pooling": encoder.pooling, "max_length": encoder.max_length,
                    "exist_head_sha256": tensors_fingerprint(exist_head) if exist_head is not None else None,
                    "gate": gate_meta,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        (tmp / "manifest.json").write_text(json.dumps(sealed(manifest), indent=2), encoding="utf-8")
        (tmp / "bridges").mkdir()
    # The directory is replaced whole: bridges trained against an earlier encoder go with it.
    directory = Path(directory)
    return _write_on_rank_zero(directory, write)


def directory_digest(directory: str | Path) -> str:
    """sha256 over every file's relative path and bytes: equal digests mean byte-identical trees."""
    directory = Path(directory)
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(directory)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"No memory at {directory}: run `python train.py stage=pretrain` first or pass memory=DIR.")
    return check_seal(_read_json(directory / "manifest.json", f"The memory at {directory}"), directory / "manifest.json")


def load_memory(directory: str | Path, verify: bool = True) -> tuple[MemoryEncoder, dict[str, Any]]:
    """Load E_m; with `verify`, refuse weights whose hash differs from the manifest's."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    directory = Path(directory)
    manifest = read_manifest(directory)
    enc_dir = directory / "encoder"
    if not (enc_dir / "model.safetensors").is_file():
        raise ArtifactError(f"The memory at {directory} has no encoder/model.safetensors; it is incomplete.")
    mlm = read_or_refuse("The memory's encoder", enc_dir / "model.safetensors",
                    lambda: AutoModelForMaskedLM.from_pretrained(enc_dir, use_safetensors=True))
    tokenizer = read_or_refuse("The memory's tokenizer", enc_dir, lambda: AutoTokenizer.from_pretrained(enc_dir))
    mlm.requires_grad_(False).eval()
    if verify and weights_fingerprint(mlm) != manifest["encoder_sha256"]:
        raise ArtifactError(f"The encoder weights in {enc_dir} do not match the hash in its manifest; "
                            "the memory was modified or truncated after it was written.")
    return MemoryEncoder(mlm, tokenizer, manifest["pooling"], manifest["max_length"]), manifest


def load_exist_head(directory: str | Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Stage I's existence head H saved with a memory, checked against the manifest's hash."""
    path = Path(directory) / EXIST_HEAD_FILE
    if not manifest.get("exist_head_sha256"):
        raise ArtifactError(f"The memory at {directory} was saved without its existence head; pretrain it again "
                            "or set model.bridge.projector.gate_init=random.")
    if not path.is_file():
        raise ArtifactError(f"The memory at {directory} is incomplete: {path} is missing.")
    state = read_or_refuse("The existence head", path, lambda: load_file(str(path)))
    if tensors_fingerprint(state) != manifest["exist_head_sha256"]:
        raise ArtifactError(f"The existence head in {path} does not match the hash in the memory's manifest; "
                            "the memory was modified.")
    return state


def load_gate(directory: str | Path, manifest: dict[str, Any]) -> MemoryGate:
    """The memory's read gate (keys and calibrated threshold), checked against the manifest."""
    meta = manifest.get("gate")
    path = Path(directory) / GATE_KEYS_FILE
    if not meta:
        raise ArtifactError(f"The memory at {directory} has no read gate (it was pretrained before the gate "
                            "existed); pretrain it again, or read it ungated with model.gate.enabled=false.")
    if meta.get("score") != GATE_SCORE:
        raise ArtifactError(f"The memory at {directory} has a gate scored by {meta.get('score')!r}, which this "
                            f"version does not know (it knows {GATE_SCORE!r}).")
    if not path.is_file():
        raise ArtifactError(f"The memory at {directory} is incomplete: {path} is missing.")
    keys = read_or_refuse("The gate's keys", path, lambda: load_file(str(path)))
    if tensors_fingerprint(keys) != meta["keys_sha256"]:
        raise ArtifactError(f"The gate keys in {path} do not match the hash in the memory's manifest; "
                            "the memory was modified.")
    if len(keys.get("keys", ())) != manifest["num_facts"]:
        raise ArtifactError(f"The gate at {path} has {len(keys.get('keys', ()))} keys for {manifest['num_facts']} facts.")
    return MemoryGate(keys["keys"], meta["threshold"])


def read_facts(directory: str | Path) -> list[dict[str, Any]]:
    """The facts a memory holds, as the dicts written by `save_memory` (one per line)."""
    path = Path(directory) / "facts.jsonl"
    if not path.is_file():
        raise ArtifactError(f"The memory at {directory} is incomplete: {path} is missing.")
    expected = read_manifest(directory).get("facts_file_sha256")
    if expected and _file_sha256(path) != expected:
        raise ArtifactError(f"The facts in {path} do not match the hash in the memory's manifest; "
                            "the memory was modified after it was written.")
    facts = []
    # split("\n"), not splitlines(): facts may contain U+2028 and friends, written as they are.
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            facts.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"The memory at {directory} is corrupt: facts.jsonl line {n} is not JSON ({exc.msg}).") from None
    return facts


def bridge_name(llm_name: str, manifests: Sequence[dict[str, Any]]) -> str:
    """Where a memory keeps its bridge: `<llm>` alone, or, for projectors trained jointly with
    other memories (Multi-MindBridge), a name that identifies the ordered group of encoders."""
    if len(manifests) == 1:
        return llm_name
    group = hashlib.sha256("|".join(m["encoder_sha256"] for m in manifests).encode()).hexdigest()[:10]
    return f"{llm_name}+multi{len(manifests)}-{group}"


def bridge_dir(memory_dir: str | Path, llm_name: str) -> Path:
    return Path(memory_dir) / "bridges" / llm_name


def save_bridge(memory_dir: str | Path, llm_name: str, projector: MemoryProjector,
                llm_identity: dict[str, Any], info: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write `bridges/<llm_name>/` next to the memory's encoder (never touching the encoder)."""
    manifest = read_manifest(memory_dir)

    def write(tmp: Path) -> None:
        projector.save_pretrained(tmp / "projector", safe_serialization=True)
        meta = {"format_version": FORMAT_VERSION, "kind": "mindbridge_bridge", "llm": llm_identity,
                "encoder_sha256": manifest["encoder_sha256"], "facts_sha256": manifest["facts_sha256"],
                "projector_sha256": weights_fingerprint(projector),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        (tmp / "bridge.json").write_text(json.dumps(sealed(meta), indent=2), encoding="utf-8")
        for name, write_extra in (extra or {}).items():
            write_extra(tmp / name)
    return _write_on_rank_zero(bridge_dir(memory_dir, llm_name), write)


def load_bridge(memory_dir: str | Path, llm_name: str, llm_identity: dict[str, Any],
                manifest: dict[str, Any] | None = None) -> tuple[MemoryProjector, dict[str, Any]]:
    """Load a projector, refusing it if it was trained for another encoder or another LLM."""
    manifest = manifest or read_manifest(memory_dir)
    where = bridge_dir(memory_dir, llm_name)
    if not where.is_dir():
        have = sorted(p.name for p in (Path(memory_dir) / "bridges").glob("*") if not p.name.startswith("."))
        base, _, group = llm_name.partition("+multi")
        how = (f"bridge all the memories together with `python train.py stage=bridge llm={base} memory=[DIR1,DIR2,...]`"
               if group else f"run `python train.py stage=bridge llm={llm_name} memory={memory_dir}`")
        raise ArtifactError(f"The memory at {memory_dir} has no bridge '{llm_name}' "
                            f"(it has: {', '.join(have) or 'none'}); {how}.")
    meta = check_seal(_read_json(where / "bridge.json", f"The bridge at {where}"), where / "bridge.json")
    if meta["encoder_sha256"] != manifest["encoder_sha256"]:
        raise ArtifactError(f"The bridge at {where} was trained against encoder {meta['encoder_sha256'][:12]} "
                            f"but this memory's encoder is {manifest['encoder_sha256'][:12]}; bridge the memory again.")
    for key in ("config_hash", "weights"):
        if meta["llm"].get(key) != llm_identity.get(key):
            raise ArtifactError(f"The bridge at {where} was trained for LLM '{meta['llm'].get('name')}' "
                                f"({key} {str(meta['llm'].get(key))[:12]}) but the loaded LLM '{llm_identity.get('name')}' "
                                f"has {key} {str(llm_identity.get(key))[:12]}; bridge this LLM with stage=bridge.")
    if not (where / "projector" / "model.safetensors").is_file():
        raise ArtifactError(f"The bridge at {where} is incomplete: projector/model.safetensors is missing.")
    projector = read_or_refuse("The projector", where / "projector" / "model.safetensors",
                          lambda: MemoryProjector.from_pretrained(where / "projector", use_safetensors=True))
    if weights_fingerprint(projector) != meta["projector_sha256"]:
        raise ArtifactError(f"The projector weights in {where} do not match the hash in bridge.json; the bridge was modified.")
    projector.requires_grad_(False).eval()
    return projector, meta


def load_bridge_adapters(memory_dir: str | Path, name: str, llm, meta: dict[str, Any]):
    """`llm` with the bridge's LoRA adapters attached, or `llm` itself if the bridge has none.

    The adapters are checked against the hash recorded when the bridge was written.
    """
    where = bridge_dir(memory_dir, name) / "lora"
    if "lora_sha256" not in meta:
        return llm
    if not (where / "adapter_model.safetensors").is_file():
        raise ArtifactError(f"The bridge at {where.parent} was trained with LoRA adapters but {where} is missing or incomplete.")
    adapted = read_or_refuse("The bridge's LoRA adapters", where, lambda: attach_lora(llm, where))
    if tensors_fingerprint(lora_state(adapted)) != meta["lora_sha256"]:
        adapted.unload()
        raise ArtifactError(f"The LoRA adapters in {where} do not match the hash in bridge.json; the bridge was modified.")
    return adapted
