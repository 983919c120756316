#!/usr/bin/env python
"""Build the bundled sample data in examples/data/ from WordNet 3.0.

The code is :mod:`megatron_grace.cli.build_sample_data`;
this file keeps ``python tools/build_sample_data.py`` working."""
import sys

from megatron_grace.cli.build_sample_data import main

if __name__ == "__main__":
    sys.exit(main())
