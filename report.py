"""Paper-style tables and figures from runs: `python report.py DIR [DIR ...] [--out DIR] [--logger wandb]`.

See reporting/report.py.
"""
import sys

from reporting.report import main

if __name__ == "__main__":
    sys.exit(main())
