#!/usr/bin/env python
"""One GRACE step, measured: seconds per phase, full-sequence forward passes per step, the share of computed tokens
that are padding in the one-pass forward and the update, and how step and rollout time grow with the rows and the
response length.

    python benchmarks/bench_step.py [--hf-model DIR] [--steps 2] [--scaling] [--output bench_step.json]
                                    [--label after --merge-into results/bench_step_cpu.json]

Forward passes are counted with a hook on the decoder: passes with a KV-cache inference context are generation steps
(reported separately); the rest are full-sequence forwards. The reference GRACE code runs five per rollout batch
(rollout log-probs, old log-probs, reference log-probs, and one hidden-state pass each for main and query/negative
sequences); here the target is one no-grad forward plus the update's forward-backward per mini-batch.
Padding shares are reported for the length-trimmed micro-batches the step uses and for the same batches padded to
their widest row (the schedule before trimming). ``--scaling`` adds one measured step at 2x and 4x the prompts
(rows) and at 2x ``--max-response-length``, as ratios of rollout and step seconds to the base case. Rollout engine
against HF ``generate`` and vLLM: benchmarks/bench_rollout.py. ``--label``/``--merge-into`` keep runs of several
code versions in one JSON (the before/after of a change: run this file with ``PYTHONPATH`` at the old checkout).
Run single-process (world of one) on CPU or one GPU.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch


def count_decoder_passes(model):
    """Count decoder forwards: generation steps (KV-cache inference context), no-grad full-sequence passes and
    full-sequence passes with gradients (the update)."""
    from megatron_grace.utils import unwrap

    counts = {"generation": 0, "no_grad": 0, "with_grad": 0}

    def hook(module, args, kwargs):
        if kwargs.get("inference_context") is not None:
            counts["generation"] += 1
        else:
            counts["with_grad" if torch.is_grad_enabled() else "no_grad"] += 1

    handle = unwrap(model).decoder.register_forward_pre_hook(hook, with_kwargs=True)
    return counts, handle


def record_padding():
    """Padding shares of every micro-batch split of the step: as the step runs it (length-trimmed) and padded to
    the batch's widest row. Only where the checkout has length trimming (``SequenceBatch.token_counts``)."""
    from megatron_grace.grpo.experience import SequenceBatch

    counts = {"trimmed": [0, 0], "padded": [0, 0]}
    if not hasattr(SequenceBatch, "token_counts"):
        return counts, lambda: None
    original = SequenceBatch.microbatches

    def microbatches(self, micro_batch_size, **kwargs):
        for name, trimmed in (("trimmed", True), ("padded", False)):
            computed, real = self.token_counts(micro_batch_size, length_trimmed=trimmed)
            counts[name][0] += computed
            counts[name][1] += real
        return original(self, micro_batch_size, **kwargs)

    SequenceBatch.microbatches = microbatches
    return counts, lambda: setattr(SequenceBatch, "microbatches", original)


def measure_steps(trainer, steps: int, warm_up: bool = True) -> dict:
    if warm_up:
        trainer.train_step()  # compilation, allocations
    counts, handle = count_decoder_passes(trainer.model)
    padding, restore = record_padding()
    records = []
    for _ in range(steps):
        counts.update(dict.fromkeys(counts, 0))
        records.append({**trainer.train_step(), **counts})
    handle.remove()
    restore()
    keys = [k for k in records[0] if k.startswith("time_") or k.endswith("_per_s")] + [
        "seconds_per_step", "response_length_mean", "truncation_rate"]
    summary = {k: sum(r[k] for r in records) / len(records) for k in keys}
    training = trainer.config.training
    rows = training.global_batch_size * (trainer.config.rollout.rollout_n + 1 + trainer.dataset.num_negatives)
    micro_batches_per_pass = -(-rows // training.micro_batch_size)
    last = records[-1]
    # Micro-batch forwards / micro-batches in one pass over the rollout batch = passes over the batch.
    summary["no_grad_passes_per_rollout_batch"] = last["no_grad"] / micro_batches_per_pass
    summary["update_forward_backward_micro_batches"] = last["with_grad"]
    summary["generation_forwards_per_step"] = last["generation"]
    summary["reference_code_passes_per_rollout_batch"] = 5
    for name, (computed, real) in padding.items():
        if computed:
            summary[f"padding_share_{name}"] = 1.0 - real / computed  # forward and update micro-batches together
    for key in ("padding_share_forward", "padding_share_update"):
        if key in last:
            summary[key] = sum(r[key] for r in records) / len(records)
    return summary


def build_trainer(hf_dir: Path, cli, global_batch_size: int, max_response_length: int):
    from megatron_grace.config import parse_args
    from megatron_grace.train import GraceTrainer

    flags = ["--hf-model", str(hf_dir), "--global-batch-size", str(global_batch_size), "--ppo-mini-batch-size",
             str(max(global_batch_size // 2, 1)), "--rollout-n", str(cli.rollout_n), "--micro-batch-size",
             str(cli.rollout_n), "--max-response-length", str(max_response_length), "--max-prompt-length", "256",
             "--train-iters", "1000", "--sample-interval", "0", "--lr", "1e-6"] + (["--bf16"] if cli.bf16 else [])
    return GraceTrainer(parse_args(flags))


def scaling(hf_dir: Path, cli, base: dict) -> dict:
    """One step per variant (compiled kernels are warm from the base case), as ratios to the base case."""
    variants = {"rows_x2": (2 * cli.global_batch_size, cli.max_response_length),
                "rows_x4": (4 * cli.global_batch_size, cli.max_response_length),
                "response_length_x2": (cli.global_batch_size, 2 * cli.max_response_length)}
    result = {}
    for name, (global_batch_size, max_response_length) in variants.items():
        measured = measure_steps(build_trainer(hf_dir, cli, global_batch_size, max_response_length), 1,
                                 warm_up=False)
        result[name] = {"rollout_seconds_ratio": measured["time_rollout_s"] / base["time_rollout_s"],
                        "step_seconds_ratio": measured["seconds_per_step"] / base["seconds_per_step"],
                        "response_length_mean": measured["response_length_mean"],
                        "seconds_per_step": measured["seconds_per_step"]}
        print(name, json.dumps(result[name]), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--global-batch-size", type=int, default=4)
    parser.add_argument("--rollout-n", type=int, default=4)
    parser.add_argument("--max-response-length", type=int, default=32)
    parser.add_argument("--scaling", action="store_true", help="also 2x/4x rows and 2x response length")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output", default="bench_step.json")
    parser.add_argument("--label", default=None, help="with --merge-into: the key of this run")
    parser.add_argument("--merge-into", default=None, help="add this run under --label to an existing JSON")
    cli = parser.parse_args()

    from megatron_grace.default_model import default_model_dir
    from megatron_grace.platform import ParallelLayout, initialize_distributed

    hf_dir = Path(cli.hf_model) if cli.hf_model else default_model_dir()
    initialize_distributed(ParallelLayout())
    trainer = build_trainer(hf_dir, cli, cli.global_batch_size, cli.max_response_length)
    result = {"model": hf_dir.name, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "threads": torch.get_num_threads(), "dtype": str(trainer.params_dtype),
              "global_batch_size": cli.global_batch_size, "rollout_n": cli.rollout_n,
              "max_response_length": cli.max_response_length}
    result.update(measure_steps(trainer, cli.steps))
    del trainer
    if cli.scaling:
        result["scaling"] = scaling(hf_dir, cli, result)
    print(f"{'metric':55s} value")
    for key, value in result.items():
        print(f"{key:55s} {value:.3f}" if isinstance(value, float) else f"{key:55s} {value}")
    if cli.merge_into:
        path = Path(cli.merge_into)
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged[cli.label or "run"] = result
        path.write_text(json.dumps(merged, indent=2))
    else:
        Path(cli.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
