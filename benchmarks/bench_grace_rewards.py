"""Benchmark the GRACE reward (and, on CPU, pooling + reward end to end).

GPU (default when CUDA is present): our fused Triton kernel vs torch eager (the reference on fp32) vs torch.compile of
the same, for 64 groups x 8 rollouts of fp32 pooled embeddings, H in {1536, 2048, 2560, 3072}, each mode/variant:
time, peak extra memory, and input bytes / time as a percentage of the device copy bandwidth measured in the same run.
Target: under 50 us.

CPU: our torch path for pool + reward against a straightforward host implementation of the reference code's reward
(hidden states moved to host as numpy, one masked mean per row, Python loops over groups and rollouts), supervised
code variant, at the paper's 64 groups x 8 rollouts (shorter sequences and SmolLM2's H = 576 so that it runs in
seconds), as a ratio measured in one run.

    python benchmarks/bench_grace_rewards.py [--device cpu|cuda] [--output results.json]
"""
import functools

import numpy as np
import torch

from _measure import best_seconds, device_copy_bandwidth, gpu_seconds_and_peak_bytes, print_table, run_cli
from bench_masked_mean_pool import numpy_loop_pool, pooling_mask, torch_path_pool
from megatron_grace.config import ObjectiveConfig
from megatron_grace.kernels import grace_rewards_reference
from megatron_grace.kernels.grace_rewards import grace_rewards_triton

NUM_GROUPS = 64
GROUP_SIZE = 8
GPU_HIDDEN_SIZES = (1536, 2048, 2560, 3072)
# (mode, variant, negatives per query)
GPU_CASES = (("supervised", "code", 1), ("supervised", "paper", 4), ("unsupervised", "code", 0),
             ("unsupervised", "paper", 0))
TARGET_MICROSECONDS = 50
# The reward's settings: the trainer's defaults (the paper's).
TEMPERATURE, CLUSTERING_WEIGHT, CROSS_GROUP_WEIGHT = (ObjectiveConfig.reward_temperature,
                                                      ObjectiveConfig.clustering_weight,
                                                      ObjectiveConfig.cross_group_weight)


def numpy_loop_rewards(main, query, negative, group_size):
    """Supervised code-variant totals with per-group, per-rollout loops over host arrays."""
    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    num_groups = len(query)
    totals = []
    for group in range(num_groups):
        rollouts = main[group * group_size:(group + 1) * group_size]
        other_groups = [other for other in range(num_groups) if other != group]
        cross = -np.mean([max(cos(query[group], rollout)
                              for rollout in main[other * group_size:(other + 1) * group_size])
                          for other in other_groups]) if other_groups else 0.0
        neg = -cos(query[group], negative[group])
        for k in range(group_size):
            pos = cos(query[group], rollouts[k])
            others = [cos(rollouts[k], rollouts[j]) for j in range(group_size) if j != k]
            clust = np.mean(others) if others else 0.0
            totals.append((pos + neg + CLUSTERING_WEIGHT * clust + CROSS_GROUP_WEIGHT * cross) / TEMPERATURE)
    return np.array(totals)


def split_streams(pooled, num_groups, group_size):
    """Rows of one pooled batch: the G*K rollouts, then the G queries, then the G negatives."""
    num_rollouts = num_groups * group_size
    return pooled[:num_rollouts], pooled[num_rollouts:num_rollouts + num_groups], pooled[num_rollouts + num_groups:]


def run_cpu(num_groups=NUM_GROUPS, group_size=GROUP_SIZE, seq_len=128, hidden_size=576, repeats=5):
    generator = torch.Generator().manual_seed(0)
    batch = num_groups * group_size + 2 * num_groups
    hidden = torch.randn(batch, seq_len, hidden_size, generator=generator)
    mask = pooling_mask(batch, seq_len, "cpu", generator)
    reward_options = dict(group_size=group_size, mode="supervised", variant="code", temperature=TEMPERATURE,
                          clustering_weight=CLUSTERING_WEIGHT, cross_group_weight=CROSS_GROUP_WEIGHT)
    torch_pooled = split_streams(torch_path_pool(hidden, mask), num_groups, group_size)
    numpy_pooled = split_streams(numpy_loop_pool(hidden, mask), num_groups, group_size)
    max_diff = float(np.abs(grace_rewards_reference(*torch_pooled, **reward_options)["total"].numpy()
                            - numpy_loop_rewards(*numpy_pooled, group_size)).max())
    seconds = best_seconds(dict(
        torch_pool=lambda: torch_path_pool(hidden, mask),
        torch_reward=lambda: grace_rewards_reference(*torch_pooled, **reward_options),
        numpy_pool=lambda: numpy_loop_pool(hidden, mask),
        numpy_reward=lambda: numpy_loop_rewards(*numpy_pooled, group_size)), repeats)
    rows = [dict(impl=impl, pool_ms=round(seconds[f"{key}_pool"] * 1e3, 2),
                 reward_ms=round(seconds[f"{key}_reward"] * 1e3, 2),
                 total_ms=round((seconds[f"{key}_pool"] + seconds[f"{key}_reward"]) * 1e3, 2))
            for impl, key in (("torch path (batched pool + fused reward)", "torch"),
                              ("numpy loops (reference-code style)", "numpy"))]
    speedup = rows[1]["total_ms"] / rows[0]["total_ms"]
    print(f"CPU, {num_groups} groups x {group_size} rollouts + queries + negatives = {batch} sequences, fp32 hidden "
          f"[{batch}, {seq_len}, {hidden_size}], {torch.get_num_threads()} threads")
    print_table(rows, ["impl", "pool_ms", "reward_ms", "total_ms"])
    print(f"speed-up of the torch path over the numpy loops, pool + reward: {speedup:.1f}x "
          f"(pool {rows[1]['pool_ms'] / rows[0]['pool_ms']:.1f}x, reward "
          f"{rows[1]['reward_ms'] / rows[0]['reward_ms']:.0f}x; max |diff| of totals {max_diff:.1e})")
    return dict(device="cpu", groups=num_groups, group_size=group_size, hidden_shape=[batch, seq_len, hidden_size],
                rows=rows, speedup_vs_numpy_loops=round(speedup, 2), max_diff=max_diff)


def run_gpu():
    generator = torch.Generator(device="cuda").manual_seed(0)
    copy_bandwidth = device_copy_bandwidth()
    rows = []
    for mode, variant, num_negatives in GPU_CASES:
        options = dict(group_size=GROUP_SIZE, mode=mode, variant=variant, temperature=TEMPERATURE,
                       clustering_weight=CLUSTERING_WEIGHT, cross_group_weight=CROSS_GROUP_WEIGHT)
        reference = functools.partial(grace_rewards_reference, **options)
        # One compilation per case, shared by the hidden sizes.
        implementations = {"triton": functools.partial(grace_rewards_triton, **options),
                           "torch_eager": reference, "torch_compile": torch.compile(reference, dynamic=True)}
        for hidden_size in GPU_HIDDEN_SIZES:
            main = torch.randn(NUM_GROUPS * GROUP_SIZE, hidden_size, device="cuda", generator=generator)
            query = torch.randn(NUM_GROUPS, hidden_size, device="cuda", generator=generator)
            negative = None
            if num_negatives:
                shape = (NUM_GROUPS, hidden_size) if num_negatives == 1 else (NUM_GROUPS, num_negatives, hidden_size)
                negative = torch.randn(shape, device="cuda", generator=generator)
            input_bytes = sum(tensor.numel() * tensor.element_size() for tensor in (main, query, negative)
                              if tensor is not None)
            expected = grace_rewards_triton(main, query, negative, **options)["total"]
            for name, rewards in implementations.items():
                seconds, peak = gpu_seconds_and_peak_bytes(lambda: rewards(main, query, negative))
                max_diff = (rewards(main, query, negative)["total"] - expected).abs().max().item()
                rows.append(dict(impl=name, mode=mode, variant=variant, negatives=num_negatives, hidden=hidden_size,
                                 time_us=round(seconds * 1e6, 1), peak_mib=round(peak / 2**20, 2),
                                 pct_copy_bw=round(100 * input_bytes / seconds / copy_bandwidth, 1),
                                 max_diff_vs_triton=float(f"{max_diff:.2e}")))
    print(f"{NUM_GROUPS} groups x {GROUP_SIZE} rollouts, fp32 embeddings ({torch.cuda.get_device_name()}, copy "
          f"bandwidth {copy_bandwidth / 1e9:.0f} GB/s; pct_copy_bw counts the input embeddings read once)")
    print_table(rows, ["impl", "mode", "variant", "negatives", "hidden", "time_us", "peak_mib", "pct_copy_bw",
                       "max_diff_vs_triton"])
    triton_rows = [row for row in rows if row["impl"] == "triton"]
    return dict(device=torch.cuda.get_device_name(), copy_bandwidth_gbps=round(copy_bandwidth / 1e9, 1),
                groups=NUM_GROUPS, group_size=GROUP_SIZE, target_us=TARGET_MICROSECONDS, max_triton_us=max(row["time_us"] for row in triton_rows), rows=rows)


if __name__ == "__main__":
    run_cli("grace_rewards", __doc__.split("\n\n")[0], run_cpu, run_gpu)
