#!/usr/bin/env python
"""Build the offline evaluation suite and print its folder.

The code is :mod:`megatron_grace.cli.build_local_suite`;
this file keeps ``python tools/build_local_suite.py`` working."""
import sys

from megatron_grace.cli.build_local_suite import main

if __name__ == "__main__":
    sys.exit(main())
