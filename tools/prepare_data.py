#!/usr/bin/env python
"""Validate a GRACE training file, filter it by templated prompt length and split off a test part.

The code is :mod:`megatron_grace.cli.prepare_data` (installed as ``grace-prepare-data``);
this file keeps ``python tools/prepare_data.py`` working."""
import sys

from megatron_grace.cli.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
