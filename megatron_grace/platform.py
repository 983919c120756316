"""Distributed start-up: torch.distributed with the right backend, Megatron's parallel state, seeds. Without CUDA it
first applies :mod:`megatron_grace.cpu_compat`, so the same Megatron-Core code paths run on CPU with gloo.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .cpu_compat import apply_cpu_fallbacks
from .config import ParallelConfig, TrainingConfig
from .utils import free_port


def has_cuda() -> bool:
    return torch.cuda.is_available()


@dataclass(frozen=True)
class ParallelLayout:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} × --pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size}"
            )
        return world_size // model_parallel


def process_group_backend(cuda: bool) -> str:
    """The torch.distributed backend: NCCL for CUDA tensors and gloo for CPU ones on a CUDA machine, gloo without.

    A bare ``"nccl"`` serves CUDA tensors only, and a few collectives of a step are on small host tensors (the NaN/Inf
    guard's flags, the checkpoint size estimate, metric objects): they need a backend for the ``cpu`` device type.
    Subgroups (Megatron's TP/PP/DP groups) inherit the mapping.
    """
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def initialize_distributed(layout: ParallelLayout, *, seed: int = TrainingConfig.seed,
                           timeout_minutes: float = ParallelConfig.distributed_timeout_minutes,
                           backend: str | None = None) -> None:
    """Start torch.distributed (:func:`process_group_backend` unless ``backend`` is given) and Megatron's parallel
    state, and seed all RNGs.

    Reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); a plain ``python`` start is a
    world of one.
    """
    from megatron.core import parallel_state

    if not has_cuda():
        apply_cpu_fallbacks()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if has_cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend or process_group_backend(has_cuda()),
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    layout.data_parallel_size(dist.get_world_size())
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_model_parallel_size,
            pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
            distributed_timeout_minutes=int(max(1, timeout_minutes)),
        )
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; Megatron's tensor-parallel RNG tracker gets per-TP-rank streams."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if has_cuda():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        # The default tracker snapshots CUDA generator states; the inference tracker keeps CPU ones.
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        tensor_parallel.get_cuda_rng_tracker().add("model-parallel-rng", seed + 2718)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")



def sequence_length_multiple(parallel) -> int:
    """What every sequence width must be a multiple of: sequence parallelism splits the sequence over the TP ranks
    (``parallel``: the config's ParallelConfig)."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size() if parallel.sequence_parallel else 1
