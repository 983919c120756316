"""The CPU compatibility layer for Megatron-Core: its CUDA-only code paths, redirected to the CPU.

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

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_CUDA_TENSOR_TYPES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}
_fallbacks_applied = False


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
    assert not torch.cuda.is_available(), "the CPU fallbacks are for machines without CUDA"
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
