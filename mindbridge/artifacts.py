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
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mindbridge.atomic import write_dir_atomically
from mindbridge.bridge import MemoryProjector
from mindbridge.encoder import MemoryEncoder
from mindbridge.loading import weights_fingerprint

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


def save_memory(directory: str | Path, encoder: MemoryEncoder, facts: Sequence, facts_hash: str,
                info: dict[str, Any]) -> Path:
    """Save E_m, its facts and a manifest. `facts` are `EditRecord`s (dataclasses)."""
    def write(tmp: Path) -> None:
        encoder.mlm.save_pretrained(tmp / "encoder", safe_serialization=True)
        encoder.tokenizer.save_pretrained(tmp / "encoder")
        with open(tmp / "facts.jsonl", "w", encoding="utf-8") as fh:
            for rec in facts:
                fh.write(json.dumps(dataclasses.asdict(rec), ensure_ascii=False) + "\n")
        manifest = {"format_version": FORMAT_VERSION, "kind": "mindbridge_memory",
                    "encoder_sha256": weights_fingerprint(encoder.mlm), "facts_sha256": facts_hash,
                    "num_facts": len(facts), "pooling": encoder.pooling, "max_length": encoder.max_length,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        (tmp / "bridges").mkdir()
    # The directory is replaced whole: bridges trained against an earlier encoder go with it.
    directory = Path(directory)
    return write_dir_atomically(directory, write)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"No memory at {directory}: run `python train.py stage=pretrain` first or pass memory=DIR.")
    return _read_json(directory / "manifest.json", f"The memory at {directory}")


def load_memory(directory: str | Path, verify: bool = True) -> tuple[MemoryEncoder, dict[str, Any]]:
    """Load E_m; with `verify`, refuse weights whose hash differs from the manifest's."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    directory = Path(directory)
    manifest = read_manifest(directory)
    enc_dir = directory / "encoder"
    if not (enc_dir / "model.safetensors").is_file():
        raise ArtifactError(f"The memory at {directory} has no encoder/model.safetensors; it is incomplete.")
    mlm = AutoModelForMaskedLM.from_pretrained(enc_dir, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(enc_dir)
    mlm.requires_grad_(False).eval()
    if verify and weights_fingerprint(mlm) != manifest["encoder_sha256"]:
        raise ArtifactError(f"The encoder weights in {enc_dir} do not match the hash in its manifest; "
                            "the memory was modified or truncated after it was written.")
    return MemoryEncoder(mlm, tokenizer, manifest["pooling"], manifest["max_length"]), manifest


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
        (tmp / "bridge.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        for name, write_extra in (extra or {}).items():
            write_extra(tmp / name)
    return write_dir_atomically(bridge_dir(memory_dir, llm_name), write)


def load_bridge(memory_dir: str | Path, llm_name: str, llm_identity: dict[str, Any],
                manifest: dict[str, Any] | None = None) -> tuple[MemoryProjector, dict[str, Any]]:
    """Load a projector, refusing it if it was trained for another encoder or another LLM."""
    manifest = manifest or read_manifest(memory_dir)
    where = bridge_dir(memory_dir, llm_name)
    if not where.is_dir():
        have = sorted(p.name for p in (Path(memory_dir) / "bridges").glob("*") if not p.name.startswith("."))
        raise ArtifactError(f"The memory at {memory_dir} has no bridge for LLM '{llm_name}' "
                            f"(it has: {', '.join(have) or 'none'}); run `python train.py stage=bridge llm={llm_name} memory={memory_dir}`.")
    meta = _read_json(where / "bridge.json", f"The bridge at {where}")
    if meta["encoder_sha256"] != manifest["encoder_sha256"]:
        raise ArtifactError(f"The bridge at {where} was trained against encoder {meta['encoder_sha256'][:12]} "
                            f"but this memory's encoder is {manifest['encoder_sha256'][:12]}; bridge the memory again.")
    for key in ("config_hash", "weights"):
        if meta["llm"].get(key) != llm_identity.get(key):
            raise ArtifactError(f"The bridge at {where} was trained for LLM '{meta['llm'].get('name')}' "
                                f"({key} {str(meta['llm'].get(key))[:12]}) but the loaded LLM '{llm_identity.get('name')}' "
                                f"has {key} {str(llm_identity.get(key))[:12]}; bridge this LLM with stage=bridge.")
    projector = MemoryProjector.from_pretrained(where / "projector", use_safetensors=True)
    if weights_fingerprint(projector) != meta["projector_sha256"]:
        raise ArtifactError(f"The projector weights in {where} do not match the hash in bridge.json; the bridge was modified.")
    projector.requires_grad_(False).eval()
    return projector, meta
