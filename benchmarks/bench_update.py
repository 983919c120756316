#!/usr/bin/env python
"""Model FLOP utilisation of the GRACE update: forward + backward of the policy loss over micro-batches and one
distributed-optimizer step (Megatron DDP, bf16), on a random-weight model of a given shape, single process.

    python benchmarks/bench_update.py [--shape qwen2.5-1.5b|tiny] [--seq-length 1024] [--micro-batch-size 4]
        [--micro-batches 4] [--steps 3] [--peak-tflops 989] [--output FILE]

FLOPs per token of the forward: 2 × (matmul parameters of the decoder layers) + 2 × vocabulary × hidden (output
layer; log-probs of every position) + 2 × layers × sequence × attention width (causal QKᵀ and AV, half of the full
square). Training counts 3× the forward. MFU = those FLOPs / measured seconds / ``--peak-tflops`` (default: the
H200's dense bf16 peak, 989 TFLOP/s; pass the number of your GPU). The optimizer step is inside the timed region.
``breakdown``: the fastest step's seconds of forward (a separate no-grad forward over the same micro-batches),
backward (forward + backward minus that), optimizer step and gradient zeroing.
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

SHAPES = {
    # Qwen2.5-1.5B(-Instruct): the paper's main model.
    "qwen2.5-1.5b": dict(num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12,
                         num_query_groups=2, head_dim=128, vocab_size=151936),
    "tiny": dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                 head_dim=16, vocab_size=1024),
}


def architecture(shape: str):
    from megatron_grace.models.config import ModelArchitecture

    return ModelArchitecture(family="qwen2", hf_architecture="Qwen2ForCausalLM", max_position_embeddings=32768,
                             rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, qkv_bias=True,
                             **SHAPES[shape])


def forward_flops_per_token(arch, seq_length: int) -> float:
    attention_width = arch.num_attention_heads * arch.head_dim
    kv_width = arch.num_query_groups * arch.head_dim
    per_layer = (arch.hidden_size * (attention_width + 2 * kv_width) + attention_width * arch.hidden_size
                 + 3 * arch.hidden_size * arch.ffn_hidden_size)
    return (2 * arch.num_layers * per_layer + 2 * arch.vocab_size * arch.hidden_size
            + 2 * arch.num_layers * seq_length * attention_width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--output", default=None)
    cli = parser.parse_args()

    from megatron_grace.models.builder import build_gpt_model, make_transformer_config
    from megatron_grace.config import OptimConfig
    from megatron_grace.optim import optimizer_step, wrap_for_training, zero_grads
    from megatron_grace.platform import ParallelLayout, current_device, initialize_distributed
    from megatron_grace.schedule import run_microbatches

    initialize_distributed(ParallelLayout())
    arch = architecture(cli.shape)
    model, optimizer = wrap_for_training(build_gpt_model(arch, make_transformer_config(arch,
                                                                                        params_dtype=torch.bfloat16)),
                                         OptimConfig(lr=1e-6))
    device = current_device()
    generator = torch.Generator().manual_seed(0)
    micro_batches = [{"tokens": torch.randint(0, arch.vocab_size, (cli.micro_batch_size, cli.seq_length),
                                              generator=generator).to(device),
                      "position_ids": torch.arange(cli.seq_length).expand(cli.micro_batch_size, -1).to(device),
                      "response_mask": torch.ones(cli.micro_batch_size, cli.seq_length - 1, dtype=torch.bool,
                                                  device=device)}
                     for _ in range(cli.micro_batches)]

    def loss(micro, output):
        mask = micro["response_mask"].float()
        return -(output.log_probs * mask).sum(), mask.sum().to(torch.int), {}

    cuda = torch.cuda.is_available()

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def forward_only():
        with torch.no_grad():
            run_microbatches(model, micro_batches, loss, forward_only=True)

    def step() -> dict:
        """One update, its phases timed apart: zeroing, forward + backward over the micro-batches (Megatron DDP's
        gradient reduction inside, a no-op on one GPU) and the distributed optimizer's step."""
        return {"zero_grad": timed(lambda: zero_grads(model, optimizer)),
                "forward_backward": timed(lambda: run_microbatches(model, micro_batches, loss, forward_only=False)),
                "optimizer": timed(lambda: optimizer_step(model, optimizer))}

    step()  # warm-up (allocations, compilation)
    forward_only()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    phases = [step() for _ in range(cli.steps)]
    seconds = [sum(p.values()) for p in phases]
    forward_seconds = min(timed(forward_only) for _ in range(cli.steps))
    fastest = phases[seconds.index(min(seconds))]
    breakdown = {"forward_s": forward_seconds,  # a no-grad forward: the forward share of forward_backward
                 "backward_s": fastest["forward_backward"] - forward_seconds,
                 "optimizer_s": fastest["optimizer"], "zero_grad_s": fastest["zero_grad"],
                 "grad_all_reduce_s": None,  # one process: Megatron DDP has nothing to reduce
                 "padding_share": 0.0}  # full-length random rows; a real step's shares: benchmarks/bench_step.py
    tokens = cli.micro_batch_size * cli.seq_length * cli.micro_batches
    flops = 3 * forward_flops_per_token(arch, cli.seq_length) * tokens
    best = min(seconds)
    result = {"shape": cli.shape, "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": "bfloat16",
              "parameters": sum(p.numel() for p in model.parameters()), "seq_length": cli.seq_length,
              "tokens_per_step": tokens, "seconds_per_step_best": best, "seconds_per_step": seconds,
              "tokens_per_s": tokens / best, "model_tflops_per_s": flops / best / 1e12,
              "mfu": flops / best / (cli.peak_tflops * 1e12) if cuda else None, "peak_tflops": cli.peak_tflops,
              "peak_memory_gb": torch.cuda.max_memory_allocated() / 1024**3 if cuda else None,
              "breakdown": breakdown}
    for key, value in result.items():
        print(f"{key:24s} {value}")
    if cli.output:
        Path(cli.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
