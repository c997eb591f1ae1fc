"""The memory read gate's cost: generation latency with a gated memory against the unedited LLM.

For each prompt kind of a memory's own facts (edit prompts, which open the gate; locality
prompts, which do not) greedy generation of `--tokens` tokens (batch 1, KV cache) is timed
three ways, interleaved and repeated (median): the unedited LLM, the LLM reading the memory
through its gate, and the LLM reading it for every prompt (the paper). The gate's own cost (the
encoder's forward pass on the prompt and the nearest-fact search) is timed on its own, and with
`--sizes` the search is timed against that many stored keys (random unit vectors: the scan costs
the same whatever they hold).

    python benchmarks/memory_gate.py --memory outputs/run/memory --llm smollm2 \\
        --out benchmarks/results/memory_gate.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.neuraldb import load_llm  # noqa: E402
from benchmarks.results_io import write_result  # noqa: E402


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", required=True, help="a memory directory with a bridge for --llm")
    ap.add_argument("--llm", default="smollm2")
    ap.add_argument("--prompts", type=int, default=20, help="prompts of each kind")
    ap.add_argument("--tokens", type=int, default=16, help="generated tokens per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 100000],
                    help="stored keys for timing the nearest-fact search alone")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_gate.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from data.records import record_from_dict
    from mindbridge.api import load_edited_llm
    from mindbridge.artifacts import read_facts, read_manifest
    from mindbridge.gate import nearest_similarity

    llm, tok, _ = load_llm(args.llm)
    gated = load_edited_llm(llm, tok, args.llm, [args.memory], gated=True)
    always = load_edited_llm(llm, tok, args.llm, [args.memory], gated=False)
    facts = [record_from_dict(f) for f in read_facts(args.memory)]
    kinds = {"edit": [r.prompt for r in facts][:args.prompts],
             "locality": [p for r in facts for p in r.loc_prompts][:args.prompts]}
    result = {"memory": str(args.memory), "llm": args.llm, "tokens": args.tokens, "threads": args.threads,
              "repeats": args.repeats, "facts": len(facts), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "gate": read_manifest(args.memory).get("gate")}

    def generate(model, prompt, use_memory=True):
        return lambda: model.generate([prompt], max_new_tokens=args.tokens, use_memory=use_memory,
                                      min_new_tokens=args.tokens)

    generate(gated, kinds["edit"][0])()                        # warm-up
    rows = {}
    for kind, prompts in kinds.items():
        base, with_gate, ungated = [], [], []
        opened = gated.open_gates(gated.memory_features(prompts)).any(0)
        for prompt in prompts:
            base.append(_median_seconds(generate(gated, prompt, use_memory=False), args.repeats))
            with_gate.append(_median_seconds(generate(gated, prompt), args.repeats))
            ungated.append(_median_seconds(generate(always, prompt), args.repeats))
        b, g, u = sum(base), sum(with_gate), sum(ungated)
        rows[kind] = {"prompts": len(prompts), "gate_open_rate": 100.0 * opened.float().mean().item(),
                      "seconds_unedited": b, "seconds_gated": g, "seconds_ungated": u,
                      "gated_over_unedited": g / b, "ungated_over_unedited": u / b}
        print(kind, json.dumps(rows[kind]), flush=True)
    every = [p for prompts in kinds.values() for p in prompts]
    total_b = sum(r["seconds_unedited"] for r in rows.values())
    total_g = sum(r["seconds_gated"] for r in rows.values())
    result["generation"] = rows
    result["gated_over_unedited_all"] = total_g / total_b

    encoder, gate = gated.encoders[0], gated.gates[0]
    features = _median_seconds(lambda: [encoder.encode([p]) for p in every], args.repeats) / len(every)
    search = _median_seconds(lambda: [gate.scores(encoder.encode([p])) for p in every], args.repeats) / len(every)
    result["gate_cost"] = {"ms_per_prompt_features": 1e3 * features, "ms_per_prompt_features_and_search": 1e3 * search,
                           "ms_per_prompt_generation_unedited": 1e3 * total_b / len(every)}
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, gate.keys.shape[1], generator=g)
    scans = []
    for n in args.sizes:
        keys = torch.nn.functional.normalize(torch.randn(n, gate.keys.shape[1], generator=g), dim=-1)
        seconds = _median_seconds(lambda: nearest_similarity(query, keys), max(5, args.repeats))
        scans.append({"keys": n, "ms_per_prompt_search": 1e3 * seconds, "keys_mb": keys.numel() * 4 / 2**20})
        print(json.dumps(scans[-1]), flush=True)
    result["search_scaling"] = scans
    result["note"] = (f"greedy generation of {args.tokens} tokens per prompt, batch 1, KV cache, median of "
                      f"{args.repeats} per prompt; gated = the memory read only where its gate opens; "
                      "the gate's cost is paid once per prompt, not per token")
    print(json.dumps({k: result[k] for k in ("gated_over_unedited_all", "gate_cost")}), flush=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
