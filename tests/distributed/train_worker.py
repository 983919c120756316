"""Multi-rank GRACE training checks, run with ``torchrun --nproc-per-node 4`` (gloo on CPU); one launch:

1. two steps at TP1PP1 (DP4) and at TP2PP2 (DP1): same rollouts, rewards and losses;
2. exact resume: 3 steps at TP2PP2 with a checkpoint after step 2, then a fresh trainer resumed from it at TP2PP2
   (identical step 3) and at TP1PP1 (step 3 equal to float tolerance); the 3-step run's HF export of the live model;
3. unsupervised mode at TP2 with sequence parallelism (pooling from sequence shards);
4. KL (reference model) and entropy terms at TP2PP2; the per-rollout reward variant;
5. the contrastive baselines: InfoNCE at TP1PP1 (DP4) and TP2PP2 (DP1) and its resume, SimCSE at TP1PP4 and TP2PP2.
The process group starts with the backend a CUDA run uses, NCCL played by gloo bound to the same device types
(:func:`~megatron_grace.testing.cuda_backend_on_cpu`): a collective on a CPU tensor anywhere in a step or a save (the
NaN/Inf guard's flags, the checkpoint size estimate, metric objects) fails here as it would under NCCL unless the
backend also serves the ``cpu`` device type.
argv: tiny HF model dir, supervised data, unsupervised data, output dir. Rank 0 writes results.json there.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_grace.config import parse_args
from megatron_grace.checkpointing import export_to_hf
from megatron_grace.platform import ParallelLayout, initialize_distributed, seed_everything
from megatron_grace.testing import cuda_backend_on_cpu, stable_metrics
from megatron_grace.train import GraceTrainer


def run(tp: int, pp: int, *extra: str, sequence_parallel: bool = False, export: Path | None = None) -> list[dict]:
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_everything(1234)
    flags = ["--hf-model", MODEL, "--train-data", SUPERVISED, "--global-batch-size", "4", "--ppo-mini-batch-size",
             "4", "--rollout-n", "4", "--micro-batch-size", "2", "--max-response-length", "10",
             "--max-prompt-length", "128", "--lr", "2e-5", "--sample-interval", "0", "--log-interval", "100",
             "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp), *extra]
    if sequence_parallel:
        flags.append("--sequence-parallel")
    trainer = GraceTrainer(parse_args(flags))
    history = [stable_metrics(m) for m in trainer.steps()]
    if export is not None:  # --export-hf's path: the live model, gathered from its TP/PP ranks
        export_to_hf(trainer.model, trainer.arch, export, tokenizer_dir=trainer.hf_dir)
    return history


def main() -> None:
    global MODEL, SUPERVISED
    MODEL, SUPERVISED, unsupervised, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    initialize_distributed(ParallelLayout(), backend=cuda_backend_on_cpu())
    results = {
        "tp1pp1": run(1, 1, "--train-iters", "2"),
        "tp2pp2": run(2, 2, "--train-iters", "2"),
        "uninterrupted": run(2, 2, "--train-iters", "3", "--save", str(out / "run"), "--save-interval", "2",
                             export=out / "export_tp2pp2"),
    }
    # The uninterrupted run saved after steps 2 and 3; resume from step 2 (pointer rewound, as after a crash).
    if dist.get_rank() == 0:
        (out / "run" / "latest_checkpointed_iteration.txt").write_text("2")
    dist.barrier()
    results["resumed_tp2pp2"] = run(2, 2, "--train-iters", "3", "--load", str(out / "run"))
    results["resumed_tp1pp1"] = run(1, 1, "--train-iters", "3", "--load", str(out / "run"))
    results["unsupervised_tp2_sp"] = run(2, 1, "--train-iters", "1", "--train-mode", "unsupervised",
                                         "--train-data", unsupervised, sequence_parallel=True)
    results["unsupervised_tp1"] = run(1, 1, "--train-iters", "1", "--train-mode", "unsupervised",
                                      "--train-data", unsupervised)
    results["kl_entropy_tp2pp2"] = run(2, 2, "--train-iters", "1", "--kl-coef", "0.1", "--entropy-coef", "0.01")
    results["per_rollout_tp2pp2"] = run(2, 2, "--train-iters", "1", "--reward-variant", "per-rollout")
    # Main rows sampled at T 0.7: the update's log-probs must be those of the tempered sampling distribution.
    results["tempered_tp2pp2"] = run(2, 2, "--train-iters", "1", "--rollout-temperature", "0.7")
    # The contrastive baselines: InfoNCE across layouts (in-batch negatives from 4 data-parallel ranks vs 1) and its
    # exact resume; SimCSE's replayed dropout masks at two pipeline layouts of the same micro-batches (DP1 both).
    infonce = ("--algorithm", "infonce")
    results["infonce_tp1pp1"] = run(1, 1, "--train-iters", "2", *infonce)
    results["infonce_tp2pp2"] = run(2, 2, "--train-iters", "2", *infonce)
    results["infonce_uninterrupted"] = run(2, 2, "--train-iters", "3", *infonce, "--save", str(out / "infonce"),
                                           "--save-interval", "2")
    if dist.get_rank() == 0:
        (out / "infonce" / "latest_checkpointed_iteration.txt").write_text("2")
    dist.barrier()
    results["infonce_resumed"] = run(2, 2, "--train-iters", "3", *infonce, "--load", str(out / "infonce"))
    # Sequence parallelism: each TP rank pools its sequence shard and the loss back-propagates through the sum.
    results["infonce_tp2_sp"] = run(2, 1, "--train-iters", "2", *infonce, sequence_parallel=True)
    results["infonce_tp2"] = run(2, 1, "--train-iters", "2", *infonce)
    simcse = ("--algorithm", "simcse", "--train-mode", "unsupervised", "--train-data", unsupervised)
    results["simcse_tp1pp4"] = run(1, 4, "--train-iters", "2", *simcse)
    results["simcse_tp2pp2"] = run(2, 2, "--train-iters", "2", *simcse)
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
