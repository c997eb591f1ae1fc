"""Every benchmark in one place; each writes JSON under benchmarks/results/.

    python benchmarks/run_all.py                       # real defaults (SmolLM2, MiniLM): hours on 2 CPU cores
    python benchmarks/run_all.py --quick               # tiny random models: checks the plumbing in minutes
    python benchmarks/run_all.py --only methods --methods mindbridge neuraldb --num-edits 50

Parts (`--only` picks some):

* `methods` (methods.json, methods.md): for each method whose stage exists (mindbridge =
  stage=default, neuraldb, wise, unike), `train.py` edits the same N facts on LLM A, each run a
  subprocess so its peak memory is its own (os.wait4): edit wall-clock (MindBridge: pretrain +
  bridge) and edits/s, the parameters/bytes the method adds, peak RSS, Rel/Gen/Loc/Avg. MindBridge's
  inference latency is timed here (greedy generation with the memory against the same LLM without
  it); the other methods' latency comes from their own scripts below. Then the cross-model cost:
  MindBridge bridges its existing memory to LLM B (stage=bridge memory=...) while every baseline
  has to redo the edits on LLM B.
* `scale`, `neuraldb`, `wise`, `unike`: the per-method scripts in this folder (when present) with
  the arguments in SCRIPTS.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_result  # noqa: E402

METHOD_STAGES = {"mindbridge": "default", "neuraldb": "neuraldb", "wise": "wise", "unike": "unike"}
# Per-method scripts: (arguments on the real models, arguments with --quick).
SCRIPTS = {
    "scale": (["--sizes", "250", "500", "1000"], ["--sizes", "16", "32", "--steps", "1", "--set", "llm=tiny_llama",
                                                  "encoder=tiny_bert"]),
    "neuraldb": (["--llm", "smollm2"], ["--llm", "tiny_llama", "--edit-facts", "4", "--sizes", "100", "1000",
                                        "--tokens", "8"]),
    "wise": (["--llm", "smollm2"], ["--llm", "tiny_llama", "--edits", "4", "--batch-sizes", "1", "4", "--tokens", "4"]),
    "unike": (["--llm", "smollm2"], ["--llm", "tiny_llama"]),
}
QUICK_TRAIN = ["debug=fast"]


RUN_RECORD = "benchmark_run.json"


def run_train(overrides: list[str], run_dir: Path, threads: int) -> dict:
    """`python train.py <overrides>` as a child process: its metrics, wall-clock and own peak RSS.

    The result is kept in `<run_dir>/benchmark_run.json`; running the benchmark again with the same
    command reuses a finished run (`"reused": true`) instead of training it again, so an
    interrupted hours-long benchmark resumes where it stopped."""
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(ROOT / "train.py"), *overrides, f"threads={threads}", "logger=none",
            "callbacks.progress=null", "print_table=false", f"hydra.run.dir={run_dir}"]
    record = run_dir / RUN_RECORD
    if record.is_file():
        try:
            done = json.loads(record.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            done = {}                                   # cut short while being written: run again
        if done.get("ok") and done.get("command", [None])[1:] == argv[1:]:
            return {**done, "reused": True}
        record.unlink()
    start = time.perf_counter()
    with open(run_dir / "train.log", "w", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)        # this child's own rusage, not the sum of all
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    metrics_file = run_dir / "metrics.json"
    if proc.returncode != 0 or not metrics_file.is_file():
        tail = (run_dir / "train.log").read_text(encoding="utf-8").strip().splitlines()[-1:]
        return {"ok": False, "exit_code": proc.returncode, "command": argv, "error": tail[0] if tail else ""}
    result = {"ok": True, "reused": False, "command": argv, "process_seconds": wall,
              "peak_rss_mb": usage.ru_maxrss / 1024, "metrics": json.loads(metrics_file.read_text(encoding="utf-8"))}
    write_result(record, result)
    return result


def added_footprint(method: str, metrics: dict, run_dir: Path) -> dict:
    """What the method adds to the LLM, as each method reports it (parameters or stored bytes).

    MindBridge adds the memory encoder and the projector (the encoder is shared by every LLM)."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
           and ("params" in k or k.endswith("_bytes") or k.endswith("_mb")) and not k.startswith("pretrain_")}
    if method == "mindbridge" and (run_dir / "memory" / "manifest.json").is_file():
        from mindbridge.artifacts import load_memory
        encoder, _ = load_memory(run_dir / "memory")
        out["memory_encoder_params"] = sum(p.numel() for p in encoder.parameters())
        out["params_added_total"] = out["memory_encoder_params"] + int(metrics.get("projector_params") or 0)
    return out


def mindbridge_latency(memory: Path, llm_name: str, prompts: list[str], tokens: int, repeats: int) -> dict:
    """Greedy generation (batch 1, KV cache) with the memory vs. the same LLM without it, interleaved."""
    import torch

    from benchmarks.neuraldb import load_llm
    from mindbridge.api import load_edited_llm
    llm, tok, _ = load_llm(llm_name)          # seed 0, as train.py builds tiny random LLMs
    edited = load_edited_llm(llm, tok, llm_name, [memory])
    times = {"with_memory": [], "without_memory": []}
    with torch.no_grad():
        edited.generate(prompts[:1], max_new_tokens=2)                       # warm-up
        for _ in range(repeats):
            for prompt in prompts:
                for key, use in (("with_memory", True), ("without_memory", False)):
                    start = time.perf_counter()
                    edited.generate([prompt], max_new_tokens=tokens, min_new_tokens=tokens, use_memory=use)
                    times[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tokens": tokens, "prompts": len(prompts), "repeats": repeats,
            "seconds_with_memory": med["with_memory"], "seconds_unedited": med["without_memory"],
            "latency_ratio": med["with_memory"] / med["without_memory"]}


def methods_benchmark(args, out_dir: Path) -> dict:
    stages = [m for m in args.methods if (ROOT / "configs" / "stage" / f"{METHOD_STAGES[m]}.yaml").is_file()]
    base = [*(QUICK_TRAIN if args.quick else []), f"data={args.data}", f"data.num_edits={args.num_edits}",
            f"seed={args.seed}"]
    work = out_dir / "methods_runs"
    rows: dict[str, dict] = {}
    for method in stages:
        print(f"[methods] {method}: editing {args.num_edits} facts on {args.llm_a}", flush=True)
        run_dir = work / f"{method}-{args.llm_a}"
        res = run_train([f"stage={METHOD_STAGES[method]}", f"llm={args.llm_a}", *base], run_dir, args.threads)
        row = {"method": method, "llm": args.llm_a, **{k: v for k, v in res.items() if k != "metrics"}}
        if res["ok"]:
            m = res["metrics"]
            edit = m.get("train_seconds") or m.get("edit_seconds")
            row.update({"num_edits": m.get("num_edits"), "edit_seconds": edit, "edits_per_second":
                        m["num_edits"] / edit if edit else None, **{k: m.get(k) for k in ("rel", "gen", "loc", "avg")},
                        "phase_seconds": {k: v for k, v in m.items() if k.endswith("_seconds")},
                        "added": added_footprint(method, m, run_dir)})
            if method == "mindbridge":
                from data.records import record_from_dict
                from mindbridge.artifacts import read_facts
                prompts = [record_from_dict(f).prompt for f in read_facts(run_dir / "memory")][:args.latency_prompts]
                row["inference"] = mindbridge_latency(run_dir / "memory", args.llm_a, prompts, args.tokens,
                                                      args.repeats)
        rows[method] = row
    # Cross-model: a new LLM B. MindBridge trains only a projector against its existing memory.
    cross: dict[str, dict] = {}
    if args.llm_b and rows.get("mindbridge", {}).get("ok"):
        for method in stages:
            print(f"[methods] {method}: moving the edits to {args.llm_b}", flush=True)
            run_dir = work / f"{method}-{args.llm_b}"
            if method == "mindbridge":
                res = run_train(["stage=bridge", f"llm={args.llm_b}", f"memory={work / f'mindbridge-{args.llm_a}' / 'memory'}",
                                 *base], run_dir, args.threads)
                key = "bridge_seconds"
            else:
                res = run_train([f"stage={METHOD_STAGES[method]}", f"llm={args.llm_b}", *base], run_dir, args.threads)
                key = "train_seconds"
            m = res.get("metrics") or {}
            cross[method] = {"ok": res["ok"], "reused": bool(res.get("reused")),
                             "what": "bridge the existing memory" if method == "mindbridge" else "redo every edit",
                             "seconds": m.get(key), "peak_rss_mb": res.get("peak_rss_mb"),
                             **{k: m.get(k) for k in ("rel", "gen", "loc", "avg")},
                             **({} if res["ok"] else {"error": res.get("error")})}
        mb = cross.get("mindbridge", {}).get("seconds")
        for method, c in cross.items():
            if mb and c.get("seconds"):
                c["seconds_relative_to_mindbridge_bridge"] = c["seconds"] / mb
    result = {"benchmark": "methods", "quick": args.quick, "llm_a": args.llm_a, "llm_b": args.llm_b,
              "dataset": args.data, "num_edits": args.num_edits, "threads": args.threads,
              "machine": platform.machine(), "python": platform.python_version(),
              "methods": rows, "cross_model": cross,
              "skipped_methods": sorted(set(args.methods) - set(stages))}
    write_result(out_dir / "methods.json", result)
    (out_dir / "methods.md").write_text(methods_markdown(result), encoding="utf-8")
    return result


def methods_markdown(result: dict) -> str:
    def f(v, digits=1):
        return "–" if not isinstance(v, (int, float)) else f"{v:.{digits}f}"
    lines = [f"Methods on {result['llm_a']} ({result['num_edits']} {result['dataset']} edits, "
             f"{result['threads']} thread(s){', tiny models' if result['quick'] else ''})", "",
             "| method | edit s | edits/s | added | peak RSS MB | latency × unedited | Rel | Gen | Loc | Avg |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        if not r.get("ok"):
            lines.append(f"| {name} | failed: {r.get('error', '')} |||||||||")
            continue
        added = r.get("added", {})
        shown = (f"{added['params_added_total'] / 1e6:.2f}M params" if "params_added_total" in added else
                 ", ".join(f"{k}={v:.3g}" for k, v in added.items()) or "–")
        ratio = (r.get("inference") or {}).get("latency_ratio")
        lines.append(f"| {name} | {f(r['edit_seconds'])} | {f(r['edits_per_second'], 3)} | {shown} | "
                     f"{f(r['peak_rss_mb'], 0)} | {f(ratio, 2) if ratio else 'see ' + name + '.json'} | "
                     f"{f(r.get('rel'))} | {f(r.get('gen'))} | {f(r.get('loc'))} | {f(r.get('avg'))} |")
    if result["cross_model"]:
        lines += ["", f"Moving the edits to {result['llm_b']}:", "",
                  "| method | what | seconds | × MindBridge bridge | Avg on the new LLM |", "|---|---|---|---|---|"]
        for name, c in result["cross_model"].items():
            lines.append(f"| {name} | {c['what']} | {f(c.get('seconds'))} | "
                         f"{f(c.get('seconds_relative_to_mindbridge_bridge'), 2)} | {f(c.get('avg'))} |")
    return "\n".join(lines) + "\n"


def run_script(name: str, args, out_dir: Path) -> dict:
    script = ROOT / "benchmarks" / f"{name}.py"
    if not script.is_file():
        return {"ok": False, "skipped": f"benchmarks/{name}.py does not exist"}
    full, quick = SCRIPTS[name]
    argv = [sys.executable, str(script), *(quick if args.quick else full), "--threads", str(args.threads),
            "--out", str(out_dir / f"{name}.json")]
    print(f"[{name}] {' '.join(argv[1:])}", flush=True)
    proc = subprocess.run(argv, cwd=ROOT)
    return {"ok": proc.returncode == 0, "exit_code": proc.returncode, "command": argv}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random models (debug=fast): minutes, not hours")
    ap.add_argument("--only", nargs="+", choices=["methods", *SCRIPTS], help="run only these parts")
    ap.add_argument("--methods", nargs="+", choices=list(METHOD_STAGES), default=list(METHOD_STAGES))
    ap.add_argument("--llm-a", default=None, help="LLM the edits are made on (default smollm2; --quick tiny_llama)")
    ap.add_argument("--llm-b", default=None, help="the new LLM of the cross-model cost (default smollm2_moe; "
                                                  "--quick tiny_gpt2; '' to skip)")
    ap.add_argument("--data", default="zsre")
    ap.add_argument("--num-edits", type=int, default=None, help="default 200 (--quick 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=16, help="generated tokens per latency timing")
    ap.add_argument("--latency-prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    args.llm_a = args.llm_a or ("tiny_llama" if args.quick else "smollm2")
    args.llm_b = ("tiny_gpt2" if args.quick else "smollm2_moe") if args.llm_b is None else args.llm_b
    args.num_edits = args.num_edits or (8 if args.quick else 200)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = args.only or ["methods", *SCRIPTS]
    summary = {}
    for part in parts:
        if part == "methods":
            result = methods_benchmark(args, out_dir)
            summary["methods"] = {"ok": all(r.get("ok") for r in result["methods"].values())}
        else:
            summary[part] = run_script(part, args, out_dir)
    write_result(out_dir / "run_all.json", {"quick": args.quick, "parts": summary})
    failed = [k for k, v in summary.items() if not v.get("ok") and not v.get("skipped")]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
