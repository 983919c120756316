#!/usr/bin/env python
"""The Python side of ``benchmarks/gpu_check.sh``: models for its steps and the summary it writes.

    python benchmarks/gpu_check.py tiny-model DIR        tiny random Qwen2 HF folder + 16 training rows (DIR/data.jsonl)
    python benchmarks/gpu_check.py smollm2 DIR           the embedded SmolLM2-135M-Instruct if it is in the cache, else a
                                                         random-weight model of its shape with its tokenizer
    python benchmarks/gpu_check.py summary WORK OUTPUT   one JSON of every step's status, numbers and metrics

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

    save_tiny_hf_model("qwen2", out_dir / "model", default_tokenizer_dir(), dtype=torch.bfloat16, vocab_size=49152)
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


def summary(work: Path, output: Path) -> None:
    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines() if line.strip()]
    result = {"environment": _environment(), "steps": steps}
    for path in sorted(work.glob("*.json")):
        result[path.stem] = json.loads(path.read_text())
    metrics = work / "tiny" / "run" / "metrics.jsonl"
    if metrics.is_file():
        result["tiny_training_metrics"] = [json.loads(line) for line in metrics.read_text().splitlines()]
    result["tiny_training_export"] = (work / "tiny" / "run" / "hf" / "config.json").is_file()
    result["passed"] = all(step["rc"] == 0 for step in steps) and result["tiny_training_export"]
    output.write_text(json.dumps(result, indent=2))
    print(f"gpu check: {sum(s['rc'] == 0 for s in steps)}/{len(steps)} steps passed; summary in {output}")


def main() -> None:
    command, *paths = sys.argv[1:]
    paths = [Path(p) for p in paths]
    if command == "tiny-model":
        tiny_model(*paths)
    elif command == "smollm2":
        smollm2(*paths)
    elif command == "summary":
        summary(*paths)
    else:
        sys.exit(f"unknown command {command!r} (tiny-model, smollm2, summary)")


if __name__ == "__main__":
    main()
