"""Tooling around the training runs: an offline W&B sweep runner, the paper-style report and figures.

Nothing here trains: `sweep` launches `train.py` runs, `report` and `figures` read what the runs
wrote (`metrics.json`, `.hydra/config.yaml`, the memory directory).
"""
