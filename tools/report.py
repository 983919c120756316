#!/usr/bin/env python
"""Write a run's self-contained HTML report.

The code is :mod:`megatron_grace.cli.report` (installed as ``grace-report``);
this file keeps ``python tools/report.py`` working."""
import sys

from megatron_grace.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
