"""Entry point: `python train.py [stage=...] [llm=...] [encoder=...] [data=...] [key=value ...]`.

With no arguments it runs the main job (pretrain a memory on 200 ZsRE edits, bridge it to
SmolLM2, evaluate) on the embedded defaults and prints the pre-/post-edit table.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import hydra
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can fix (bad data, missing model, mismatched artifact): one sentence, exit 2."""
    from data.records import DataFileNotFoundError, DataFormatError
    from mindbridge.artifacts import ArtifactError
    from mindbridge.loading import ModelUnavailableError
    return (DataFormatError, DataFileNotFoundError, ArtifactError, ModelUnavailableError)


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run the configured stage in-process (tests call this with a composed config)."""
    from lit_modules.registry import run
    return run(cfg, Path(run_dir))


def print_table(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"{metrics.get('method')} · {metrics.get('llm')} · {metrics.get('dataset')} · "
                        f"{metrics.get('num_edits')} edits  (EasyEdit token accuracy, %)")
    for col in ("", "Rel", "Gen", "Loc", "Avg"):
        table.add_column(col, justify="right")

    def fmt(key: str) -> str:
        v = metrics.get(key)
        return f"{v:.2f}" if isinstance(v, (int, float)) else "–"
    table.add_row("pre-edit", fmt("pre_rel"), fmt("pre_gen"), "100.00", "–")
    table.add_row("post-edit", fmt("rel"), fmt("gen"), fmt("loc"), fmt("avg"))
    table.add_row("post-edit, exact match", fmt("rel_em"), fmt("gen_em"), fmt("loc_em"), "–")
    Console().print(table)
    times = ", ".join(f"{k} {metrics[k]:.1f}s" for k in ("pretrain_seconds", "bridge_seconds", "eval_seconds")
                      if isinstance(metrics.get(k), (int, float)))
    Console().print(f"time: {times}")


def unknown_group_option(argv: list[str], config_dir: str | Path = CONFIG_DIR) -> str | None:
    """One sentence for a `group=name` override whose name has no config file, else None.

    Hydra would stop too, but with a multi-line message; this names the choices in one line.
    """
    config_dir = Path(config_dir)
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        group = key.split("@", 1)[0]
        if not sep or "/" in group or not (config_dir / group).is_dir():
            continue
        if value in ("", "null") or "${" in value:
            continue
        # Multirun sweeps (`-m llm=a,b`) name several choices; each must exist.
        for name in value.strip("[]").split(","):
            if not (config_dir / group / f"{name}.yaml").is_file():
                choices = sorted(f.stem for f in (config_dir / group).glob("*.yaml"))
                return f"unknown {group} '{name}'; the choices are: {', '.join(choices)}."
    return None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    run_dir = cfg.run_dir
    try:
        metrics = train(cfg, run_dir)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except ValueError as exc:
        # Configuration values the code rejects (e.g. data.num_edits larger than the file).
        if "\n" in str(exc) or not str(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if cfg.get("print_table", True) and "rel" in metrics:
        print_table(metrics)
    print(f"metrics: {Path(run_dir) / 'metrics.json'}")


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    problem = unknown_group_option(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
