"""Fault hooks for the fault-injection tests (tests/test_faults.py), kept in one module so that production code
calls them one way: ``fault_injection.point(stage, step)``, ``fault_injection.save_point(step)``,
``fault_injection.nonfinite(what, step, tensor)``. Each is inert unless its variable is set; ``step`` is the 1-based
step being run or saved::

        GRACE_FAULT_KILL=<stage>:<step>      the rank SIGKILLs itself on entering <stage> (save: after its shards are
                                             written, before the checkpoint is complete)
        GRACE_FAULT_STALL=<stage>:<step>     the rank sleeps forever at the same point
        GRACE_FAULT_SIGNAL=<stage>:<step>    the rank sends SIGTERM to its launcher's process group at the same point
                                             (torchrun's, as `kill -TERM -PGID` from outside would; torchrun starts
                                             each rank in a session of its own and forwards the signal to them);
                                             stage first_step: the step boundary before the launch's first step
        GRACE_FAULT_NONFINITE=<what>:<step>[,<what>:<step>...]
                                             reward -> NaN rewards, loss -> +Inf loss (gradients stay finite),
                                             grad -> NaN in one gradient
        GRACE_FAULT_RANK=<rank>              the rank the three above act on (default: the last rank)
        GRACE_FAULT_ENOSPC=<step>            saving that step raises "No space left on device" on every rank
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from .utils import global_rank


def _is_fault_rank() -> bool:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return global_rank() == int(os.environ.get("GRACE_FAULT_RANK", world - 1))


def _fault_targets(variable: str) -> set[tuple[str, int]]:
    """``{(what, step)}`` from ``what:step[,what:step...]``."""
    targets = set()
    for item in filter(None, os.environ.get(variable, "").split(",")):
        what, _, step = item.partition(":")
        targets.add((what.strip(), int(step)))
    return targets


def point(stage: str, step: int) -> None:
    """Kill, signal or stall this rank here if GRACE_FAULT_KILL / _SIGNAL / _STALL name ``stage`` and ``step``."""
    if not _is_fault_rank():
        return
    if (stage, step) in _fault_targets("GRACE_FAULT_KILL"):
        print(f"[fault] rank {global_rank()}: SIGKILL in stage '{stage}' of step {step}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if (stage, step) in _fault_targets("GRACE_FAULT_SIGNAL"):
        launcher_group = os.getpgid(os.getppid())
        print(f"[fault] rank {global_rank()}: SIGTERM to the launcher's process group {launcher_group} in stage "
              f"'{stage}' of step {step}", file=sys.stderr, flush=True)
        os.killpg(launcher_group, signal.SIGTERM)
        time.sleep(3)  # torchrun forwards the signal to this rank meanwhile: it has arrived when the stage goes on
    if (stage, step) in _fault_targets("GRACE_FAULT_STALL"):
        print(f"[fault] rank {global_rank()}: stalling in stage '{stage}' of step {step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)


def save_point(step: int) -> None:
    """The point inside a checkpoint save (shards written, checkpoint not yet complete) where save faults strike."""
    point("save", step)
    if os.environ.get("GRACE_FAULT_ENOSPC") == str(step):
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by GRACE_FAULT_ENOSPC={step})")


def nonfinite(what: str, step: int, tensor: torch.Tensor) -> None:
    """Add NaN (reward, grad) or +Inf (loss) to ``tensor`` in place if GRACE_FAULT_NONFINITE names it."""
    if (what, step) in _fault_targets("GRACE_FAULT_NONFINITE") and _is_fault_rank():
        tensor.add_(float("inf") if what == "loss" else float("nan"))
