#!/usr/bin/env python
"""Benchmark the decode attention op (kernels/decode_attention.py) against torch SDPA on the same KV cache.

    python benchmarks/bench_decode_attention.py [--device cuda] [--rows 80] [--context 2048] [--output FILE]

Shape: one layer of the Qwen2.5-1.5B cache (12 query heads on 2 KV heads, head dim 128, bf16 on CUDA), ``--rows``
rows each attending to ``--context`` keys (every row full: the bytes are then rows × context × KV heads × head dim ×
2 (K and V) × element size). Implementations: ``triton`` (ours, split-K, reads each row's range), ``sdpa_masked``
(SDPA over the whole cache with the range as a boolean mask: what a static-shape graph could use without our
kernel) and ``sdpa_eager_length`` (SDPA on the keys sliced to the context, no mask: the fastest torch can do when
every row is full; dynamic shapes, so not graphable). Per implementation: median time (triton.testing.do_bench),
achieved bandwidth and its share of this GPU's measured copy bandwidth, peak extra memory. On CPU (``--device cpu``,
tiny shapes under ``TRITON_INTERPRET=1`` in the GPU check's dry run) the same cases run, timed by wall clock.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from megatron_grace.kernels.decode_attention import (decode_attention_torch, decode_attention_triton,
                                                     default_num_splits)
from megatron_grace.kernels._triton import use_triton


def cpu_seconds(fn, repeats=5):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=80)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--output", default=None)
    cli = parser.parse_args()
    cuda = cli.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(cli.rows, cli.heads, cli.head_dim, generator=generator).to(cli.device, dtype)
    keys = torch.randn(cli.rows, cli.context, cli.kv_heads, cli.head_dim, generator=generator).to(cli.device, dtype)
    values = torch.randn_like(keys)
    starts = torch.zeros(cli.rows, dtype=torch.long, device=cli.device)
    ends = torch.full((cli.rows,), cli.context, dtype=torch.long, device=cli.device)
    implementations = {
        "sdpa_masked": lambda: decode_attention_torch(query, keys, values, starts, ends),
        "sdpa_eager_length": lambda: torch.nn.functional.scaled_dot_product_attention(
            query.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), enable_gqa=True).squeeze(2),
    }
    if use_triton(query):
        implementations = {"triton": lambda: decode_attention_triton(query, keys, values, starts, ends),
                           **implementations}
    cache_bytes = 2 * keys.numel() * keys.element_size()
    result = {"benchmark": "decode_attention", "device": torch.cuda.get_device_name() if cuda else "cpu",
              "dtype": str(dtype), "rows": cli.rows, "context": cli.context, "heads": cli.heads,
              "kv_heads": cli.kv_heads, "head_dim": cli.head_dim, "kv_bytes": cache_bytes,
              "num_splits": default_num_splits(cli.rows, cli.kv_heads, cli.context, query.device), "cases": {}}
    if cuda:
        from _measure import device_copy_bandwidth, gpu_seconds_and_peak_bytes

        copy_bandwidth = device_copy_bandwidth()
        result["copy_bandwidth_gbps"] = round(copy_bandwidth / 1e9, 1)
        timer = gpu_seconds_and_peak_bytes
    else:
        timer = cpu_seconds
    reference = implementations["sdpa_eager_length"]().float()
    for name, fn in implementations.items():
        seconds, peak = timer(fn)
        case = {"ms": round(seconds * 1e3, 4), "gbps": round(cache_bytes / seconds / 1e9, 1),
                "max_abs_diff_vs_sdpa": float((fn().float() - reference).abs().max())}
        if cuda:
            case.update(share_of_copy_bandwidth=round(cache_bytes / seconds / copy_bandwidth, 3),
                        peak_extra_mb=round(peak / 2**20, 1))
        result["cases"][name] = case
        print(f"{name}: {json.dumps(case)}", flush=True)
    if cli.output:
        Path(cli.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cli.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
