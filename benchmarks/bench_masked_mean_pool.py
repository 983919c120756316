"""Benchmark masked mean pooling (normalize=True, as GRACE uses it).

GPU (default when CUDA is present): our Triton kernel vs torch eager (the reference on an fp32 upcast, i.e. the CPU
dispatch path run on the GPU) vs torch.compile of the same, at the paper's shapes (B = 512, S up to 3072,
H in {1536, 2048, 2560, 3072}, bf16): time, peak extra memory, and achieved bandwidth on the bytes the op must read
(valid tokens' hidden states + mask) as a percentage of the device copy bandwidth measured in the same run.
Target: >= 85 % of copy bandwidth.

CPU: the interpreter is not a speed measure, so this compares our torch path against a per-row numpy loop of the
kind the reference code runs (hidden states moved to host, one masked mean per row), as a ratio from one run.

    python benchmarks/bench_masked_mean_pool.py [--device cpu|cuda] [--output results.json]
"""
import numpy as np
import torch

from _measure import best_seconds, device_copy_bandwidth, gpu_seconds_and_peak_bytes, print_table, run_cli

from megatron_grace.kernels import masked_mean_pool_reference
from megatron_grace.kernels.masked_mean_pool import masked_mean_pool_triton

GPU_BATCH = 512
GPU_SEQ_LENS = (1024, 3072)
GPU_HIDDEN_SIZES = (1536, 2048, 2560, 3072)
SYSTEM_PROMPT_TOKENS = 40  # masked-out prefix, as in GRACE's pooling mask


def pooling_mask(batch, seq_len, device, generator):
    """System prompt zeroed; valid lengths uniform in [S/2, S] with padding after them."""
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=generator)
    positions = torch.arange(seq_len)
    return ((positions >= SYSTEM_PROMPT_TOKENS) & (positions < lengths[:, None])).to(device)


def numpy_loop_pool(hidden, mask):
    """Per-row masked mean + L2 normalisation on the host, the way the reference code pools."""
    hidden = hidden.float().cpu().numpy()
    mask = mask.cpu().numpy().astype(bool)
    pooled = []
    for row in range(hidden.shape[0]):
        embedding = hidden[row][mask[row]].mean(axis=0)
        pooled.append(embedding / np.linalg.norm(embedding))
    return np.stack(pooled)


def torch_path_pool(hidden, mask):
    return masked_mean_pool_reference(hidden.float(), mask, True)


def bench_gpu_shape(implementations, seq_len, hidden_size, copy_bandwidth, generator):
    """Rows for one [B, S, H] shape; its tensors are freed on return, before the next shape is allocated."""
    hidden = torch.randn(GPU_BATCH, seq_len, hidden_size, device="cuda", dtype=torch.bfloat16)
    mask = pooling_mask(GPU_BATCH, seq_len, "cuda", generator)
    required_bytes = int(mask.sum()) * hidden_size * hidden.element_size() + mask.numel()
    expected = masked_mean_pool_triton(hidden, mask, True)
    rows = []
    for name, pool in implementations.items():
        try:
            seconds, peak = gpu_seconds_and_peak_bytes(lambda: pool(hidden, mask))
            max_diff = (pool(hidden, mask) - expected).abs().max().item()
        except torch.cuda.OutOfMemoryError:
            seconds, peak, max_diff = float("nan"), float("nan"), float("nan")
        torch.cuda.empty_cache()
        bandwidth = required_bytes / seconds
        rows.append(dict(impl=name, batch=GPU_BATCH, seq_len=seq_len, hidden=hidden_size,
                         time_ms=round(seconds * 1e3, 3), peak_mib=round(peak / 2**20, 1),
                         gbps=round(bandwidth / 1e9, 1), pct_copy_bw=round(100 * bandwidth / copy_bandwidth, 1),
                         max_diff_vs_triton=float(f"{max_diff:.2e}")))
    return rows


def run_gpu():
    generator = torch.Generator().manual_seed(0)
    copy_bandwidth = device_copy_bandwidth()
    implementations = {"triton": lambda h, m: masked_mean_pool_triton(h, m, True), "torch_eager": torch_path_pool,
                       "torch_compile": torch.compile(torch_path_pool, dynamic=True)}
    rows = [row for seq_len in GPU_SEQ_LENS for hidden_size in GPU_HIDDEN_SIZES
            for row in bench_gpu_shape(implementations, seq_len, hidden_size, copy_bandwidth, generator)]
    print(f"device copy bandwidth: {copy_bandwidth / 1e9:.0f} GB/s ({torch.cuda.get_device_name()}); "
          f"bandwidth counts the valid tokens' hidden states + mask")
    print_table(rows, ["impl", "seq_len", "hidden", "time_ms", "peak_mib", "gbps", "pct_copy_bw",
                       "max_diff_vs_triton"])
    triton_rows = [row for row in rows if row["impl"] == "triton"]
    return dict(device=torch.cuda.get_device_name(), copy_bandwidth_gbps=round(copy_bandwidth / 1e9, 1),
                target_pct_copy_bw=85, min_triton_pct_copy_bw=min(row["pct_copy_bw"] for row in triton_rows),
                rows=rows)


def run_cpu(batch=160, seq_len=256, hidden_size=576, repeats=10):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, seq_len, hidden_size, generator=generator)
    mask = pooling_mask(batch, seq_len, "cpu", generator)
    max_diff = float(np.abs(torch_path_pool(hidden, mask).numpy() - numpy_loop_pool(hidden, mask)).max())
    seconds = best_seconds(dict(torch=lambda: torch_path_pool(hidden, mask),
                                numpy=lambda: numpy_loop_pool(hidden, mask)), repeats)
    torch_seconds, loop_seconds = seconds["torch"], seconds["numpy"]
    rows = [dict(impl="torch_path", time_ms=round(torch_seconds * 1e3, 2)),
            dict(impl="numpy_row_loop", time_ms=round(loop_seconds * 1e3, 2))]
    print(f"CPU, fp32 hidden [{batch}, {seq_len}, {hidden_size}], {torch.get_num_threads()} threads")
    print_table(rows, ["impl", "time_ms"])
    print(f"speed-up of the torch path over the numpy row loop: {loop_seconds / torch_seconds:.2f}x "
          f"(max |diff| {max_diff:.1e})")
    return dict(device="cpu", shape=[batch, seq_len, hidden_size], rows=rows,
                speedup_vs_numpy_loop=round(loop_seconds / torch_seconds, 2), max_diff=max_diff)


if __name__ == "__main__":
    run_cli("masked_mean_pool", __doc__.split("\n\n")[0], run_cpu, run_gpu)
