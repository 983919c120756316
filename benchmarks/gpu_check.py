#!/usr/bin/env python
"""The Python side of ``benchmarks/gpu_check.sh``: models for its steps and the summary it writes.

    python benchmarks/gpu_check.py tiny-model DIR        tiny random Qwen3 HF folder whose EOS ends some responses,
                                                         + 16 training rows (DIR/data.jsonl)
    python benchmarks/gpu_check.py smollm2 DIR           the embedded SmolLM2-135M-Instruct if it is in the cache, else a
                                                         random-weight model of its shape with its tokenizer
    python benchmarks/gpu_check.py paper-model DIR       a random-weight Qwen2.5-1.5B-shaped HF folder (bf16)
    python benchmarks/gpu_check.py tiny-training WORK RESULTS
                                                         the tiny model, bf16: 1 step with save, step 2 resumed with
                                                         an HF export, and an uninterrupted 2-step run; then
                                                         check-training (RESULTS/tiny_training.json)
    python benchmarks/gpu_check.py check-training RESUMED UNINTERRUPTED OUTPUT
                                                         the tiny run updated (finite, non-zero loss, grad norm and
                                                         advantages) and its resumed step 2 equals the uninterrupted
                                                         run's
    python benchmarks/gpu_check.py summary RESULTS OUTPUT one JSON of every step's status, numbers and metrics

Both models take the SmolLM2 tokenizer from ``$MEGATRON_GRACE_CACHE`` (``.gpu_assets`` on the GPU machine, which has
no network: ``cp -r "$(python -m megatron_grace.default_model --tokenizer-only)" .gpu_assets/`` before the run).
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tiny_model(out_dir: Path) -> None:
    import torch

    from megatron_grace.default_model import default_tokenizer_dir
    from megatron_grace.testing import save_tiny_hf_model

    # Qwen3 (untied) with its EOS output row scaled: some rationales end within 16 tokens, so advantages and the
    # update are non-zero (a model that never ends gives every row the truncation penalty and a zero advantage).
    save_tiny_hf_model("qwen3", out_dir / "model", default_tokenizer_dir(), dtype=torch.bfloat16, vocab_size=49152,
                       eos_logit_scale=70.0)
    rows = (REPO / "examples" / "data" / "train_supervised.jsonl").read_text().splitlines(True)[:16]
    (out_dir / "data.jsonl").write_text("".join(rows))
    print(out_dir / "model")


def smollm2(out_dir: Path) -> None:
    from megatron_grace.default_model import MODEL_FOLDER, default_tokenizer_dir, is_complete, resolve_cache_dir

    cached = resolve_cache_dir() / MODEL_FOLDER
    if is_complete(cached):
        print(cached)
        return
    import torch
    import transformers

    tokenizer_dir = default_tokenizer_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    # SmolLM2-135M-Instruct's architecture (see megatron_grace/default_model.py), random weights: the 260 MB of real
    # weights exceed what travels to the GPU machine.
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "RANDOM_WEIGHTS").write_text("SmolLM2-135M-Instruct shape, random weights\n")
    print(out_dir)


def paper_model(out_dir: Path) -> None:
    """Qwen2.5-1.5B's architecture (benchmarks/bench_update.py's shape) with random bf16 weights and the SmolLM2
    tokenizer (its ids lie inside the larger vocabulary)."""
    import torch
    import transformers
    from bench_update import SHAPES

    from megatron_grace.default_model import default_tokenizer_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(default_tokenizer_dir())
    shape = SHAPES["qwen2.5-1.5b"]
    config = transformers.Qwen2Config(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], intermediate_size=shape["ffn_hidden_size"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_query_groups"], max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "RANDOM_WEIGHTS").write_text("Qwen2.5-1.5B shape, random weights\n")
    print(out_dir)


def tiny_training(work: Path, results: Path) -> None:
    import shutil
    import subprocess

    from megatron_grace.utils import free_port

    tiny_model(work)
    flags = ["--hf-model", str(work / "model"), "--train-data", str(work / "data.jsonl"), "--bf16",
             "--global-batch-size", "2", "--ppo-mini-batch-size", "2", "--rollout-n", "4", "--micro-batch-size", "4",
             "--max-prompt-length", "128", "--max-response-length", "16", "--lr", "1e-4", "--sample-interval", "0",
             "--no-report"]
    resumed, uninterrupted = work / "run", work / "uninterrupted"
    for extra in (["--save", str(resumed), "--load", str(resumed), "--save-interval", "1", "--train-iters", "1"],
                  ["--save", str(resumed), "--load", str(resumed), "--save-interval", "1", "--train-iters", "2",
                   "--export-hf", str(resumed / "hf")],
                  ["--save", str(uninterrupted), "--train-iters", "2"]):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
                   str(free_port()), "-m", "megatron_grace.train", *flags, *extra]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    shutil.copy(resumed / "metrics.jsonl", results / "tiny_training_metrics.jsonl")
    if not (resumed / "hf" / "config.json").is_file():
        sys.exit(f"no HF export in {resumed / 'hf'}")
    check_training(resumed, uninterrupted, results / "tiny_training.json")


def check_training(resumed: Path, uninterrupted: Path, output: Path) -> None:
    """Exit 1 unless the tiny run's steps have finite, non-zero loss and grad norm and non-zero advantages, and step 2
    after the resume equals step 2 of the uninterrupted run (timings aside)."""
    import math

    from megatron_grace.testing import stable_metrics

    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    resumed_rows, reference_rows = rows(resumed), rows(uninterrupted)
    problems = []
    for row in resumed_rows:
        for key in ("loss", "grad_norm", "advantage_abs_max"):
            if not (math.isfinite(row[key]) and row[key] != 0):
                problems.append(f"step {row['step']}: {key} = {row[key]}")
    if [r["step"] for r in resumed_rows] != [1, 2] or [r["step"] for r in reference_rows] != [1, 2]:
        problems.append("expected steps 1 and 2 in both runs")
    else:
        ours, expected = stable_metrics(resumed_rows[1]), stable_metrics(reference_rows[1])
        problems += [f"step 2 {key}: resumed {ours.get(key)} != uninterrupted {value}"
                     for key, value in expected.items() if ours.get(key) != value]
    result = {"problems": problems, "steps": [{k: r[k] for k in ("step", "loss", "grad_norm", "advantage_abs_max",
                                                                 "truncation_rate", "logprob_mismatch")}
                                              for r in resumed_rows]}
    output.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    sys.exit(1 if problems else 0)


def _environment() -> dict:
    import torch
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        import megatron.core
        import transformers

        info.update(megatron_core=megatron.core.__version__, transformers=transformers.__version__)
    except ImportError as error:
        info["import_error"] = str(error)
    return info


def summary(results: Path, output: Path) -> None:
    """Merge what every step left in ``results`` (its status line and its JSON, each written when the step ended)."""
    steps = [json.loads(line) for line in (results / "steps.jsonl").read_text().splitlines() if line.strip()]
    result = {"environment": _environment(), "steps": steps}
    for path in sorted(results.glob("*.json")):
        if path != output:
            result[path.stem] = json.loads(path.read_text())
    result["passed"] = bool(steps) and all(step["rc"] == 0 for step in steps)
    output.write_text(json.dumps(result, indent=2))
    print(f"gpu check: {sum(s['rc'] == 0 for s in steps)}/{len(steps)} steps passed; summary in {output}")


def main() -> None:
    command, *paths = sys.argv[1:]
    paths = [Path(p) for p in paths]
    if command == "tiny-model":
        tiny_model(*paths)
    elif command == "smollm2":
        smollm2(*paths)
    elif command == "paper-model":
        paper_model(*paths)
    elif command == "tiny-training":
        tiny_training(*paths)
    elif command == "check-training":
        check_training(*paths)
    elif command == "summary":
        summary(*paths)
    else:
        sys.exit(f"unknown command {command!r} (tiny-model, smollm2, paper-model, tiny-training, check-training, summary)")


if __name__ == "__main__":
    main()
