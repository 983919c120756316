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
import shutil
import sys
import time
from pathlib import Path

from megatron_grace.console import configure_console

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _prepare_output(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            sys.exit(f"error: --save {path} is not empty; pass --overwrite to replace it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def _dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def hf_to_mcore(args) -> None:
    from megatron_grace.checkpointing import save_checkpoint
    from megatron_grace.models.builder import build_gpt_model, make_transformer_config
    from megatron_grace.models.hf_io import load_hf_model, load_hf_weights

    hf_path = Path(args.hf_path)
    arch, hf_state = load_hf_model(hf_path)
    source_dtype = next(iter(hf_state.values())).dtype
    _prepare_output(Path(args.save), args.overwrite)
    model = build_gpt_model(arch, make_transformer_config(arch, params_dtype=source_dtype))
    load_hf_weights(model, hf_state, arch)
    out = save_checkpoint(args.save, 0, model, arch=arch, tokenizer_dir=hf_path,
                          run_state={"source": str(hf_path.resolve())})
    print(f"wrote {out} ({arch.hf_architecture}, {arch.num_layers} layers, {source_dtype})")


def mcore_to_hf(args) -> None:
    from megatron_grace.checkpointing import CheckpointError, load_checkpoint, read_checkpoint_meta, resolve_checkpoint
    from megatron_grace.models.builder import build_gpt_model, make_transformer_config
    from megatron_grace.models.config import ModelArchitecture
    from megatron_grace.models.hf_io import save_hf_model
    from megatron_grace.models.state_dict import mcore_to_hf as adapt

    checkpoint = resolve_checkpoint(args.load)
    if checkpoint is None:
        raise CheckpointError(f"--load {args.load}: no checkpoint found (no {args.load}/latest_checkpointed_iteration.txt)")
    arch = ModelArchitecture.from_dict(read_checkpoint_meta(checkpoint)["architecture"])
    dtype = _dtype(args.dtype or arch.torch_dtype)
    model = build_gpt_model(arch, make_transformer_config(arch, params_dtype=dtype))
    load_checkpoint(checkpoint, model, arch=arch)
    global_state = {name: tensor for name, tensor in model.state_dict().items() if not name.endswith("_extra_state")}
    _prepare_output(Path(args.save), args.overwrite)
    tokenizer_dir = checkpoint / "tokenizer"
    save_hf_model(args.save, arch, adapt(global_state, arch),
                  tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None,
                  max_shard_bytes=int(args.max_shard_size_gb * 1024**3))
    print(f"wrote {args.save} from {checkpoint}")


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

    from megatron_grace.platform import ParallelLayout, destroy_distributed, initialize_distributed

    from megatron_grace.checkpointing import CheckpointError
    from megatron_grace.models.config import UnsupportedModelError
    from megatron_grace.models.state_dict import StateDictMismatchError

    start = time.perf_counter()
    initialize_distributed(ParallelLayout())
    try:
        (hf_to_mcore if args.command == "hf-to-mcore" else mcore_to_hf)(args)
    except (UnsupportedModelError, StateDictMismatchError, CheckpointError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    finally:
        destroy_distributed()
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
