"""UniKE's costs: edit throughput, added latency per generated token, parameters added.

* Edit throughput: facts/s of `UniKE.edit` on the first `--edits` ZsRE edits in batches of
  `--batch-size` (one-step protocol), after a knowledge pool of `--pool` out-of-scope pairs
  (the pool and memory-query extraction are timed separately).
* Latency: greedy generation of `--tokens` tokens (KV cache, batch 1) with every edit switched on
  against the same model with UniKE off, interleaved and repeated (median).
* Parameters: extra neurons added (keys, biases, values) and their share of the LLM.

    python benchmarks/unike.py --llm smollm2 --edits 16 --pool 200 --out benchmarks/results/unike.json
    python benchmarks/unike.py --llm tiny_llama --edits 4 --pool 16 --tokens 4     # seconds
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.neuraldb import load_llm, peak_rss_mb  # noqa: E402
from benchmarks.results_io import write_result  # noqa: E402


@torch.no_grad()
def seconds_per_token(editor, ids, mask, tokens: int, on: bool) -> float:
    st = editor.state
    saved = (st.intrinsic, st.latent)
    if not on:
        st.intrinsic = st.latent = False
    start = time.perf_counter()
    try:
        with editor.active_edits(None):
            editor.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                                  do_sample=False, pad_token_id=editor.tokenizer.pad_token_id)
    finally:
        st.intrinsic, st.latent = saved
        editor._reset_caches()
    return (time.perf_counter() - start) / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="smollm2")
    ap.add_argument("--edits", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pool", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from omegaconf import OmegaConf

    from data.datamodule import EditDataModule
    from mindbridge.tokenization import prompt_batch
    from mindbridge.unike import Request, UniKE, UniKEHParams, pool_triples
    llm, tok, _ = load_llm(args.llm)
    hp = UniKEHParams.from_dict(OmegaConf.to_container(OmegaConf.load(ROOT / "configs/model/unike.yaml")))
    hp.batch_size = args.batch_size
    dm = EditDataModule("zsre", num_edits=args.edits, max_out_of_scope=max(args.pool, 100))
    dm.setup()
    editor = UniKE(llm, tok, hp)
    try:
        start = time.perf_counter()
        pairs = [(o.prompt, o.answer) for o in dm.out_of_scope if o.answer][:args.pool]
        with editor.configured(intrinsic=False, latent=False):
            triples, _ = pool_triples(llm, tok, pairs)
        editor.build_pool(triples)
        editor.set_memory_queries([Request(o.prompt, "") for o in dm.out_of_scope[:100]])
        offline = time.perf_counter() - start
        requests = [Request(r.prompt, r.target_new) for r in dm.edits]
        start = time.perf_counter()
        for i in range(0, len(requests), args.batch_size):
            editor.edit(requests[i:i + args.batch_size])
        edit_seconds = time.perf_counter() - start
        ids, mask = prompt_batch(tok, [dm.edits[0].prompt])
        on, off = [], []
        for _ in range(args.repeats):
            off.append(seconds_per_token(editor, ids, mask, args.tokens, on=False))
            on.append(seconds_per_token(editor, ids, mask, args.tokens, on=True))
        n_llm = sum(p.numel() for p in llm.parameters())
        result = {
            "llm": args.llm, "edits": len(requests), "batch_size": args.batch_size, "pool_size": len(triples),
            "offline_seconds": offline, "edit_seconds": edit_seconds,
            "edit_facts_per_second": len(requests) / edit_seconds,
            "ms_per_token_base": 1000 * statistics.median(off), "ms_per_token_unike": 1000 * statistics.median(on),
            "extra_params": editor.added_params, "extra_params_pct_of_llm": 100.0 * editor.added_params / n_llm,
            "peak_rss_mb": peak_rss_mb(), "threads": args.threads, "machine": platform.machine(),
        }
    finally:
        editor.remove()
    for k, v in result.items():
        print(f"{k}: {v}")
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
