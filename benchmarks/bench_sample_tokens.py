"""Benchmark token sampling (kernels/sample_tokens.py) against the host-side sampler it replaced.

GPU (default when CUDA is present): our Triton kernel vs torch eager (the reference: the CPU dispatch path run on the
GPU) vs torch.compile of the same vs the old path (full logits copied to the host, a softmax and one
``torch.multinomial`` per row from a host generator), at the paper's decode shape (80 rows of a 151,936-token
vocabulary, bf16) and at TP2's shard: time, peak extra memory, and achieved bandwidth on the logits read once as a
percentage of the device copy bandwidth measured in the same run.

CPU: the interpreter is not a speed measure, so this compares the torch path (one pass of counter-based noise over
the logits) with the old host sampler on the same logits, as a ratio from one run (interleaved, best of N).

    python benchmarks/bench_sample_tokens.py [--device cpu|cuda] [--output results.json]
"""
import torch

from _measure import best_seconds, device_copy_bandwidth, gpu_seconds_and_peak_bytes, print_table, run_cli
from megatron_grace.kernels import sample_tokens_reference
from megatron_grace.kernels.sample_tokens import _local_sample_triton, _sample

PAPER_ROWS, PAPER_VOCAB = 80, 151_936  # Qwen2.5-1.5B: 640 sequences per step over 8 GPUs
CPU_ROWS, CPU_VOCAB = 40, 49_152  # SmolLM2's vocabulary, the CPU demo's rollout batch


def host_multinomial(logits, temperatures, generators):
    """The decode loop this kernel replaced: logits to the host, softmax, one multinomial draw per row."""
    probabilities = torch.softmax(logits.float().cpu() / temperatures.cpu().unsqueeze(1), dim=1)
    tokens = torch.stack([torch.multinomial(row, 1, generator=generator).squeeze(0)
                          for row, generator in zip(probabilities, generators)])
    return tokens, probabilities.gather(1, tokens.unsqueeze(1)).squeeze(1).log()


def sampling_inputs(rows, vocab, device, dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (3.0 * torch.randn(rows, vocab, generator=generator)).to(device, dtype)
    temperatures = torch.where(torch.arange(rows) % 8 < 6, 1.0, 0.5).to(device)  # main rows and query rows
    row_seeds = torch.randint(0, 2**62, (rows,), generator=generator).to(device)
    positions = torch.randint(0, 2048, (rows,), generator=generator).to(device)
    return logits, temperatures, row_seeds, positions


def run_gpu():
    copy_bandwidth = device_copy_bandwidth()
    triton_sample = lambda *inputs: _sample(_local_sample_triton, *inputs, None, 0, None)  # noqa: E731
    rows = []
    for vocab in (PAPER_VOCAB, PAPER_VOCAB // 2):
        inputs = sampling_inputs(PAPER_ROWS, vocab, "cuda", torch.bfloat16)
        generators = [torch.Generator().manual_seed(row) for row in range(PAPER_ROWS)]
        implementations = {"triton": triton_sample, "torch_eager": sample_tokens_reference,
                           "torch_compile": torch.compile(sample_tokens_reference, dynamic=True),
                           "host_multinomial": lambda logits, temperatures, *_: host_multinomial(
                               logits, temperatures, generators)}
        expected_tokens, _ = triton_sample(*inputs)
        logit_bytes = inputs[0].numel() * inputs[0].element_size()
        for name, sample in implementations.items():
            seconds, peak = gpu_seconds_and_peak_bytes(lambda: sample(*inputs))
            same = float((sample(*inputs)[0].to(expected_tokens.device) == expected_tokens).float().mean())
            rows.append(dict(impl=name, rows=PAPER_ROWS, vocab=vocab, time_us=round(seconds * 1e6, 1),
                             peak_mib=round(peak / 2**20, 1),
                             pct_copy_bw=round(100 * logit_bytes / seconds / copy_bandwidth, 1),
                             same_tokens_as_triton=round(same, 3)))
    print(f"{PAPER_ROWS} rows, bf16 logits ({torch.cuda.get_device_name()}, copy bandwidth "
          f"{copy_bandwidth / 1e9:.0f} GB/s; pct_copy_bw counts the logits read once; the host sampler draws other "
          f"tokens by design)")
    print_table(rows, ["impl", "vocab", "time_us", "peak_mib", "pct_copy_bw", "same_tokens_as_triton"])
    by_name = {(row["impl"], row["vocab"]): row for row in rows}
    return dict(device=torch.cuda.get_device_name(), copy_bandwidth_gbps=round(copy_bandwidth / 1e9, 1), rows=rows,
                speedup_vs_host_multinomial=round(by_name["host_multinomial", PAPER_VOCAB]["time_us"]
                                                  / by_name["triton", PAPER_VOCAB]["time_us"], 1))


def run_cpu(repeats=10):
    inputs = sampling_inputs(CPU_ROWS, CPU_VOCAB, "cpu", torch.float32)
    logits, temperatures = inputs[:2]
    generators = [torch.Generator().manual_seed(row) for row in range(CPU_ROWS)]
    tokens, log_probs = sample_tokens_reference(*inputs)
    expected = torch.log_softmax(logits.double() / temperatures.double().unsqueeze(1), 1).gather(1, tokens[:, None])
    max_diff = float((log_probs.double() - expected.squeeze(1)).abs().max())
    seconds = best_seconds(dict(counter_noise=lambda: sample_tokens_reference(*inputs),
                                host_multinomial=lambda: host_multinomial(logits, temperatures, generators)),
                           repeats)
    rows = [dict(impl=name, time_ms=round(value * 1e3, 2)) for name, value in seconds.items()]
    speedup = seconds["host_multinomial"] / seconds["counter_noise"]
    print(f"CPU, fp32 logits [{CPU_ROWS}, {CPU_VOCAB}], {torch.get_num_threads()} threads")
    print_table(rows, ["impl", "time_ms"])
    print(f"counter-based sampling vs the host multinomial sampler: {speedup:.2f}x "
          f"(log-prob max |diff| vs float64 {max_diff:.1e})")
    return dict(device="cpu", shape=[CPU_ROWS, CPU_VOCAB], rows=rows, speedup_vs_host_multinomial=round(speedup, 2),
                log_prob_max_diff_vs_float64=max_diff)


if __name__ == "__main__":
    run_cli("sample_tokens", __doc__.split("\n\n")[0], run_cpu, run_gpu)
