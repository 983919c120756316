#!/usr/bin/env python
"""Evaluate GRACE encoders on MTEB (2.x) and compare them.

The code is :mod:`megatron_grace.cli.eval_mteb` (installed as ``grace-eval``);
this file keeps ``python tools/eval_mteb.py`` working."""
import sys

from megatron_grace.cli.eval_mteb import main

if __name__ == "__main__":
    sys.exit(main())
