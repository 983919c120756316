#!/usr/bin/env python
"""Convert checkpoints between Hugging Face folders and Megatron-Core ``dist_checkpointing`` checkpoints.

The code is :mod:`megatron_grace.cli.convert_hf` (installed as ``grace-convert``);
this file keeps ``python tools/convert_hf.py`` working."""
import sys

from megatron_grace.cli.convert_hf import main

if __name__ == "__main__":
    sys.exit(main())
