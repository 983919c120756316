"""Measurement helpers the benchmarks share: best-of timing on CPU, CUDA timing with peak memory, this GPU's copy
bandwidth and matmul rate (the ceilings every share of a bound is measured against), a table printer and the common
``--device`` / ``--output`` command line."""
import argparse
import json
import time

import torch


def best_seconds(functions, repeats):
    """Best wall time of each function on the host (CPU mode). The functions take turns, and the minimum is kept,
    because these 2 cores are shared with other work and contention only ever adds time."""
    for fn in functions.values():
        fn()  # warm-up
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(samples) for name, samples in times.items()}


def gpu_seconds_and_peak_bytes(fn):
    """(median seconds by triton's do_bench, peak memory allocated beyond what was live before the call)."""
    import triton.testing

    fn()  # compile / autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - baseline
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3, peak


def device_copy_bandwidth(num_bytes=2 << 30):
    """Bytes per second of a device-to-device copy (read + write) of a 2 GiB buffer."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    seconds, _ = gpu_seconds_and_peak_bytes(lambda: target.copy_(source))
    return 2 * num_bytes / seconds


def matmul_tflops(dtype=torch.bfloat16, size=8192):
    """Dense matmul rate of this GPU in TFLOP/s (random [size, size] operands), the ceiling MFU is measured against."""
    a = torch.randn(size, size, dtype=dtype, device="cuda")
    b = torch.randn(size, size, dtype=dtype, device="cuda")
    seconds, _ = gpu_seconds_and_peak_bytes(lambda: a @ b)
    return 2 * size ** 3 / seconds / 1e12


def print_table(rows, columns):
    widths = [max(len(column), *(len(f"{row[column]}") for row in rows)) for column in columns]
    print("  ".join(column.rjust(width) for column, width in zip(columns, widths)))
    for row in rows:
        print("  ".join(f"{row[column]}".rjust(width) for column, width in zip(columns, widths)))


def run_cli(benchmark, description, run_cpu, run_gpu):
    """The command line shared by the kernel benchmarks: --device (default: CUDA if present) and --output JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="write the results as JSON to this path")
    args = parser.parse_args()
    results = run_gpu() if args.device == "cuda" else run_cpu()
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(dict(benchmark=benchmark, **results), handle, indent=2)
