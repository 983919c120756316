"""What reaches the console: known-harmless third-party warnings filtered by exact message, and timed phase lines.

Megatron-Core, PyTorch and transformers warn about things a GRACE user cannot and need not act on (no Apex or
Transformer Engine on a CPU machine, deprecated collective names Megatron-Core still calls). Those messages, and only
those, are listed in :data:`KNOWN_HARMLESS_WARNINGS` and hidden; any other warning, ours included, still shows.
``--log-level debug`` (or ``MEGATRON_GRACE_LOG_LEVEL=debug``, which also covers warnings raised while modules are
imported, before the flags are parsed) shows everything.
"""
from __future__ import annotations

import logging
import os
import re
import time
import warnings
from contextlib import contextmanager

LOG_LEVELS = ("info", "debug")
LOG_LEVEL_ENV = "MEGATRON_GRACE_LOG_LEVEL"

# (category, exact message, why it is harmless). Matched as the whole message, not as a prefix.
KNOWN_HARMLESS_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to local implementations of "
     "multi_tensor_applier and multi_tensor_scale", "Megatron-Core's torch fallbacks are what runs without TE"),
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to local implementations of "
     "multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale", "same, for gradient clipping"),
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
     "torch.optim.AdamW is the optimizer we use without TE"),
    (UserWarning, "Apex is not installed. Falling back to Torch Norm", "our local spec uses torch's RMSNorm anyway"),
    (UserWarning, "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.",
     "Megatron-Core's TransformerConfig sets its own deprecated default; CUDA graphs are off"),
    (FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
     "`torch.distributed.reduce_scatter_single` instead.", "called inside Megatron-Core's DDP"),
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
     "`torch.distributed.all_gather_single` instead.", "called inside Megatron-Core's DDP and distributed optimizer"),
    (FutureWarning, "`load_state_dict` is deprecated and will be removed in future versions. Please use `load` "
     "instead.", "Megatron-Core's dist_checkpointing loader calls torch.distributed.checkpoint by its old name"),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor.",
     "Megatron-Core's checkpoints are built on torch's ShardedTensor"),
    # Megatron-Core's distributed optimizer zeroes `.grad` of its fp32 shard views, which are not leaves (its own
    # comment says the access "throws grad-access warning"); the gradients it uses live in the DDP buffers.
    (UserWarning, "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its .grad attribute "
     "won't be populated during autograd.backward(). If you indeed want the .grad field to be populated for a "
     "non-leaf Tensor, use .retain_grad() on the non-leaf Tensor. If you access the non-leaf Tensor by mistake, make "
     "sure you access the leaf Tensor instead. See github.com/pytorch/pytorch/pull/30531 for more information. "
     "(Triggered internally at", "fp32 training with Megatron-Core's distributed optimizer, GPU or CPU"),
)


def log_level(flag: str | None = None) -> str:
    """The ``--log-level`` flag if given, else ``$MEGATRON_GRACE_LOG_LEVEL``, else ``info``."""
    level = (flag or os.environ.get(LOG_LEVEL_ENV) or "info").lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} (from --log-level or ${LOG_LEVEL_ENV}): choose from {LOG_LEVELS}")
    return level


def configure_console(level: str | None = None) -> None:
    """Install the filters for ``info``; for ``debug`` remove them again and let library loggers speak at INFO.

    Idempotent. Runs once before Megatron-Core is imported (it warns at import time) and again after the flags."""
    level = log_level(level)
    _remove_known_filters()
    if level == "debug":
        warnings.simplefilter("default")
        logging.basicConfig(level=logging.INFO)
        os.environ.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
        return
    for category, message, _ in KNOWN_HARMLESS_WARNINGS:
        # The torch message ends in a build path after "Triggered internally at": match that part as a prefix.
        pattern = re.escape(message) + (".*" if message.endswith("(Triggered internally at") else r"\Z")
        warnings.filterwarnings("ignore", message=pattern, category=category)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # GGUF dequantisation and shard-writing bars
    except ImportError:
        pass


def _remove_known_filters() -> None:
    known = {message for _, message, _ in KNOWN_HARMLESS_WARNINGS}
    warnings.filters[:] = [entry for entry in warnings.filters
                           if not (entry[0] == "ignore" and entry[1] is not None
                                   and any(entry[1].pattern.startswith(re.escape(message)) for message in known))]


@contextmanager
def timed_phase(description: str, *, printer=print):
    """Print ``<description> in <seconds> s`` when the block ends, so the minutes before step 1 are accounted for."""
    start = time.perf_counter()
    yield
    printer(f"{description} in {time.perf_counter() - start:.1f} s")
