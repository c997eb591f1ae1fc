"""NeuralDB's Gen on CounterFact, split by the kind of prompt it is scored on.

EasyEdit's flat CounterFact file (`data=counterfact`) gives each fact one "rephrase" prompt. For
most facts that prompt is one of CounterFact's *generation* prompts ("Where X is from, people
speak the language of", "X's surroundings include"), not a paraphrase. This scores one saved
database, built on `data=counterfact_rome` (the same facts in ROME/MEMIT form), on three sets of
held-out prompts of its own facts, with the shared evaluator's token accuracy:

- `rome_paraphrase`: the two ROME paraphrases per fact (what `data=counterfact_rome` scores);
- `flat_is_paraphrase` / `flat_is_generation`: the flat file's rephrase prompt for the same fact,
  by whether it is one of the ROME record's paraphrases or one of its generation prompts.

    python benchmarks/counterfact_prompt_types.py --database R/neuraldb --out benchmarks/results/counterfact_prompt_types.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_result  # noqa: E402

ROME_FILE = "counterfact/counterfact_portability_gpt4.json"
FLAT_FILES = ("counterfact/counterfact-train.json", "counterfact/counterfact-edit.json")


def read_facts_files() -> tuple[dict, dict]:
    """The bundled CounterFact records by case id: ROME form, and the flat files (train and edit)."""
    from data.readers import bundled_path, read_records
    rome = {r.case_id: r for r in read_records(bundled_path(ROME_FILE), dedupe=False)}
    flat = {r.case_id: r for f in FLAT_FILES for r in read_records(bundled_path(f), dedupe=False)}
    return rome, flat


def prompt_kind(prompt: str, rome_record) -> str:
    if prompt in rome_record.rephrase_prompts:
        return "flat_is_paraphrase"
    if prompt in rome_record.generation_prompts:
        return "flat_is_generation"
    return "flat_other"


def scoring_sets(facts, rome: dict, flat: dict) -> list[tuple[str, int, str, str]]:
    """(kind, fact row, prompt, target) for every held-out prompt of the database's facts."""
    rows = []
    for i, fact in enumerate(facts):
        case_id = str(fact.id).split("#")[0]
        if case_id not in rome:
            raise SystemExit(f"Fact {fact.id!r} of the database is not a CounterFact fact in ROME form "
                             f"({ROME_FILE}); build the database with data=counterfact_rome.")
        record = rome[case_id]
        rows += [("rome_paraphrase", i, p, fact.target) for p in record.rephrase_prompts]
        if case_id in flat:
            for p in flat[case_id].rephrase_prompts:
                rows.append((prompt_kind(p, record), i, p, fact.target))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--database", required=True, help="a saved NeuralDB (<run dir>/neuraldb) of data=counterfact_rome")
    ap.add_argument("--llm", default="smollm2")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/counterfact_prompt_types.json"))
    args = ap.parse_args()

    from benchmarks.neuraldb import load_llm
    from mindbridge.evaluation import PROTOCOL, ScoringItem, score_targets
    from mindbridge.neuraldb import NeuralDB

    torch.set_num_threads(args.threads)
    rome, flat = read_facts_files()
    llm, tok, identity = load_llm(args.llm)
    db = NeuralDB.load(args.database, llm, tok, llm_name=args.llm, llm_identity=identity)
    rows = scoring_sets(db.facts, rome, flat)
    items = [ScoringItem(i, "gen", p, t) for _, i, p, t in rows]
    post = score_targets(db, items, args.batch_size)
    pre = score_targets(db.unedited, items, args.batch_size)

    result = {"database": str(args.database), "llm": args.llm, "gamma": db.gamma, "num_facts": len(db.facts),
              "protocol": PROTOCOL}
    for kind in sorted({k for k, *_ in rows}):
        idx = [n for n, (k, *_) in enumerate(rows) if k == kind]

        def pct(scores, exact=False):
            hits = [(scores[n].pred == scores[n].gold).float() for n in idx]
            return 100.0 * sum(float(h.min() if exact else h.mean()) for h in hits) / len(idx)

        fire = db.fire_rates([rows[n][2] for n in idx], [rows[n][1] for n in idx])
        result[kind] = {"prompts": len(idx), "gen": pct(post), "gen_em": pct(post, exact=True),
                        "pre_gen": pct(pre), "gate_fire_own_pct": fire["own"]}
        print(kind, result[kind])
    db.remove()
    write_result(args.out, result)


if __name__ == "__main__":
    main()
