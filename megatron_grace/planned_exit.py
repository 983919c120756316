"""Planned exits: stop at a step boundary with the last completed step saved, exit 0, and resume with the same command.

A stop is requested by any of

* a signal, with ``--exit-signal-handler``: SIGTERM or SIGUSR1 on any rank (Megatron-LM's flag);
* the request file ``<save>/exit_requested``, which global rank 0 looks for at every step boundary: how a SLURM batch
  shell, which holds no training process, asks every node at once (``examples/slurm/pretrain_grace.sbatch`` writes it
  when SLURM signals the job ahead of its time limit), and how a user stops a run on purpose (``touch`` it);
* ``--exit-duration-in-mins N``: the trainer has run N minutes (set-up included, as in Megatron-LM);
* ``--exit-interval N``: after every N-th step;
* the rationale collapse alarm, with ``--stop-on-collapse`` (``grpo/collapse.py``).

The step in flight when a request arrives is finished, never abandoned: a signal only sets a flag, and the ranks agree
at the next step boundary through one all-reduce (the largest request code wins), so every rank stops after the same
step and saves it. Duration and interval requests count only after a step of this launch, so a resumed run makes
progress before it stops again. The outcome goes to ``<save>/exit_status.json`` (written last, atomically), which the
batch script reads to decide whether to requeue the job.
"""
from __future__ import annotations

import enum
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .config import CheckpointConfig
from .utils import global_rank

REQUEST_FILE = "exit_requested"
STATUS_FILE = "exit_status.json"
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitReason(enum.IntEnum):
    """Why a run stops early; a larger value wins when ranks see different requests at the same boundary."""

    NONE = 0
    INTERVAL = 1
    DURATION = 2
    REQUEST_FILE = 3
    SIGNAL = 4
    COLLAPSE = 5


class PlannedExit:
    def __init__(self, checkpoint: CheckpointConfig, *, started: float, first_iteration: int):
        """``started``: ``time.monotonic()`` when the trainer started; ``first_iteration``: the step count it
        resumed from (0 on a fresh start)."""
        self.config = checkpoint
        self.started = started
        self.first_iteration = first_iteration
        self.signal_name: str | None = None
        self.collapsed = False
        if checkpoint.exit_signal_handler:
            for signum in HANDLED_SIGNALS:
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            print(f"[rank {global_rank()}] {self.signal_name}: a planned exit after the step in flight "
                  f"(--exit-signal-handler)", flush=True)

    @property
    def request_file(self) -> Path | None:
        return Path(self.config.save) / REQUEST_FILE if self.config.save else None

    def request_on_collapse(self) -> None:
        self.collapsed = True

    def _local_request(self, iteration: int) -> ExitReason:
        if self.collapsed:
            return ExitReason.COLLAPSE
        if self.signal_name is not None:
            return ExitReason.SIGNAL
        if global_rank() == 0 and self.request_file is not None and self.request_file.exists():
            return ExitReason.REQUEST_FILE
        if iteration > self.first_iteration:
            minutes = self.config.exit_duration_in_mins
            if minutes is not None and time.monotonic() - self.started >= 60 * minutes:
                return ExitReason.DURATION
            if self.config.exit_interval and iteration % self.config.exit_interval == 0:
                return ExitReason.INTERVAL
        return ExitReason.NONE

    def requested(self, iteration: int) -> ExitReason:
        """At the boundary after step ``iteration``: the request all ranks agree on (one all-reduce on the host:
        the process group's gloo side, no device synchronisation)."""
        code = torch.tensor([int(self._local_request(iteration))], dtype=torch.int32)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return ExitReason(int(code.item()))

    def describe(self, reason: ExitReason) -> str:
        return {ExitReason.SIGNAL: f"{self.signal_name or 'a signal to another rank'} received (--exit-signal-handler)",
                ExitReason.REQUEST_FILE: f"{self.request_file} found",
                ExitReason.DURATION: f"--exit-duration-in-mins {self.config.exit_duration_in_mins} reached",
                ExitReason.INTERVAL: f"--exit-interval {self.config.exit_interval}",
                ExitReason.COLLAPSE: "the rationale collapse alarm (--stop-on-collapse)"}[reason]

    def finish(self, reason: ExitReason, iteration: int, train_iters: int) -> None:
        """After the loop, with the checkpoint of ``iteration`` complete: rank 0 removes the request file it acted on
        (the resumed run must not stop at once), writes the outcome for the batch script and says what happened."""
        if global_rank() != 0:
            return
        message = self._outcome(reason, iteration, train_iters)
        if message:
            print(message, flush=True)
        if not self.config.save:
            return
        if reason is not ExitReason.NONE and self.request_file.exists():
            self.request_file.unlink()
        status = {"reason": reason.name.lower(), "iteration": iteration, "train_iters": train_iters,
                  "finished": iteration >= train_iters, "signal": self.signal_name,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path = Path(self.config.save) / STATUS_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(status) + "\n")
        os.replace(temporary, path)

    def _outcome(self, reason: ExitReason, iteration: int, train_iters: int) -> str | None:
        if reason is ExitReason.NONE:
            if self.signal_name is None:
                return None
            return (f"{self.signal_name} received during the last step or its save: the run is complete "
                    f"(step {iteration} of {train_iters} saved in {self.config.save})")
        resume = f"run the same command to resume (--load {self.config.load or self.config.save})"
        if iteration == self.first_iteration:
            kept = f"the latest checkpoint stays step {iteration}" if iteration else "there is no checkpoint yet"
            return (f"planned exit before step {iteration + 1} of {train_iters}: {self.describe(reason)}; nothing "
                    f"was trained in this launch and nothing is saved ({kept}); {resume}")
        return (f"planned exit after step {iteration} of {train_iters}: {self.describe(reason)}; step {iteration} "
                f"is saved in {self.config.save}; {resume}")
