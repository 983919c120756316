#!/usr/bin/env python
"""Rationales of a few texts and the similarities of their embeddings with and without them.

The code is :mod:`megatron_grace.cli.explain` (installed as ``grace-explain``);
this file keeps ``python tools/explain.py`` working."""
import sys

from megatron_grace.cli.explain import main

if __name__ == "__main__":
    sys.exit(main())
