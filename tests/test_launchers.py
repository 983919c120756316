"""The real launchers, end to end on a tiny model (gloo on CPU).

* Multi-node: two launches of ``examples/pretrain_grace.sh`` with ``NNODES=2`` (``NODE_RANK`` 0 and 1,
  ``MASTER_ADDR=127.0.0.1``, 2 processes each) train 1 step with save, then resume to step 2; steps 1-2 equal one
  launch of 4 processes (same DP4 layout and reduction order: exact, float metrics to 1e-6 relative).
* SLURM: ``examples/slurm/pretrain_grace.sbatch`` submitted with ``sbatch --nodes=1 --gpus-per-node=0`` to the one-node
  cluster ``.ci/slurm.sh`` starts (munged, slurmctld, slurmd): 8 steps on 2 ranks with save and HF export, signalled
  with USR1 mid-run: it saves, requeues itself, resumes and finishes equal to an uninterrupted run; the job's state,
  its logs and the export are checked. Skipped where no cluster answers (``sinfo`` fails).
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_grace.utils import free_port
from megatron_grace.testing import first_rows, stable_metrics, tiny_grpo_run

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "train_supervised.jsonl"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smollm2_tokenizer_dir):
    root = tmp_path_factory.mktemp("launchers")
    _, flags = tiny_grpo_run(root, smollm2_tokenizer_dir, first_rows(DATA, 32, root / "train.jsonl"),
                             ppo_mini_batch_size=4, max_response_length=8)
    flags += ["--save-interval", "1"]
    return root, flags


def launcher_env(**extra) -> dict:
    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)


def launch(run_dir: Path, flags: list[str], *, iters: int, nodes: int) -> None:
    """One launch of the example script on ``nodes`` simulated nodes (4 processes in all), waiting for all."""
    command = ["bash", str(REPO / "examples" / "pretrain_grace.sh"), *flags, "--train-iters", str(iters),
               "--save", str(run_dir), "--load", str(run_dir), "--export-hf", str(run_dir / "hf")]
    port = str(free_port())
    processes = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=launcher_env(SAVE_DIR=str(run_dir), NNODES=str(nodes), NODE_RANK=str(rank),
                                                   NPROC_PER_NODE=str(4 // nodes), MASTER_ADDR="127.0.0.1",
                                                   MASTER_PORT=port))
                 for rank in range(nodes)]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-6000:]


def metrics(run_dir: Path) -> list[dict]:
    return [stable_metrics(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_with_resume_equal_one_node(workspace):
    root, flags = workspace
    launch(root / "one_node", flags, iters=2, nodes=1)
    launch(root / "two_nodes", flags, iters=1, nodes=2)
    launch(root / "two_nodes", flags, iters=2, nodes=2)  # resumes from the step-1 checkpoint
    expected, actual = metrics(root / "one_node"), metrics(root / "two_nodes")
    assert [m["step"] for m in actual] == [1, 2] and expected[0]["grad_norm"] > 0
    for ours, reference in zip(actual, expected):
        assert ours.keys() == reference.keys()
        for key, value in reference.items():
            assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert (root / "two_nodes" / "hf" / "config.json").is_file()
    assert (root / "two_nodes" / "metrics.png").is_file()


def slurm_cluster_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


def job_state(job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout


def test_sbatch_job_saves_on_usr1_requeues_itself_resumes_and_exports(workspace):
    """The batch script under a real scheduler: ``scancel --signal=USR1 --batch`` (what ``--signal=B:USR1@lead``
    does ahead of a time limit) mid-run makes the ranks save the step in flight; the script requeues the job, the
    restarted job resumes from --load and finishes; metrics equal an uninterrupted run's (tolerance 0)."""
    if not slurm_cluster_up():
        assert os.environ.get("GRACE_REQUIRE_SLURM") != "1", "the SLURM cluster .ci/run started does not answer"
        pytest.skip("no SLURM cluster answers (.ci/run starts one: bash .ci/slurm.sh)")
    root, flags = workspace
    flags = [*flags, "--train-iters", "8", "--save-interval", "100"]
    reference = root / "slurm_reference"
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}", "-m",
         "megatron_grace.train", *flags, "--save", str(reference), "--no-report"],
        capture_output=True, text=True, timeout=600, env=launcher_env())
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]

    run_dir, logs = root / "slurm_run", root / "slurm_logs"
    config = root / "tiny_config.sh"
    # A config in the format of examples/configs: GRACE_ARGS, the run directory in GRACE_SAVE_DIR.
    config.write_text("GRACE_SAVE_DIR=" + str(run_dir) + "\nGRACE_ARGS=(" + " ".join(
        f'"{flag}"' for flag in [*flags, "--save", str(run_dir), "--load", str(run_dir), "--no-report",
                                 "--export-hf", str(run_dir / "hf")]) + ")\n")
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=2",
         "--mem=0", "--time=20", f"--output={root}/slurm-%j.out", "--export=ALL",
         str(REPO / "examples" / "slurm" / "pretrain_grace.sbatch")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={key: value for key, value in launcher_env(CONFIG=str(config), LOG_ROOT=str(logs),
                                                       NPROC_PER_NODE="2").items()
             if key not in ("MASTER_ADDR", "MASTER_PORT")})  # an earlier in-process test's rendezvous is not the job's
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    signalled, state, deadline, pending_since = False, "", time.monotonic() + 900, None
    while time.monotonic() < deadline:
        state = job_state(job)
        if not signalled and (run_dir / "metrics.jsonl").is_file():  # step 1 is done: signal mid-run
            signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", job]).returncode == 0
        if "JobState=PENDING" in state and "Reason=BeginTime" in state:
            # SLURM holds a requeued job for a couple of minutes; an administrator's release keeps the test short,
            # once the node has cleaned up after the first run (released earlier, the restart dies with "Job
            # credential revoked").
            pending_since = pending_since or time.monotonic()
            node_idle = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip()
            if node_idle == "idle" and time.monotonic() - pending_since > 5:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        if any(f"JobState={end}" in state for end in ("COMPLETED", "FAILED", "CANCELLED")):
            break
        time.sleep(0.5)
    output = (root / f"slurm-{job}.out").read_text() if (root / f"slurm-{job}.out").is_file() else ""
    node_logs = "".join(p.read_text() for p in sorted(logs.glob("*/node*.log")))
    context = state + output + node_logs[-6000:]
    assert signalled and "JobState=COMPLETED" in state and "ExitCode=0:0" in state, context
    assert "Restarts=1" in state, context
    assert "USR1: asking the ranks to save after the step in flight" in output, context
    assert "requeueing job" in output and "run complete: step 8 saved" in output, context
    assert "planned exit after step" in node_logs and "resumed from" in node_logs, context
    assert len(list(logs.glob("*/launch.txt"))) == 1  # one log folder per job id: the restart appends to it
    assert metrics(run_dir) == metrics(reference)
    assert (run_dir / "hf" / "config.json").is_file()
