"""Hugging Face ↔ Megatron-Core checkpoint conversion, as library functions: the CLI (``tools/convert_hf.py``,
``megatron_grace/cli/convert_hf.py``) parses flags and calls these, and training's ``--export-hf`` calls
:func:`export_to_hf` on the live model. It lives on the checkpoint side: it reads and writes checkpoints with
:mod:`.dist_checkpoint` and HF folders with :mod:`megatron_grace.models.hf_io`, so ``models/`` never imports
checkpointing.

* :func:`hf_to_mcore_checkpoint`: an HF folder → a ``dist_checkpointing`` checkpoint (iteration 0), layout-free.
* :func:`mcore_checkpoint_to_hf`: a checkpoint written at any TP/PP layout → an HF folder (one process).
* :func:`export_to_hf`: the model of a running job, spread over its TP/PP ranks → an HF folder written by global
  rank 0, without reading a checkpoint: TP shards are all-gathered within the first data-parallel replica and the
  pipeline stages gathered to its first stage, so only rank 0 ever holds the whole model, on the host.

Tensors keep their dtype: HF → Megatron → HF is bit-identical.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..models.builder import build_gpt_model, make_transformer_config
from ..models.config import ModelArchitecture
from ..models.hf_io import load_hf_model, load_hf_weights, save_hf_model
from ..models.state_dict import global_name, local_spec_name, mcore_to_hf
from ..utils import unwrap
from .dist_checkpoint import CheckpointError, load_checkpoint, read_checkpoint_meta, resolve_checkpoint, save_checkpoint

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class OutputNotEmptyError(FileExistsError):
    pass


def prepare_output(path: str | Path, overwrite: bool) -> Path:
    """An empty folder at ``path``; a non-empty one is replaced only with ``overwrite``."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise OutputNotEmptyError(f"--save {path} is not empty; pass --overwrite to replace it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def hf_to_mcore_checkpoint(hf_path: str | Path, save: str | Path, *, overwrite: bool = False) -> Path:
    """Write the HF folder ``hf_path`` as a Megatron checkpoint under ``save`` (in the HF weights' dtype, with the
    tokenizer). Returns the iteration folder."""
    hf_path = Path(hf_path)
    arch, hf_state = load_hf_model(hf_path)
    source_dtype = next(iter(hf_state.values())).dtype
    prepare_output(save, overwrite)
    model = build_gpt_model(arch, make_transformer_config(arch, params_dtype=source_dtype))
    load_hf_weights(model, hf_state, arch)
    return save_checkpoint(save, 0, model, arch=arch, tokenizer_dir=hf_path,
                           run_state={"source": str(hf_path.resolve())})


def mcore_checkpoint_to_hf(load: str | Path, save: str | Path, *, dtype: str | None = None,
                           overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write the checkpoint ``load`` (a ``--save`` directory: its latest checkpoint; or one ``iter_*`` folder) as
    an HF folder ``save``, in ``dtype`` (default: the model's). Returns the checkpoint folder read."""
    checkpoint = resolve_checkpoint(load)
    if checkpoint is None:
        raise CheckpointError(f"--load {load}: no checkpoint found (no {load}/latest_checkpointed_iteration.txt)")
    arch = ModelArchitecture.from_dict(read_checkpoint_meta(checkpoint)["architecture"])
    model = build_gpt_model(arch, make_transformer_config(arch, params_dtype=DTYPES[dtype or arch.torch_dtype]))
    load_checkpoint(checkpoint, model, arch=arch)
    global_state = {name: tensor for name, tensor in model.state_dict().items() if not name.endswith("_extra_state")}
    prepare_output(save, overwrite)
    tokenizer_dir = checkpoint / "tokenizer"
    save_hf_model(save, arch, mcore_to_hf(global_state, arch),
                  tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None, max_shard_bytes=max_shard_bytes)
    return checkpoint


@torch.no_grad()
def gather_global_state(model) -> dict[str, torch.Tensor] | None:
    """The global Megatron state dict (local-spec names, global layer numbers, host tensors) of a model spread over
    TP and PP ranks, on global rank 0; None on every other rank. Collective over the first data-parallel replica's
    ranks (the others return at once). The inverse of :func:`~.state_dict.load_global_state_into_model`."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if parallel_state.get_data_parallel_rank() != 0:
        return None
    module = unwrap(model)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    offset = get_transformer_layer_offset(module.config)
    stage = {}
    for local_name, param in module.named_parameters():
        full = param.detach()
        if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(full) for _ in range(tp_size)]
            dist.all_gather(parts, full.contiguous(), group=tp_group)
            if local_name.endswith("mlp.linear_fc1.weight"):  # each shard is [gate shard; up shard]
                gates, ups = zip(*(part.chunk(2) for part in parts))
                full = torch.cat([torch.cat(gates, param.partition_dim), torch.cat(ups, param.partition_dim)])
            else:
                full = torch.cat(parts, param.partition_dim)
        stage[local_spec_name(global_name(local_name, offset))] = full.cpu()
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    stages = [stage]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        pipeline_group = parallel_state.get_pipeline_model_parallel_group()
        first_stage = parallel_state.get_pipeline_model_parallel_first_rank()
        stages = [None] * dist.get_world_size(pipeline_group) if dist.get_rank() == first_stage else None
        dist.gather_object(stage, stages, dst=first_stage, group=pipeline_group)
    if dist.get_rank() != 0:
        return None
    return {name: tensor for part in stages for name, tensor in part.items()}


def export_to_hf(model, arch: ModelArchitecture, save: str | Path, *, tokenizer_dir: str | Path | None = None,
                 max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write the running model (any TP/PP/DP layout) as an HF folder ``save`` (replaced if present) from global
    rank 0, in the source HF model's dtype (``arch.torch_dtype``, as :func:`mcore_checkpoint_to_hf` by default).
    Collective: every rank calls it; returns after rank 0 has written."""
    global_state = gather_global_state(model)
    if global_state is not None:
        dtype = DTYPES[arch.torch_dtype]
        hf_state = {name: tensor.to(dtype) for name, tensor in mcore_to_hf(global_state, arch).items()}
        prepare_output(save, overwrite=True)
        save_hf_model(save, arch, hf_state, tokenizer_dir=tokenizer_dir, max_shard_bytes=max_shard_bytes)
    dist.barrier()
