"""How MindBridge's cost grows with the number of edits, measured on the real default models.

For each N it builds what a run of N edits holds in memory (cached encoder features, prompt
keys/values, out-of-scope teacher logits), counts those bytes exactly, and times a few Stage I
and Stage II training steps. From the per-step times it extrapolates the wall-clock of a full
run with the epochs of an experiment config (default: `experiment=scale_counterfact`, the
10,000-edit CounterFact split). The extrapolation is labelled as such in the JSON.

    python benchmarks/scale.py --sizes 250 500 1000 2000 --out benchmarks/results/scale.json
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_result  # noqa: E402


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def kv_bytes(store) -> int:
    if store is None:
        return 0
    return sum(tensor_bytes(layer) for layer in store.keys) + sum(tensor_bytes(layer) for layer in store.values) \
        + tensor_bytes(store.last_logits)


def mean_step_seconds(module, optimizer, dm, steps: int, warmup: int = 1) -> float:
    """Mean wall-clock of an optimizer step of `module` over the datamodule's first batches."""
    module.log = lambda *a, **k: None         # no Trainer here: logging is a no-op
    times = []
    for i, (edit, out) in enumerate(zip(dm.edit_dataloader(), dm.out_dataloader())):
        if i == steps + warmup:
            break
        start = time.perf_counter()
        loss = module.training_step({"edit": edit, "out": out}, i)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def measure(cfg, n: int, steps: int, llm, tok) -> dict:
    from lit_modules.bridge import MemoryBridgeModule
    from lit_modules.pretrain import MemoryPretrainModule, module_hparams
    from lit_modules.runtime import RunContext
    from lit_modules.stages import _projector_for
    from mindbridge.encoder import MemoryEncoder
    from mindbridge.loading import load_masked_lm

    ctx = RunContext(cfg, ROOT / "benchmarks" / "results" / "scratch")
    start = time.perf_counter()
    dm = ctx.data()
    split_seconds = time.perf_counter() - start
    e = cfg.encoder
    mlm, etok = load_masked_lm(e.source, hub_id=e.hub_id, path=e.path)
    encoder = MemoryEncoder(mlm, etok, e.pooling, e.max_length)
    row: dict = {"num_edits": len(dm.edits), "num_out_of_scope": len(dm.out_of_scope), "split_seconds": split_seconds}

    # Stage I: a few steps of the joint phase (all three losses: the most expensive phase).
    pcfg = cfg.model.pretrain
    hp = {**module_hparams(pcfg), "joint_from_start": True}
    pre = MemoryPretrainModule(encoder, **hp)
    opt = torch.optim.AdamW([p for p in pre.parameters() if p.requires_grad], lr=pcfg.lr)
    dm.connect(None, batch_size=pcfg.batch_size, out_batch_size=pcfg.batch_size)
    row["pretrain_step_seconds"] = mean_step_seconds(pre, opt, dm, steps)
    row["pretrain_batch_size"] = pcfg.batch_size

    # Stage II: what prepare() caches, then a few steps.
    bcfg = cfg.model.bridge
    encoder.requires_grad_(False).eval()
    projector = _projector_for(encoder, llm, bcfg.projector)
    bridge = MemoryBridgeModule(llm, tok, [encoder], [projector], lambda_kl=bcfg.lambda_kl,
                                kl_temperature=bcfg.kl_temperature, lr=bcfg.lr, feature_noise=bcfg.feature_noise)
    start = time.perf_counter()
    bridge.prepare([r.prompt for r in dm.edits], [o.prompt for o in dm.out_of_scope])
    row["prepare_seconds"] = time.perf_counter() - start
    # What grows with N (the edits' memory vectors and prompt keys/values) apart from the
    # out-of-scope stream's caches, which are capped by data.max_out_of_scope.
    row["edit_cache_bytes"] = tensor_bytes(bridge._edit_features) + kv_bytes(bridge._edit_kv)
    row["out_of_scope_cache_bytes"] = tensor_bytes(bridge._out_features) + kv_bytes(bridge._out_kv)
    row["cached_bytes_per_edit"] = row["edit_cache_bytes"] / len(dm.edits)
    bridge.train()
    opt = torch.optim.AdamW(projector.parameters(), lr=bcfg.lr)
    dm.connect(tok, batch_size=bcfg.batch_size, out_batch_size=bcfg.out_batch_size)
    row["bridge_step_seconds"] = mean_step_seconds(bridge, opt, dm, steps)
    row["bridge_batch_size"] = bcfg.batch_size
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def extrapolate(rows: list[dict], cfg) -> dict:
    """Full-run wall-clock from the largest measured N, at the experiment's size and epochs."""
    r = rows[-1]
    n = cfg.data.num_edits
    p, b = cfg.model.pretrain, cfg.model.bridge
    pre_epochs = p.joint_epochs + (0 if p.joint_from_start else p.inject_epochs + p.heads_epochs)
    pre = pre_epochs * -(-n // p.batch_size) * r["pretrain_step_seconds"]
    bri = b.epochs * -(-n // b.batch_size) * r["bridge_step_seconds"]
    return {"num_edits": n, "pretrain_epochs": pre_epochs, "bridge_epochs": b.epochs,
            "pretrain_hours_upper_bound": pre / 3600, "bridge_hours": bri / 3600,
            "cached_gb": (r["cached_bytes_per_edit"] * n + r["out_of_scope_cache_bytes"]) / 1e9,
            "note": "extrapolated from the per-step times at the largest measured N (not a measured run); "
                    "the pretrain figure times every epoch as a joint-phase epoch, an upper bound"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per stage (after one warm-up step)")
    ap.add_argument("--experiment", default="scale_counterfact")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra Hydra overrides, e.g. data.max_out_of_scope=1000")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lit_modules.runtime import RunContext
    base = compose([f"experiment={args.experiment}", *args.set])
    llm, tok = RunContext(base, ROOT).load_llm()
    rows = []
    for n in args.sizes:
        rows.append(measure(compose([f"experiment={args.experiment}", *args.set, f"data.num_edits={n}"]),
                            n, args.steps, llm, tok))
        print(json.dumps(rows[-1]), flush=True)
    # Linearity: cached bytes per edit should not grow with N.
    per_edit = [r["cached_bytes_per_edit"] for r in rows]
    result = {"benchmark": "scale", "experiment": args.experiment, "overrides": args.set, "llm": base.llm.name,
              "encoder": base.encoder.name,
              "threads": args.threads, "machine": platform.machine(), "python": platform.python_version(),
              "torch": torch.__version__, "rows": rows,
              "cached_bytes_per_edit_ratio_largest_to_smallest": per_edit[-1] / per_edit[0],
              "full_run_estimate": extrapolate(rows, base)}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
