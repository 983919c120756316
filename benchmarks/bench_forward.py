"""Forward throughput: Megatron-Core GPTModel (TP1PP1, our layer spec) against HF transformers, same weights.

Both models are loaded from one HF folder (default: the embedded SmolLM2-135M-Instruct) in the same process and run
the same random token batch in the same dtype, without gradients, producing full logits, and again producing the
per-token log-probs of the next tokens (what the GRACE forward needs). The two take turns
iteration by iteration, so load from other processes on the machine hits both alike; tokens/s comes from the best
iteration of each (contention only ever adds time), and the median is reported too. The script also times
``tools/convert_hf.py hf-to-mcore`` on the same folder (wall time of the command, interpreter start included).

    python benchmarks/bench_forward.py [--model HF_DIR] [--batch-size 16] [--seq-length 256]
                                       [--dtype float32|bfloat16] [--iters 5] [--output results.json]

Target: Megatron / HF ratio >= 1.0.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_megatron_model(model_dir: Path, dtype: torch.dtype):
    from megatron_grace.models.builder import build_gpt_model, make_transformer_config
    from megatron_grace.models.hf_io import load_hf_model, load_hf_weights

    arch, hf_state = load_hf_model(model_dir)
    model = build_gpt_model(arch, make_transformer_config(arch, params_dtype=dtype))
    load_hf_weights(model, hf_state, arch)
    return model.eval()


def load_hf_model(model_dir: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(forwards: dict, iters: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each forward, taking turns; one untimed warm-up call each."""
    seconds = {name: [] for name in forwards}
    for step in range(iters + 1):
        for name, forward in forwards.items():
            synchronize(device)
            start = time.perf_counter()
            forward()
            synchronize(device)
            if step > 0:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def conversion_seconds(model_dir: Path) -> float:
    """Wall time of the conversion command. Run before this process starts torch.distributed, whose MASTER_PORT,
    RANK and WORLD_SIZE the child would otherwise inherit."""
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "convert_hf.py"), "hf-to-mcore",
                                 "--hf-path", str(model_dir), "--save", str(Path(out_dir) / "mcore")],
                                capture_output=True, text=True, cwd=REPO_ROOT)
        seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"tools/convert_hf.py hf-to-mcore failed:\n{result.stderr[-4000:]}")
    return seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF folder (default: embedded SmolLM2-135M)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per model (after one warm-up)")
    parser.add_argument("--skip-conversion", action="store_true", help="do not time tools/convert_hf.py")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from megatron_grace.default_model import default_model_dir
    from megatron_grace.platform import ParallelLayout, current_device, destroy_distributed, initialize_distributed

    model_dir = args.model or default_model_dir()
    dtype = DTYPES[args.dtype]
    conversion = None if args.skip_conversion else conversion_seconds(model_dir)
    initialize_distributed(ParallelLayout())
    device = current_device()
    megatron_model = load_megatron_model(model_dir, dtype)
    hf_model = load_hf_model(model_dir, dtype, device)
    vocab_size = megatron_model.arch.vocab_size
    tokens = torch.randint(0, vocab_size, (args.batch_size, args.seq_length),
                           generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(args.seq_length, device=device).expand(args.batch_size, -1)

    # What training runs: per-token log-probs of the next tokens. Megatron through the model's labels= path (our
    # chunked LinearCrossEntropy, megatron_grace/models/output.py); HF from its [B, S, V] logits with log_softmax +
    # gather.
    labels = torch.roll(tokens, -1, dims=1)

    def hf_log_probs():
        logits = hf_model(input_ids=tokens, use_cache=False).logits
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        forwards = {
            "megatron": lambda: megatron_model(tokens, positions, attention_mask=None),
            "hf": lambda: hf_model(input_ids=tokens, use_cache=False).logits,
            "megatron_logprobs": lambda: -megatron_model(tokens, positions, attention_mask=None, labels=labels),
            "hf_logprobs": hf_log_probs,
        }
        max_abs_diff = (forwards["megatron"]()[..., :vocab_size] - forwards["hf"]()).abs().max().item()
        log_prob_diff = (forwards["megatron_logprobs"]() - forwards["hf_logprobs"]()).abs().max().item()
        seconds = time_interleaved(forwards, args.iters, device)
    destroy_distributed()

    tokens_per_batch = args.batch_size * args.seq_length
    results = {
        "model": str(model_dir), "device": str(device), "dtype": args.dtype, "batch_size": args.batch_size,
        "seq_length": args.seq_length, "iters": args.iters, "torch_threads": torch.get_num_threads(),
        "logits_max_abs_diff": max_abs_diff, "log_probs_max_abs_diff": log_prob_diff,
    }
    for name, samples in seconds.items():
        results[f"{name}_tokens_per_s_best"] = tokens_per_batch / min(samples)
        results[f"{name}_tokens_per_s_median"] = tokens_per_batch / statistics.median(samples)
        results[f"{name}_seconds"] = samples
    results["ratio_best"] = results["megatron_tokens_per_s_best"] / results["hf_tokens_per_s_best"]
    results["ratio_median"] = results["megatron_tokens_per_s_median"] / results["hf_tokens_per_s_median"]
    results["log_probs_ratio_best"] = (results["megatron_logprobs_tokens_per_s_best"]
                                       / results["hf_logprobs_tokens_per_s_best"])
    if conversion is not None:
        results["conversion_hf_to_mcore_seconds"] = conversion

    print(f"{args.batch_size}x{args.seq_length} {args.dtype} on {device}: "
          f"Megatron {results['megatron_tokens_per_s_best']:.0f} tok/s, HF {results['hf_tokens_per_s_best']:.0f} tok/s "
          f"(best of {args.iters}); ratio {results['ratio_best']:.3f} (median {results['ratio_median']:.3f}); "
          f"logits max abs diff {max_abs_diff:.2e}")
    print(f"per-token log-probs (the training forward): Megatron {results['megatron_logprobs_tokens_per_s_best']:.0f} "
          f"tok/s, HF {results['hf_logprobs_tokens_per_s_best']:.0f} tok/s; ratio {results['log_probs_ratio_best']:.3f}; "
          f"max abs diff {log_prob_diff:.2e}")
    if "conversion_hf_to_mcore_seconds" in results:
        print(f"hf-to-mcore conversion: {results['conversion_hf_to_mcore_seconds']:.1f} s")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
