"""Run-time guards of a training job.

* :class:`NonFiniteGuard`: NaN/Inf in the rewards, the loss or the gradients skips the optimizer update (every rank
  agrees, the log says why and on which ranks); ``--max-nonfinite-steps`` such steps in a row stop the run.
  :func:`check_finite_weights` refuses to save a checkpoint whose weights are not finite.
* :func:`check_save_location`: ``--save`` must be writable and have room for a checkpoint before training starts.
* :class:`StallWatchdog`: a thread per rank that ends the job when one stage of a step (rollout, forward, reward,
  update, save) runs longer than ``--distributed-timeout-minutes``, naming the stage, instead of waiting forever.

The fault-injection tests trip these guards through :mod:`megatron_grace.fault_injection`.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import fault_injection
from .utils import global_rank

STAGES = ("rollout", "forward", "reward", "update", "save")
NONFINITE_SOURCES = ("reward", "loss", "grad")
# Bytes per parameter in a checkpoint besides the weights themselves: fp32 main copy + Adam's two moments.
OPTIMIZER_BYTES_PER_PARAM = 12
SAVE_SPACE_MARGIN = 1.2


class NonFiniteError(RuntimeError):
    pass


class SaveLocationError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------- NaN / Inf
def _ranks_with(flag: bool) -> list[int]:
    """The ranks on which ``flag`` holds (one small all-gather, so every rank takes the same decision)."""
    flags = torch.tensor([float(flag)])
    if not dist.is_initialized():
        return [0] if flag else []
    gathered = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flags)
    return [rank for rank, value in enumerate(gathered) if value.item()]


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class NonFiniteGuard:
    """Decides, identically on every rank, whether an optimizer update may be applied, and stops the run after
    ``max_consecutive`` steps in a row that skipped an update."""

    def __init__(self, max_consecutive: int, log=print):
        self.max_consecutive = max_consecutive
        self.log = log
        self.consecutive = 0
        self.step_skips: list[str] = []

    def check(self, step: int, what: str, local_values) -> bool:
        """True if ``local_values`` (tensors, possibly none on this rank) are finite on every rank; otherwise the
        update is to be skipped, and the reason is logged and remembered for the step."""
        bad_ranks = _ranks_with(not _all_finite(local_values))
        if not bad_ranks:
            return True
        reason = f"non-finite {what} on rank(s) {', '.join(map(str, bad_ranks))}"
        self.step_skips.append(reason)
        self.log(f"WARNING: step {step}: {reason}; optimizer update skipped")
        return False

    def check_gradients(self, step: int, model) -> bool:
        """Before ``optimizer.step()`` (which clips with the norm and applies the update in one call): the local
        gradient buffers hold this rank's reduced shard and its own contributions, so a NaN/Inf anywhere in the
        global gradient shows on at least one rank."""
        grads = [p.main_grad for p in model.parameters() if getattr(p, "main_grad", None) is not None]
        return self.check(step, "gradient", grads)

    def finish_step(self, step: int) -> int:
        """Count the step's skipped updates; raise after ``max_consecutive`` steps in a row with one."""
        skipped, self.step_skips = len(self.step_skips), []
        self.consecutive = self.consecutive + 1 if skipped else 0
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"step {step}: {self.consecutive} steps in a row had non-finite rewards, losses or gradients "
                f"(--max-nonfinite-steps {self.max_consecutive}); stopping. The weights were never updated with "
                f"them: resume from the last checkpoint, e.g. with a lower --lr, or inspect the data of these steps")
        return skipped


def check_finite_weights(model, iteration: int) -> None:
    """Refuse to write a checkpoint with NaN/Inf weights (collective: every rank raises together)."""
    bad_ranks = _ranks_with(not _all_finite(p.detach() for p in model.parameters()))
    if bad_ranks:
        raise NonFiniteError(f"refusing to save iteration {iteration}: non-finite weights on rank(s) "
                             f"{', '.join(map(str, bad_ranks))}; the previous checkpoint stays the latest")


# ---------------------------------------------------------------------------------------------------- --save
def checkpoint_size_estimate(model, model_parallel_group=None) -> int:
    """Bytes of one checkpoint: weights in their dtype plus the fp32 optimizer state, over the whole model."""
    local = sum(p.numel() * (p.element_size() + OPTIMIZER_BYTES_PER_PARAM) for p in model.parameters())
    total = torch.tensor([float(local)])
    if dist.is_initialized():
        dist.all_reduce(total, group=model_parallel_group)
    return int(total.item())


def check_save_location(save_dir: str | Path, required_bytes: int) -> None:
    """Before training: ``--save`` can be created and written to, and has room for a checkpoint (with a margin).
    Every rank checks (each writes its own probe file), so all fail together."""
    save_dir = Path(save_dir)
    probe = save_dir / f".write_probe_rank{global_rank()}"
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"probe")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        raise SaveLocationError(f"--save {save_dir} is not writable: {error}") from error
    free = shutil.disk_usage(save_dir).free
    needed = int(required_bytes * SAVE_SPACE_MARGIN)
    if free < needed:
        raise SaveLocationError(f"--save {save_dir} has {free / 1e9:.2f} GB free, but a checkpoint needs about "
                                f"{needed / 1e9:.2f} GB")


# ---------------------------------------------------------------------------------------------------- hangs
class StallWatchdog:
    """Ends this process when one stage lasts longer than ``timeout_minutes``.

    A rank that stalls (or waits in a collective on a rank that stalled) would otherwise block the job until the
    scheduler kills it, with no word on where. The thread prints the stage, the step and every thread's stack, then
    exits; torchrun then stops the other ranks.
    """

    EXIT_CODE = 3
    # Speak before the process group's own timeout (the same setting) fails a waiting collective without a stage.
    DEADLINE_FRACTION = 0.9

    def __init__(self, timeout_minutes: float):
        self.timeout_s = timeout_minutes * 60.0
        self._current: tuple[str, int, float] | None = None
        thread = threading.Thread(target=self._watch, name="grace-stall-watchdog", daemon=True)
        thread.start()

    def enter(self, stage: str, step: int) -> None:
        """Start timing ``stage`` of ``step`` (ends the previous stage). Save faults strike inside the save instead
        (see :func:`save_fault_point`), so that a kill there leaves a half-written checkpoint."""
        self._current = (stage, step, time.monotonic())
        if stage != "save":
            fault_injection.point(stage, step)

    def idle(self) -> None:
        self._current = None

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 20)
        while True:
            time.sleep(poll)
            current = self._current
            if current is None:
                continue
            stage, step, since = current
            elapsed = time.monotonic() - since
            if elapsed > self.timeout_s * self.DEADLINE_FRACTION:
                print(f"ERROR: rank {global_rank()}: stage '{stage}' of step {step} has not finished after "
                      f"{elapsed:.1f} s (--distributed-timeout-minutes {self.timeout_s / 60:g}): this rank or one it waits for is "
                      f"stalled; ending the job. Stacks:", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(self.EXIT_CODE)


class StepPhases:
    """The stages of one training step, each timed and watched: ``with phases("rollout", step): ...`` tells the stall
    watchdog which stage runs and adds the stage's seconds to :attr:`seconds` (a fresh dict per step, after
    :meth:`begin_step`)."""

    def __init__(self, watchdog: StallWatchdog):
        self.watchdog = watchdog
        self.seconds: dict[str, float] = {}

    def begin_step(self) -> dict[str, float]:
        self.seconds = {}
        return self.seconds

    @contextlib.contextmanager
    def __call__(self, name: str, step: int):
        self.watchdog.enter(name, step)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

