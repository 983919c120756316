"""Planned exits (``megatron_grace/planned_exit.py``): a signal, the request file, ``--exit-duration-in-mins`` or
``--exit-interval`` stop the run at a step boundary with the last completed step saved, and the same command resumes
to the uninterrupted run's metrics (tolerance 0).

Launches of ``python -m torch.distributed.run -m megatron_grace.train`` as users run it (tiny Qwen3, 5 GRPO steps,
``--save-interval`` larger than the run), each in its own session: a signal to "the launcher's process group" reaches
torchrun, which forwards it to every rank (each rank runs in a session of its own) and kills them 30 s later:

* two ranks (DP2): the reference; SIGTERM to the group in the rollout of step 3 (``--exit-signal-handler``) and the
  same command again; a chain in one run directory: ``--exit-interval 2`` (stops after 2), ``--exit-duration-in-mins``
  (after 3: duration counts only after a step of this launch), the request file present at the start (only rank 0
  reads it: nothing trained, nothing saved, the file removed), then to the end.
* one rank: ``--exit-duration-in-mins`` (after 1), ``--exit-interval 2`` (after 2), SIGTERM before the first step of
  a launch (nothing saved, the latest checkpoint untouched) and during the final save (the save completes).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_grace.checkpointing import resolve_checkpoint, verify_manifest
from megatron_grace.planned_exit import REQUEST_FILE, STATUS_FILE
from megatron_grace.testing import first_rows, stable_metrics, tiny_grpo_run
from megatron_grace.utils import free_port

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "train_supervised.jsonl"
TRAIN_ITERS = 5
TINY_DURATION = ["--exit-duration-in-mins", "1e-6"]  # reached at the first boundary after a step of the launch


@dataclass
class Launch:
    returncode: int
    output: str


@dataclass
class RunDir:
    path: Path

    def latest(self) -> int | None:
        latest = self.path / "latest_checkpointed_iteration.txt"
        return int(latest.read_text()) if latest.exists() else None

    def folders(self) -> list[str]:
        return sorted(p.name for p in self.path.glob("iter_*"))

    def status(self) -> dict:
        return json.loads((self.path / STATUS_FILE).read_text())

    def metrics(self) -> list[dict]:
        return [stable_metrics(json.loads(line)) for line in (self.path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smollm2_tokenizer_dir):
    root = tmp_path_factory.mktemp("planned_exit")
    _, flags = tiny_grpo_run(root, smollm2_tokenizer_dir, first_rows(DATA, 24, root / "train.jsonl"),
                             ppo_mini_batch_size=2, max_response_length=10)
    flags += ["--no-report", "--train-iters", str(TRAIN_ITERS), "--save-interval", "100"]
    return root, flags


def launch(workspace, run_dir: RunDir, *extra: str, nproc: int, faults: dict | None = None) -> Launch:
    """One torchrun launch in its own session (its process group is the launcher's), --save and --load the run
    directory."""
    _, flags = workspace
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(faults or {}))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", "megatron_grace.train", *flags, "--save", str(run_dir.path),
               "--load", str(run_dir.path), "--export-hf", *extra]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    output, _ = process.communicate(timeout=600)
    return Launch(process.returncode, output)


@pytest.fixture(scope="module")
def two_ranks(workspace):
    root, _ = workspace
    runs = {name: RunDir(root / name) for name in ("reference", "signalled", "chain")}
    results = {"runs": runs, "reference": launch(workspace, runs["reference"], nproc=2)}
    signalled = runs["signalled"]
    results["signalled"] = launch(workspace, signalled, "--exit-signal-handler", nproc=2,
                                  faults={"GRACE_FAULT_SIGNAL": "rollout:3"})
    results["signalled_state"] = (signalled.latest(), signalled.folders(), signalled.status())
    results["signalled_resumed"] = launch(workspace, signalled, "--exit-signal-handler", nproc=2)

    chain = runs["chain"]
    results["interval"] = launch(workspace, chain, "--exit-interval", "2", nproc=2)
    results["interval_state"] = (chain.latest(), chain.status(), (chain.path / "hf").exists())
    results["duration"] = launch(workspace, chain, *TINY_DURATION, nproc=2)
    results["duration_state"] = (chain.latest(), chain.status())
    (chain.path / REQUEST_FILE).write_text("stop, please\n")
    results["requested"] = launch(workspace, chain, nproc=2)
    results["requested_state"] = (chain.latest(), chain.status(), (chain.path / REQUEST_FILE).exists())
    results["to_the_end"] = launch(workspace, chain, nproc=2)
    return results


def test_sigterm_to_the_launchers_group_saves_the_step_in_flight_and_resumes_exactly(two_ranks):
    reference = two_ranks["reference"]
    assert reference.returncode == 0, reference.output[-4000:]
    runs = two_ranks["runs"]
    assert runs["reference"].folders() == ["iter_0000005"]
    signalled = two_ranks["signalled"]
    assert "SIGTERM to the launcher's process group" in signalled.output, signalled.output[-4000:]
    assert "planned exit after step 3 of 5: SIGTERM received (--exit-signal-handler)" in signalled.output, \
        signalled.output[-4000:]
    assert "run the same command to resume" in signalled.output
    latest, folders, status = two_ranks["signalled_state"]
    assert (latest, folders) == (3, ["iter_0000003"])  # --save-interval 100 would not have saved step 3
    assert status["reason"] == "signal" and status["iteration"] == 3 and not status["finished"]
    resumed = two_ranks["signalled_resumed"]
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "resumed from" in resumed.output and "at iteration 3" in resumed.output
    assert runs["signalled"].metrics() == runs["reference"].metrics()  # steps 4-5 too, tolerance 0
    assert runs["signalled"].status()["finished"]
    assert (runs["signalled"].path / "hf" / "config.json").is_file()  # the export follows the final step only


def test_exit_interval_duration_and_request_file_on_two_ranks(two_ranks):
    interval = two_ranks["interval"]
    assert interval.returncode == 0, interval.output[-4000:]
    assert "planned exit after step 2 of 5: --exit-interval 2" in interval.output
    latest, status, exported = two_ranks["interval_state"]
    assert latest == 2 and status["reason"] == "interval" and not exported

    duration = two_ranks["duration"]
    assert duration.returncode == 0, duration.output[-4000:]
    assert "planned exit after step 3 of 5: --exit-duration-in-mins 1e-06 reached" in duration.output
    assert two_ranks["duration_state"][0] == 3 and two_ranks["duration_state"][1]["reason"] == "duration"

    requested = two_ranks["requested"]
    assert requested.returncode == 0, requested.output[-4000:]
    assert "planned exit before step 4 of 5" in requested.output and "exit_requested found" in requested.output
    assert "nothing was trained in this launch and nothing is saved (the latest checkpoint stays step 3)" in \
        requested.output
    latest, status, file_left = two_ranks["requested_state"]
    assert latest == 3 and status["reason"] == "request_file" and not file_left

    assert two_ranks["to_the_end"].returncode == 0, two_ranks["to_the_end"].output[-4000:]
    chain, reference = two_ranks["runs"]["chain"], two_ranks["runs"]["reference"]
    assert chain.folders() == ["iter_0000002", "iter_0000003", "iter_0000005"]
    assert chain.metrics() == reference.metrics()


def test_one_rank_exit_flags_and_signals_at_the_edges(workspace):
    root, _ = workspace
    run = RunDir(root / "one_rank")
    duration = launch(workspace, run, *TINY_DURATION, "--train-iters", "3", nproc=1)
    assert duration.returncode == 0, duration.output[-4000:]
    assert "planned exit after step 1 of 3" in duration.output and run.latest() == 1

    interval = launch(workspace, run, "--exit-interval", "2", "--train-iters", "3", nproc=1)
    assert interval.returncode == 0, interval.output[-4000:]
    assert "planned exit after step 2 of 3: --exit-interval 2" in interval.output and run.latest() == 2

    # SIGTERM at the boundary before the launch's first step: nothing trained, nothing saved, checkpoint 2 intact.
    before = launch(workspace, run, "--exit-signal-handler", "--train-iters", "3", nproc=1,
                    faults={"GRACE_FAULT_SIGNAL": "first_step:3"})
    assert "planned exit before step 3 of 3: SIGTERM received" in before.output, before.output[-4000:]
    assert run.latest() == 2 and run.folders() == ["iter_0000001", "iter_0000002"]
    verify_manifest(resolve_checkpoint(run.path))

    # SIGTERM while the final checkpoint is being written: the save completes, the run is complete.
    during_save = launch(workspace, run, "--exit-signal-handler", "--train-iters", "3", nproc=1,
                         faults={"GRACE_FAULT_SIGNAL": "save:3"})
    assert "SIGTERM received during the last step or its save: the run is complete (step 3 of 3 saved" in \
        during_save.output, during_save.output[-4000:]
    assert run.latest() == 3 and not list(run.path.glob("*.tmp"))
    verify_manifest(resolve_checkpoint(run.path))
    assert run.status() | {"time": None} == {"reason": "none", "iteration": 3, "train_iters": 3, "finished": True,
                                             "signal": "SIGTERM", "time": None}
    assert [m["step"] for m in run.metrics()] == [1, 2, 3]
