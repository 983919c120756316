"""Convert checkpoints between Hugging Face folders and Megatron-Core ``dist_checkpointing`` checkpoints.

    python tools/convert_hf.py hf-to-mcore --hf-path HF_DIR --save MCORE_DIR
    python tools/convert_hf.py mcore-to-hf --load MCORE_DIR --save HF_DIR

Runs in one CPU process. The Megatron checkpoint is layout-free: training loads it at any tensor/pipeline-parallel
size (dist_checkpointing reshards on load), and ``mcore-to-hf`` reads checkpoints written by training at any layout
(``--load`` may be a training ``--save`` directory, which exports its latest checkpoint, or one ``iter_*`` folder).
Tensors keep their dtype: HF → Megatron → HF is bit-identical.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from megatron_grace.console import configure_console

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main(argv=None) -> None:
    configure_console()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF folder → Megatron dist checkpoint")
    to_mcore.add_argument("--hf-path", required=True)
    to_mcore.add_argument("--save", required=True)
    to_mcore.add_argument("--overwrite", action="store_true")
    to_hf = sub.add_parser("mcore-to-hf", help="Megatron dist checkpoint → HF folder")
    to_hf.add_argument("--load", required=True, help="a --save directory of training/conversion or one iter_* folder")
    to_hf.add_argument("--save", required=True)
    to_hf.add_argument("--overwrite", action="store_true")
    to_hf.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                       help="export dtype (default: the source model's dtype)")
    to_hf.add_argument("--max-shard-size-gb", type=float, default=2.0)
    args = parser.parse_args(argv)

    from megatron_grace.checkpointing import (CheckpointError, OutputNotEmptyError, hf_to_mcore_checkpoint,
                                              mcore_checkpoint_to_hf)
    from megatron_grace.models.config import UnsupportedModelError
    from megatron_grace.models.state_dict import StateDictMismatchError
    from megatron_grace.platform import ParallelLayout, destroy_distributed, initialize_distributed

    start = time.perf_counter()
    initialize_distributed(ParallelLayout())
    try:
        if args.command == "hf-to-mcore":
            print(f"wrote {hf_to_mcore_checkpoint(args.hf_path, args.save, overwrite=args.overwrite)}")
        else:
            checkpoint = mcore_checkpoint_to_hf(args.load, args.save, dtype=args.dtype, overwrite=args.overwrite,
                                                max_shard_bytes=int(args.max_shard_size_gb * 1024**3))
            print(f"wrote {args.save} from {checkpoint}")
    except (UnsupportedModelError, StateDictMismatchError, CheckpointError, FileNotFoundError,
            OutputNotEmptyError) as error:
        sys.exit(f"error: {error}")
    finally:
        destroy_distributed()
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
