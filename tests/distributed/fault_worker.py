"""In-process fault checks on 2 ranks (``torchrun --nproc-per-node 2``, gloo on CPU); one launch, each check a fresh
GraceTrainer on the layout it needs. Rank 0 writes results.json; every rank records the same outcomes (errors are
raised on all ranks together, so none is left waiting in a collective).

argv: the reference run's flags (JSON list: data with bad rows, batch sizes...), its tiny model, a tiny model of another
family, a tiny model that never ends its responses, the reference run directory (checkpoints after steps 2 and 4 at
TP1PP1/DP2), output directory.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_grace.config import parse_args
from megatron_grace.checkpointing import CheckpointError, iteration_dir, read_latest_iteration, verify_manifest
from megatron_grace.data.dataset import DataError
from megatron_grace.platform import ParallelLayout, initialize_distributed, seed_everything
from megatron_grace.guards import NonFiniteError, SaveLocationError
from megatron_grace.testing import stable_metrics
from megatron_grace.train import GraceTrainer

def trainer(*extra: str, tp: int = 1, pp: int = 1, model: str | None = None) -> GraceTrainer:
    """The reference run's flags (tests/test_faults.py), on the given layout."""
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_everything(1234)
    flags = [*FLAGS, "--hf-model", model or MODEL, "--tensor-model-parallel-size", str(tp),
             "--pipeline-model-parallel-size", str(pp), *extra]
    return GraceTrainer(parse_args(flags))


def attempt(action) -> tuple[object, str | None]:
    """(result, None), or (None, "ErrorType: message") for the errors a fault is expected to raise."""
    try:
        return action(), None
    except (CheckpointError, DataError, NonFiniteError, SaveLocationError) as error:
        return None, f"{type(error).__name__}: {error}"


def error_of(action) -> str | None:
    return attempt(action)[1]


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def unchanged(before: list[torch.Tensor], model) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def logged(action):
    """Run ``action``; return (its result, what it printed on rank 0, where log0 writes)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = action()
    return result, out.getvalue()


def resume_checks(reference: Path, out: Path) -> dict:
    results = {}
    # Fallback: the latest checkpoint (4) has a flipped byte.
    run = out / "corrupt_run"
    if dist.get_rank() == 0:
        shutil.copytree(reference, run, ignore=shutil.ignore_patterns("tensorboard", "*.jsonl"))
        shard = sorted((iteration_dir(run, 4)).glob("*.distcp"))[0]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    dist.barrier()
    results["no_fallback_error"] = error_of(lambda: trainer("--load", str(run)))
    fallback, log = logged(lambda: trainer("--load", str(run), "--fallback-to-previous-checkpoint"))
    results["fallback_log"] = log
    results["fallback_iteration"] = fallback.iteration
    results["fallback_step"] = stable_metrics(fallback.train_step())
    # Another layout from the checkpoint after step 2 (pointer rewound, as after a crash).
    if dist.get_rank() == 0:
        (run / "latest_checkpointed_iteration.txt").write_text("2")
    dist.barrier()
    results["tp2_step"] = stable_metrics(trainer("--load", str(run), tp=2).train_step())
    results["pp2_step"] = stable_metrics(trainer("--load", str(run), pp=2).train_step())
    results["other_model_error"] = error_of(lambda: trainer("--load", str(run), model=OTHER_MODEL))
    return results


def nonfinite_checks(out: Path) -> dict:
    """NaN reward (step 1), NaN gradient (step 2), +Inf loss (step 3) on the last rank only; stop at 3 in a row."""
    os.environ["GRACE_FAULT_NONFINITE"] = "reward:1,grad:2,loss:3"
    run = trainer("--save", str(out / "nonfinite_run"), "--max-nonfinite-steps", "3")
    results = {"steps": []}
    for _ in range(3):
        before = weights(run.model)
        (metrics, error), log = logged(lambda: attempt(run.train_step))
        results["steps"].append({"skipped_updates": metrics and metrics["skipped_updates"], "error": error,
                                 "log": log, "weights_unchanged": unchanged(before, run.model)})
    del os.environ["GRACE_FAULT_NONFINITE"]
    # A NaN weight on rank 0 only: no rank writes the checkpoint.
    if dist.get_rank() == 0:
        with torch.no_grad():
            next(run.model.parameters())[0].fill_(float("nan"))
    results["nonfinite_save_error"] = attempt(run.save)[1]
    results["nonfinite_save_written"] = (out / "nonfinite_run" / "latest_checkpointed_iteration.txt").exists()
    return results


def degenerate_and_full_disk_checks(never_ending_model: str, out: Path) -> dict:
    """Every response truncated -> every reward is the penalty -> identical rewards in each group; then a disk that
    fills up while saving step 2."""
    save = out / "degenerate_run"
    run = trainer("--save", str(save), "--max-response-length", "2", model=never_ending_model)
    results = {"plain": stable_metrics(run.train_step())}
    run.save()
    run.config = run.config.replace(norm_adv_by_std=True)
    results["std_normalised"] = stable_metrics(run.train_step())
    os.environ["GRACE_FAULT_ENOSPC"] = "2"
    results["enospc_error"] = error_of(run.save)
    del os.environ["GRACE_FAULT_ENOSPC"]
    results["latest_after_enospc"] = read_latest_iteration(save)
    results["leftovers"] = sorted(p.name for p in save.glob("iter_*"))
    results["previous_intact"] = error_of(lambda: verify_manifest(iteration_dir(save, 1)))
    return results


def setup_error_checks(out: Path) -> dict:
    blocker = out / "a_file"
    if dist.get_rank() == 0:
        blocker.write_text("not a directory")
        (out / "empty.jsonl").write_text("")
        (out / "no_negatives.jsonl").write_text('{"query": "a cat", "positive": "a small feline"}\n' * 8)
    dist.barrier()
    return {
        "unwritable_save": error_of(lambda: trainer("--save", str(blocker / "run"))),
        "strict_data": error_of(lambda: trainer("--strict-data")),
        "empty_file": error_of(lambda: trainer("--train-data", str(out / "empty.jsonl"))),
        "infonce_without_negatives": error_of(lambda: trainer("--algorithm", "infonce", "--train-data",
                                                              str(out / "no_negatives.jsonl"))),
    }


def main() -> None:
    global FLAGS, MODEL, OTHER_MODEL
    flags, MODEL, OTHER_MODEL, never_ending_model, reference, out = sys.argv[1:7]
    FLAGS, reference, out = json.loads(flags), Path(reference), Path(out)
    initialize_distributed(ParallelLayout())
    results = {**resume_checks(reference, out), "nonfinite": nonfinite_checks(out),
               "degenerate": degenerate_and_full_disk_checks(never_ending_model, out), **setup_error_checks(out)}
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
