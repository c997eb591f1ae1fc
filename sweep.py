"""Run a W&B sweep file offline: `python sweep.py sweeps/loss_ablation.yaml [--count N] [-- overrides]`.

See reporting/sweep.py; online, use `wandb sweep FILE` and `wandb agent ID` instead.
"""
import sys

from reporting.sweep import main

if __name__ == "__main__":
    sys.exit(main())
