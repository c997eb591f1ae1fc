"""NeuralDB's costs: edit throughput, added latency per generated token, memory of the database.

* Edit throughput: facts/s of `NeuralDB.add` (keys + residuals, the model config's
  hyperparameters) on the first `--edit-facts` ZsRE edits; the one-off prefix generation is
  timed separately.
* Latency: greedy generation of `--tokens` tokens (KV cache, batch 1) with the gate holding
  m = `--sizes` facts, against the same model with the gate off, interleaved and repeated
  (median). The stored facts are synthetic (random keys and residuals: the lookup costs the
  same whatever is stored, and random keys never fire, so what is timed is the search itself).
* Memory: bytes of the stored tensors (normalised keys, key norms, residuals) and the
  process's peak RSS.

    python benchmarks/neuraldb.py --llm smollm2 --edit-facts 16 --sizes 1000 10000 100000 \\
        --out benchmarks/results/neuraldb.json
    python benchmarks/neuraldb.py --llm tiny_llama --edit-facts 4 --sizes 100 1000 --tokens 8   # seconds
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_result  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_llm(name: str):
    from omegaconf import OmegaConf

    from mindbridge.loading import load_causal_lm, model_identity
    c = OmegaConf.load(ROOT / "configs" / "llm" / f"{name}.yaml")
    moe = {k: c[k] for k in ("num_experts", "top_k") if c.get(k) is not None}
    llm, tok = load_causal_lm(c.source, hub_id=c.hub_id, path=c.path, dtype=c.dtype, seed=0,
                              random_config=OmegaConf.to_container(c.random_config) if c.random_config else None,
                              **moe)
    return llm, tok, model_identity(llm, name)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fill_synthetic(db, m: int, seed: int = 0) -> None:
    """m random facts in the gate (unit keys, residuals of the model's scale)."""
    from mindbridge.neuraldb import normalize_rows
    g = torch.Generator().manual_seed(seed)
    gate = db.gate
    d1, d2 = gate.keys_hat.shape[1], gate.residuals.shape[1]
    keys = torch.empty(m, d1, dtype=gate.keys_hat.dtype)
    for s in range(0, m, 8192):                     # in pieces: no float32 copy of 100k keys at once
        keys[s:s + 8192] = normalize_rows(torch.randn(min(8192, m - s), d1, generator=g)).to(keys.dtype)
    gate.keys_hat = keys
    gate.key_norms = torch.ones(m)
    gate.residuals = torch.randn(m, d2, generator=g, dtype=gate.residuals.dtype)


@torch.no_grad()
def seconds_per_token(db, ids, mask, tokens: int, use_db: bool) -> float:
    start = time.perf_counter()
    gate = db.gate
    before, gate.enabled = gate.enabled, use_db
    try:
        db.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                          do_sample=False, pad_token_id=db.tokenizer.pad_token_id)
    finally:
        gate.enabled = before
    return (time.perf_counter() - start) / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="smollm2", help="a configs/llm/ name (tiny_llama: seconds-long check)")
    ap.add_argument("--edit-facts", type=int, default=16, help="real ZsRE edits for the throughput (0: skip)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000], help="stored facts for latency")
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens per timing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layer", type=int, default=None, help="default: the model config's rule")
    ap.add_argument("--key-dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "neuraldb.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from omegaconf import OmegaConf

    from data.datamodule import EditDataModule
    from lit_modules.editing import facts_for, resolve_layer
    from lit_modules.neuraldb import MODEL_CONFIG
    from mindbridge.neuraldb import EditHParams, NeuralDB
    from mindbridge.tokenization import prompt_batch

    hp = OmegaConf.load(MODEL_CONFIG)
    if args.layer is not None:
        hp.layer = args.layer
    llm, tok, identity = load_llm(args.llm)
    layer = resolve_layer(hp, args.llm, llm)
    result: dict = {"llm": args.llm, "layer": layer, "threads": args.threads, "key_dtype": args.key_dtype,
                    "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "hyperparameters": OmegaConf.to_container(hp)}

    if args.edit_facts:
        dm = EditDataModule(name="zsre", num_edits=args.edit_facts, seed=0, max_out_of_scope=0)
        dm.setup()
        db = NeuralDB(llm, tok, layer, llm_identity=identity, gamma=0.65,
                      hparams=EditHParams.from_dict(OmegaConf.to_container(hp)))
        try:
            start = time.perf_counter()
            db.templates
            prefix_seconds = time.perf_counter() - start
            start = time.perf_counter()
            report = db.add(facts_for(dm.edits))
            seconds = time.perf_counter() - start
        finally:
            db.remove()
        result["edit"] = {"facts": args.edit_facts, "seconds": seconds, "facts_per_second": args.edit_facts / seconds,
                          "prefix_generation_seconds": prefix_seconds, "mean_steps": report["steps"],
                          "mean_final_loss": report["final_loss"], "batch_size": hp.batch_size}
        print(json.dumps(result["edit"]), flush=True)

    ids, mask = prompt_batch(tok, ["The Eiffel Tower is located in the city of"])
    db = NeuralDB(llm, tok, layer, llm_identity=identity, gamma=0.65, key_dtype=DTYPES[args.key_dtype])
    rows = []
    try:
        seconds_per_token(db, ids, mask, 2, use_db=False)          # warm-up
        for m in args.sizes:
            fill_synthetic(db, m)
            base, with_db = [], []
            for _ in range(args.repeats):
                base.append(seconds_per_token(db, ids, mask, args.tokens, use_db=False))
                with_db.append(seconds_per_token(db, ids, mask, args.tokens, use_db=True))
            b, d = statistics.median(base), statistics.median(with_db)
            rows.append({"facts": m, "db_bytes": db.nbytes, "db_mb": db.nbytes / 2**20,
                         "bytes_per_fact": db.nbytes / m, "ms_per_token_base": 1e3 * b, "ms_per_token_db": 1e3 * d,
                         "added_ms_per_token": 1e3 * (d - b), "added_pct": 100.0 * (d - b) / b,
                         "fired_positions": db.gate.positions_fired, "peak_rss_mb": peak_rss_mb()})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        db.remove()
    result["latency"] = rows
    result["latency_note"] = (f"greedy generation of {args.tokens} tokens, batch 1, KV cache; median of "
                              f"{args.repeats}; synthetic random keys (none fire)")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
