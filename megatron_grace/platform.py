"""Distributed start-up and the CPU platform layer for Megatron-Core.

Megatron-Core 0.16.1 is written for CUDA: it allocates with ``device="cuda"``, asks ``torch.cuda.current_device()``,
checks ``param.type() == "torch.cuda.FloatTensor"``, times with CUDA events and seeds CUDA generators. To run the same
code paths on CPU with gloo (tests, CI, laptops), :func:`apply_cpu_fallbacks` redirects all of that to the CPU once per
process. With CUDA present it is never called, so GPU runs execute Megatron-Core unmodified.

The redirection has two parts:
* a ``TorchFunctionMode`` that rewrites CUDA device arguments of tensor factories and ``Tensor.cuda/.to`` calls to CPU
  and reports CPU tensors as ``torch.cuda.*Tensor`` to Megatron's optimizer type checks;
* patches of ``torch.cuda`` functions (``current_device``, events, streams, synchronize, RNG state). These are needed
  in addition to the mode because autograd runs backward functions (sequence-parallel gathers, for example) on its own
  thread, where the thread-local mode is not active.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from .utils import free_port

_CPU = torch.device("cpu")
_CUDA_TENSOR_TYPES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}
_fallbacks_applied = False


def has_cuda() -> bool:
    return torch.cuda.is_available()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes torch.cuda.current_device() (an int ordinal on real CUDA) as a device.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch call made while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Every torch call of the process passes through here: keep the common path (no kwargs to fix, not one of
        # the three special methods) to two checks.
        if kwargs:
            to_cpu, pinned = _is_cuda_device(kwargs.get("device")), kwargs.get("pin_memory")
            if to_cpu or pinned:
                kwargs = dict(kwargs)
                if to_cpu:
                    kwargs["device"] = _CPU
                if pinned:
                    kwargs["pin_memory"] = False
        else:
            kwargs = {}
        if func in _SPECIAL_METHODS:
            if func is torch.Tensor.cuda:
                return args[0]
            if func is torch.Tensor.type and len(args) == 1 and not kwargs:
                name = func(*args)
                return _CUDA_TENSOR_TYPES.get(name, name)
            if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


_SPECIAL_METHODS = frozenset((torch.Tensor.cuda, torch.Tensor.type, torch.Tensor.to))


class _InertCudaEvent:
    """Stands in for ``torch.cuda.Event``: CPU work is synchronous, so recording and waiting are no-ops."""

    def __init__(self, *args, **kwargs):
        self._time = None

    def record(self, stream=None):
        import time

        self._time = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event) -> float:
        return (end_event._time - self._time) * 1000.0


class _InertCudaStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _InertCudaEvent()


def apply_cpu_fallbacks() -> None:
    """Make Megatron-Core's CUDA-only code paths run on CPU. Idempotent; must not be called when CUDA exists."""
    global _fallbacks_applied
    if _fallbacks_applied:
        return
    assert not has_cuda(), "the CPU fallbacks are for machines without CUDA"
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.Event = _InertCudaEvent
    cuda.Stream = _InertCudaStream
    cuda.current_stream = lambda device=None: _InertCudaStream()
    cuda.default_stream = lambda device=None: _InertCudaStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.manual_seed = lambda seed: None
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    cuda.set_rng_state = lambda state, device=None: None
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_allocated = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    _patch_inference_cuda_checks()
    # Activated once for the life of the process (the mode stack is per thread; the main thread runs everything but
    # autograd's backward, which the torch.cuda patches above cover).
    _CudaToCpuMode().__enter__()
    _fallbacks_applied = True


def _patch_inference_cuda_checks() -> None:
    """Pipeline-parallel inference asserts its send/recv buffers are CUDA tensors; on CPU gloo they are not."""
    from megatron.core.inference import communication_utils

    communication_utils._is_cuda = lambda tensor: None


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


def initialize_distributed(layout: ParallelLayout, *, seed: int = 1234, timeout_minutes: float = 10.0,
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
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else _CPU

