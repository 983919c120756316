#!/usr/bin/env python
"""One GRACE step, measured: seconds per phase, full-sequence forward passes per step, and rollout throughput of the
Megatron-Core engine against HF transformers ``generate`` on the same model, batch and sampling settings.

    python benchmarks/bench_step.py [--hf-model DIR] [--steps 2] [--output bench_step.json]

Forward passes are counted with a hook on the decoder: passes with a KV-cache inference context are generation steps
(reported separately); the rest are full-sequence forwards. The reference GRACE code runs five per rollout batch
(rollout log-probs, old log-probs, reference log-probs, and one hidden-state pass each for main and query/negative
sequences); here the target is one no-grad forward plus the update's forward-backward per mini-batch.
The rollout comparison generates exactly ``--max-response-length`` tokens per row on both sides (EOS disabled), so
the ratio compares equal work, for the rows of a GRACE rollout batch (prompts repeated per group) and for as many
distinct prompts. Run single-process (world of one) on CPU or one GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch


def count_decoder_passes(model):
    """Count decoder forwards: generation steps (KV-cache inference context), no-grad full-sequence passes and
    full-sequence passes with gradients (the update)."""
    from megatron_grace.checkpointing import unwrap

    counts = {"generation": 0, "no_grad": 0, "with_grad": 0}

    def hook(module, args, kwargs):
        if kwargs.get("inference_context") is not None:
            counts["generation"] += 1
        else:
            counts["with_grad" if torch.is_grad_enabled() else "no_grad"] += 1

    handle = unwrap(model).decoder.register_forward_pre_hook(hook, with_kwargs=True)
    return counts, handle


def measure_steps(trainer, steps: int) -> dict:
    trainer.train_step()  # warm-up
    counts, handle = count_decoder_passes(trainer.model)
    records = []
    for _ in range(steps):
        counts.update(dict.fromkeys(counts, 0))
        records.append({**trainer.train_step(), **counts})
    handle.remove()
    keys = [k for k in records[0] if k.startswith("time_") or k.endswith("_per_s")] + ["seconds_per_step"]
    summary = {k: sum(r[k] for r in records) / len(records) for k in keys}
    args = trainer.args
    rows = args.global_batch_size * (args.rollout_n + 1 + trainer.dataset.num_negatives)
    micro_batches_per_pass = -(-rows // args.micro_batch_size)
    last = records[-1]
    # Micro-batch forwards / micro-batches in one pass over the rollout batch = passes over the batch.
    summary["no_grad_passes_per_rollout_batch"] = last["no_grad"] / micro_batches_per_pass
    summary["update_forward_backward_micro_batches"] = last["with_grad"]
    summary["generation_forwards_per_step"] = last["generation"]
    summary["reference_code_passes_per_rollout_batch"] = 5
    return summary


def rollout_comparison(trainer, hf_dir: Path, prompts: list[list[int]], max_new_tokens: int, repeats: int) -> dict:
    """Generation tokens/s of the rollout engine and of HF ``generate`` on the same rows (EOS disabled on both)."""
    from transformers import AutoModelForCausalLM

    from megatron_grace.rollout import RolloutEngine, RolloutRequest, row_seed

    engine = RolloutEngine(trainer.model, eos_token_ids=[], pad_token_id=trainer.pad_token_id)
    requests = [RolloutRequest(p, 1.0, row_seed(0, 0, i, 0)) for i, p in enumerate(prompts)]
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=trainer.params_dtype).eval()
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), trainer.pad_token_id)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding, as HF generation expects
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1

    def ours():
        engine.generate(requests, max_new_tokens)

    def theirs():
        with torch.no_grad():
            hf_model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                              top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                              pad_token_id=trainer.pad_token_id)

    ours(), theirs()  # warm-up
    best = {"megatron": float("inf"), "hf": float("inf")}
    for _ in range(repeats):  # interleaved, best of: the machine is shared
        for name, run in (("megatron", ours), ("hf", theirs)):
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    tokens = len(prompts) * max_new_tokens
    return {"rows": len(prompts), "max_new_tokens": max_new_tokens,
            "megatron_tokens_per_s": tokens / best["megatron"], "hf_generate_tokens_per_s": tokens / best["hf"],
            "ratio": best["hf"] / best["megatron"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--global-batch-size", type=int, default=4)
    parser.add_argument("--rollout-n", type=int, default=4)
    parser.add_argument("--max-response-length", type=int, default=32)
    parser.add_argument("--rollout-prompts", type=int, default=2, help="prompts in the rollout comparison batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output", default="bench_step.json")
    cli = parser.parse_args()

    from megatron_grace.arguments import parse_args
    from megatron_grace.default_model import default_model_dir
    from megatron_grace.platform import ParallelLayout, initialize_distributed
    from megatron_grace.train import GraceTrainer

    hf_dir = Path(cli.hf_model) if cli.hf_model else default_model_dir()
    initialize_distributed(ParallelLayout())
    flags = ["--hf-model", str(hf_dir), "--global-batch-size", str(cli.global_batch_size), "--ppo-mini-batch-size",
             str(cli.global_batch_size // 2), "--rollout-n", str(cli.rollout_n), "--micro-batch-size",
             str(cli.rollout_n), "--max-response-length", str(cli.max_response_length), "--max-prompt-length", "256",
             "--train-iters", "1000", "--sample-interval", "0", "--lr", "1e-6"] + (["--bf16"] if cli.bf16 else [])
    trainer = GraceTrainer(parse_args(flags))
    result = {"model": hf_dir.name, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "threads": torch.get_num_threads(), "dtype": str(trainer.params_dtype)}
    result.update(measure_steps(trainer, cli.steps))
    # The rows of a GRACE rollout batch (each main prompt --rollout-n times, then its query and negative prompts),
    # and as many distinct prompts: the engine prefills a prompt once per group, HF generate once per row.
    examples = [trainer.dataset[i] for i in range(cli.rollout_prompts)]
    grace_rows = ([ex.main.input_ids for ex in examples for _ in range(cli.rollout_n)]
                  + [ex.query.input_ids for ex in examples] + [ex.negatives[0].input_ids for ex in examples])
    distinct_rows = [trainer.dataset[i].main.input_ids for i in range(len(grace_rows))]
    for name, rows in (("rollout_grace_batch", grace_rows), ("rollout_distinct_prompts", distinct_rows)):
        measured = rollout_comparison(trainer, hf_dir, rows, cli.max_response_length, cli.repeats)
        result.update({f"{name}_{key}": value for key, value in measured.items()})
    print(f"{'metric':55s} value")
    for key, value in result.items():
        print(f"{key:55s} {value:.3f}" if isinstance(value, float) else f"{key:55s} {value}")
    Path(cli.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
