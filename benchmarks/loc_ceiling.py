"""The best Loc one inserted memory token can reach, per memory position.

An out-of-scope memory should leave the LLM alone. This trains free vectors (the same
for every prompt, no encoder, no projector) to minimise the KL between the LLM with and without
it on the run's out-of-scope training prompts, at one position, then scores it on the locality
prompts of the edited records exactly as the evaluator does. A projector cannot do better on
Loc than the best constant token at the same position.

    python benchmarks/loc_ceiling.py --positions suffix prefix --out benchmarks/results/loc_ceiling.json
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_result  # noqa: E402
from benchmarks.scale import compose  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", nargs="+", default=["suffix", "prefix"])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=6e-2)
    ap.add_argument("--tokens", type=int, default=1, help="memory tokens (the projector's num_tokens)")
    ap.add_argument("--share-positions", action="store_true",
                    help="memory tokens take the preceding text token's position (text positions unchanged)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="Hydra overrides (e.g. data.seed=1 llm=gemma3)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/loc_ceiling.json"))
    args = ap.parse_args()

    from lit_modules.runtime import RunContext
    from mindbridge.bridge import MemoryAugmentedLM
    from mindbridge.evaluation import scoring_items, token_predictions
    from mindbridge.lm import PlainLM, causal_logits

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    cfg = compose(args.set)
    ctx = RunContext(cfg, Path(tempfile.mkdtemp()))
    dm = ctx.data()
    llm, tok = ctx.load_llm()
    llm.requires_grad_(False)
    items = [it for it in scoring_items(dm.edits) if it.kind == "loc"]
    plain = PlainLM(llm, tok)
    before = token_predictions(plain, items, cfg.model.eval.batch_size)
    prompts = [o.prompt for o in dm.out_of_scope]

    class ConstantToken:
        """Free vectors at `position`, inserted where a projector's token would go."""

        insert_at = MemoryAugmentedLM.insert_at          # the bridge's own placement rule

        def __init__(self, vector: torch.Tensor, position: str):
            self.vector, self.position, self.tokenizer = vector, position, tok

        def logits(self, prompts, ids, mask, keep, answer_lengths=None):
            at = self.insert_at(mask, answer_lengths)
            return causal_logits(llm, ids, mask, keep, self.vector.expand(len(ids), -1, -1), at,
                                 share_positions=args.share_positions)

    results = {}
    for position in args.positions:
        vector = torch.nn.Parameter(llm.get_input_embeddings().weight.mean(0).detach().clone().repeat(args.tokens, 1))
        token = ConstantToken(vector, position)
        opt = torch.optim.Adam([vector], lr=args.lr)
        kl = torch.tensor(float("nan"))
        for step in range(args.steps):
            batch = tok(rng.sample(prompts, min(args.batch, len(prompts))), return_tensors="pt", padding=True)
            with torch.no_grad():
                teacher = plain.logits(None, batch.input_ids, batch.attention_mask, 1)[:, -1]
            student = token.logits(None, batch.input_ids, batch.attention_mask, 1)[:, -1]
            kl = torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                            reduction="batchmean")
            opt.zero_grad()
            kl.backward()
            opt.step()
            if step % 20 == 0:
                print(f"{position} step {step} kl {kl.item():.3f}", flush=True)
        with torch.no_grad():
            after = token_predictions(ConstantToken(vector.detach(), position), items, cfg.model.eval.batch_size)
        first = [float(a[0] == b[0]) for (a, _), (b, _) in zip(after, before)]
        every = [float(x) for (a, _), (b, _) in zip(after, before) for x in (a == b)]
        results[position] = {"loc": 100.0 * sum(every) / len(every),
                             "first_token_agreement": 100.0 * sum(first) / len(first),
                             "final_train_kl": float(kl)}
        print(position, results[position], flush=True)
    write_result(args.out, {"llm": cfg.llm.name, "dataset": dm.name, "num_edits": len(dm.edits),
                            "data_seed": dm.seed, "tokens": args.tokens, "share_positions": args.share_positions,
                            "steps": args.steps, "batch": args.batch, "lr": args.lr, "positions": results})


if __name__ == "__main__":
    main()
