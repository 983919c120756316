#!/usr/bin/env python
"""Plot GRACE training curves from one or more runs' ``metrics.jsonl`` and print a before/after summary.

The code is :mod:`megatron_grace.cli.plot_metrics` (installed as ``grace-plot``);
this file keeps ``python tools/plot_metrics.py`` working."""
import sys

from megatron_grace.cli.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())
