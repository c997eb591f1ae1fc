"""The paper's figures as PNG files: ablation bars, the scaling curve (Fig. 5), the t-SNE of the
memory encoder's features for in-scope vs out-of-scope prompts (Fig. 4)."""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")            # files only: no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

METRICS = ("rel", "gen", "loc", "avg")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ablation_bars(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars: Rel/Gen/Loc/Avg for each ablation row, one panel per dataset.

    `rows` are the ablation table's records: {"losses": label, "<dataset> Rel": value, ...}.
    """
    datasets = list(dict.fromkeys(c.rsplit(" ", 1)[0] for r in rows for c in r if c.endswith(" Avg")))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    width = 0.8 / max(len(rows), 1)
    for ax, ds in zip(axes[0], datasets):
        for i, row in enumerate(rows):
            values = [row.get(f"{ds} {m.capitalize()}") for m in METRICS]
            xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(METRICS))]
            ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=row["losses"])
        ax.set_xticks(range(len(METRICS)), [m.capitalize() for m in METRICS])
        ax.set_ylim(0, 100)
        ax.set_ylabel("%")
        ax.set_title(f"Stage I loss ablation · {ds}")
        ax.legend(fontsize=8, loc="lower right")
    return _save(fig, Path(path))


def scaling_series(runs: list[dict]) -> dict[tuple, list[dict]]:
    """Runs grouped by (method, llm, dataset) where the group spans at least two edit counts."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if isinstance(r.get("num_edits"), int):
            groups[(r.get("method"), r.get("llm"), r.get("dataset"))].append(r)
    return {k: sorted(v, key=lambda r: r["num_edits"]) for k, v in groups.items()
            if len({r["num_edits"] for r in v}) >= 2}


def scaling_curve(runs: list[dict], path: str | Path) -> Path:
    """Rel/Gen/Loc/Avg against the number of edits (paper Fig. 5), one panel per method/LLM/dataset.
    Several runs at the same N (e.g. seeds) are averaged."""
    series = scaling_series(runs)
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.8), squeeze=False)
    for ax, ((method, llm, dataset), group) in zip(axes[0], series.items()):
        by_n: dict[int, list[dict]] = defaultdict(list)
        for r in group:
            by_n[r["num_edits"]].append(r)
        ns = sorted(by_n)
        for m in METRICS:
            ax.plot(ns, [sum(r[m] for r in by_n[n]) / len(by_n[n]) for n in ns], marker="o", label=m.capitalize(),
                    linewidth=2.5 if m == "avg" else 1.5)
        ax.set_xlabel("number of edits")
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.set_title(f"{method} · {llm} · {dataset}")
        ax.legend(fontsize=8)
    return _save(fig, Path(path))


# ---- t-SNE of the memory modality (paper Fig. 4) -------------------------------------------------
def prompt_groups(memory_dir: Path, max_points: int, seed: int = 0) -> dict[str, list[str]]:
    """In-scope and out-of-scope prompts for one memory, at most `max_points` per group.

    In-scope: the edit prompts (trained) and their paraphrases (never trained). Out-of-scope: the
    prompts of non-edited records that Stage I saw as O (rebuilt from the run's data config when
    the memory sits in a run directory) and the locality prompts of the edits (never trained).
    """
    from data.records import record_from_dict
    from mindbridge.artifacts import read_facts
    facts = [record_from_dict(f) for f in read_facts(memory_dir)]
    groups = {"in-scope: edit prompts": [r.prompt for r in facts],
              "in-scope: paraphrases (unseen)": [p for r in facts for p in r.rephrase_prompts]}
    stream = _out_of_scope_stream(memory_dir)
    if stream:
        groups["out-of-scope: non-edited records"] = stream
    groups["out-of-scope: locality prompts (unseen)"] = [p for r in facts for p in r.loc_prompts]
    rng = random.Random(seed)
    return {k: (rng.sample(v, max_points) if len(v) > max_points else v) for k, v in groups.items() if v}


def _out_of_scope_stream(memory_dir: Path) -> list[str]:
    """The O prompts of the run that wrote this memory (same data options, same split)."""
    import yaml
    config = memory_dir.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return []
    data = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data")
    if not data:
        return []
    from data.datamodule import EditDataModule
    dm = EditDataModule(**data)
    dm.setup()
    return [o.prompt for o in dm.out_of_scope]


def tsne_features(memory_dir: Path, max_points: int = 500, seed: int = 0) -> tuple[Any, list[str], dict]:
    """2-D t-SNE of the memory encoder's pooled features, the group of each point, and how well
    in-scope and out-of-scope separate in the encoder's own space (silhouette, cosine)."""
    import numpy as np
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    from mindbridge.artifacts import load_memory
    encoder, manifest = load_memory(memory_dir)
    groups = prompt_groups(memory_dir, max_points, seed)
    labels = [g for g, texts in groups.items() for _ in texts]
    feats = encoder.encode([t for texts in groups.values() for t in texts]).float().numpy()
    in_scope = np.array([g.startswith("in-scope") for g in labels])
    xy = TSNE(n_components=2, perplexity=min(30.0, (len(feats) - 1) / 3), init="pca",
              random_state=seed).fit_transform(feats)
    stats = {"memory": str(memory_dir), "encoder": manifest.get("encoder"), "points": {g: len(t) for g, t in groups.items()},
             "silhouette_in_vs_out_cosine": float(silhouette_score(feats, in_scope, metric="cosine"))
             if 1 < in_scope.sum() < len(in_scope) - 1 else None}
    return xy, labels, stats


def tsne_figure(memories: list[tuple[str, Path]], path: str | Path, max_points: int = 500,
                seed: int = 0) -> tuple[Path, list[dict]]:
    """One t-SNE panel per (title, memory dir); returns the PNG and per-memory statistics."""
    styles = {"in-scope: edit prompts": ("tab:blue", "o"), "in-scope: paraphrases (unseen)": ("tab:cyan", "^"),
              "out-of-scope: non-edited records": ("tab:red", "o"),
              "out-of-scope: locality prompts (unseen)": ("tab:orange", "^")}
    fig, axes = plt.subplots(1, len(memories), figsize=(5 * len(memories), 4.8), squeeze=False)
    all_stats = []
    for ax, (title, memory_dir) in zip(axes[0], memories):
        xy, labels, stats = tsne_features(Path(memory_dir), max_points, seed)
        stats["title"] = title
        all_stats.append(stats)
        for group, (color, marker) in styles.items():
            idx = [i for i, g in enumerate(labels) if g == group]
            if idx:
                ax.scatter(xy[idx, 0], xy[idx, 1], s=6, c=color, marker=marker, alpha=0.6, label=group)
        sil = stats["silhouette_in_vs_out_cosine"]
        ax.set_title(f"{title}" + (f"\nsilhouette I vs O = {sil:.2f}" if sil is not None else ""), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=7, loc="best", markerscale=2)
    fig.suptitle("Memory encoder features (t-SNE): in-scope vs out-of-scope", fontsize=11)
    return _save(fig, Path(path)), all_stats
