"""WISE's costs: edit throughput at batch sizes 1 and 16, and inference latency against the unedited model.

* Edit throughput: edits per minute of `WISE.edit` + `commit` (the model config's hyperparameters)
  on the first `--edits` ZsRE edits of data seed `--data-seed`, each paired with
  `irrelevant_per_edit` irrelevant texts as in the stage, at every `--batch-sizes` value (a fresh
  side memory each time). The one-off prefix generation is timed separately.
* Latency: greedy generation of `--tokens` tokens (KV cache, batch 1) and one teacher-forced
  scoring forward of 32 prompts, with WISE holding m side memories (`--memories`; 1 = WISE-Merge,
  more = WISE-Retrieve, each a copy of the edited side memory), against the same LLM with WISE
  removed. Interleaved and repeated (median). The route is decided on the prompt and pinned.

    python benchmarks/wise.py --llm smollm2 --edits 16 --batch-sizes 1 16 --memories 1 4 \\
        --out benchmarks/results/wise.json
    python benchmarks/wise.py --llm tiny_llama --edits 4 --batch-sizes 1 4 --tokens 4   # seconds
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


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="smollm2", help="a configs/llm/ name (tiny_llama: seconds-long check)")
    ap.add_argument("--edits", type=int, default=16, help="real ZsRE edits per throughput measurement")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--memories", type=int, nargs="+", default=[1, 4], help="side memories for the latency")
    ap.add_argument("--tokens", type=int, default=16, help="generated tokens per timing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n-iter", type=int, default=None, help="optimisation steps per batch (default: the config's)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "wise.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from omegaconf import OmegaConf

    from data.datamodule import EditDataModule
    from lit_modules.editing import facts_for, resolve_layer
    from lit_modules.wise import MODEL_CONFIG, irrelevant_texts
    from mindbridge.lm import causal_logits
    from mindbridge.tokenization import prompt_batch, teacher_forced_batch
    from mindbridge.wise import WISE, Memory, WISEHParams

    hp_cfg = OmegaConf.load(MODEL_CONFIG)
    if args.n_iter is not None:
        hp_cfg.n_iter = args.n_iter
    llm, tok, identity = load_llm(args.llm)
    layer = resolve_layer(hp_cfg, args.llm, llm)
    per_edit = int(hp_cfg.irrelevant_per_edit)
    dm = EditDataModule(name="zsre", num_edits=args.edits, seed=args.data_seed,
                        max_out_of_scope=max(4, per_edit) * args.edits)
    dm.setup()
    facts = facts_for(dm.edits)
    # As the stage pairs them: irrelevant_per_edit out-of-scope texts per edit, with or without the answer.
    irrelevant = irrelevant_texts({"prompt": [o.prompt for o in dm.out_of_scope],
                                   "answer": [o.answer for o in dm.out_of_scope]}, bool(hp_cfg.irrelevant_answers))
    result: dict = {"llm": args.llm, "layer": layer, "threads": args.threads, "edits": args.edits,
                    "data_seed": args.data_seed, "machine": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "hyperparameters": OmegaConf.to_container(hp_cfg)}

    prefixes, throughput, editor = None, [], None
    for bs in args.batch_sizes:
        hp = WISEHParams.from_dict({**OmegaConf.to_container(hp_cfg), "batch_size": bs})
        if editor is not None:
            editor.remove()
        editor = WISE(llm, tok, layer, hparams=hp, llm_identity=identity, prefixes=prefixes)
        if prefixes is None:
            result["prefix_generation_seconds"] = timed(lambda: editor.templates)
            prefixes = editor.prefixes
        steps = []

        def stream() -> None:
            for s in range(0, len(facts), bs):
                batch = facts[s:s + bs]
                paired = [irrelevant[(s * per_edit + j) % len(irrelevant)] for j in range(len(batch) * per_edit)]
                report = editor.edit(batch, paired)
                editor.commit()
                steps.append(report["steps"])
        seconds = timed(stream)
        throughput.append({"batch_size": bs, "edits": len(facts), "seconds": seconds,
                           "edits_per_minute": 60.0 * len(facts) / seconds,
                           "mean_steps": sum(steps) / len(steps), "n_iter": hp.n_iter})
        print(throughput[-1], flush=True)
    result["edit"] = throughput

    # Latency: the last editor's side memory, copied into m memories.
    prompt_ids, prompt_mask = prompt_batch(tok, [dm.edits[0].prompt])
    records = [dm.edits[i % len(dm.edits)] for i in range(32)]
    scoring = teacher_forced_batch(tok, [r.prompt for r in records], [r.target_new for r in records])
    side = editor.side
    rows = []

    def generate() -> None:
        llm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=args.tokens,
                     min_new_tokens=args.tokens, do_sample=False, pad_token_id=tok.pad_token_id)

    def score(lm) -> None:
        with torch.no_grad():
            lm(scoring.input_ids, scoring.attention_mask)

    def pinned_generate() -> None:
        w = editor.wrapper
        w.route_mask, w.pin, w.pinned = prompt_mask, True, None
        try:
            generate()
        finally:
            w.route_mask, w.pin, w.pinned = None, False, None

    def edited_scoring(ids, mask) -> None:
        editor.logits(None, ids, mask, scoring.keep, scoring.target_mask.sum(1))
    for m in args.memories:
        editor.wrapper.candidates = [(Memory(side.weights, 0.0, [0], 1), 0.0) for _ in range(m)]
        base_gen, wise_gen, base_score, wise_score = [], [], [], []
        for _ in range(args.repeats):
            editor.remove()
            base_gen.append(timed(generate))
            base_score.append(timed(lambda: score(lambda i, a: causal_logits(llm, i, a, scoring.keep))))
            setattr(editor.site.parent, editor.site.attr, editor.wrapper)
            wise_gen.append(timed(pinned_generate))
            wise_score.append(timed(lambda: score(edited_scoring)))
        b, w = statistics.median(base_gen), statistics.median(wise_gen)
        bs_, ws_ = statistics.median(base_score), statistics.median(wise_score)
        rows.append({"memories": m, "ms_per_token_base": 1e3 * b / args.tokens,
                     "ms_per_token_wise": 1e3 * w / args.tokens, "generation_relative": w / b,
                     "scoring_ms_base": 1e3 * bs_, "scoring_ms_wise": 1e3 * ws_, "scoring_relative": ws_ / bs_,
                     "peak_rss_mb": peak_rss_mb()})
        print(rows[-1], flush=True)
    editor.remove()
    result["latency"] = rows
    result["latency_note"] = (f"generation: {args.tokens} greedy tokens, batch 1, KV cache, route pinned; scoring: "
                              f"one teacher-forced forward of {scoring.input_ids.shape[0]} ZsRE prompts; medians of "
                              f"{args.repeats}; every side memory is routed to (threshold 0), the worst case")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
