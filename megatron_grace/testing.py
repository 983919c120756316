"""Tiny random Hugging Face models of every supported family, for tests and benchmarks (built in code, nothing
downloaded). Shapes are small but exercise the interesting paths: grouped-query attention, a vocabulary that is not a
multiple of the padding unit, tied embeddings across pipeline stages, qkv bias, q/k norms and Llama 3 RoPE scaling."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .utils import free_port

# 4 query heads in 2 KV groups: TP 1 and 2 divide both.
TINY_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
FAMILIES = ("llama", "qwen2", "qwen3")


def tiny_hf_model(family: str, *, vocab_size: int = 49152 + 77, seed: int = 0, eos_token_id: int = 2,
                  eos_logit_scale: float = 1.0):
    """A random ``*ForCausalLM`` of ``family``; norms and biases are perturbed so that mapping mistakes show.

    ``eos_logit_scale`` (untied families) scales the output row of EOS: at ~50 a sampled response ends with EOS after
    a few tokens in about a third of the rows, so GRPO tests see both finished and truncated responses.
    """
    import transformers

    shape = dict(TINY_SHAPE, vocab_size=vocab_size, eos_token_id=eos_token_id, bos_token_id=1)
    if family == "llama":  # SmolLM2 / Llama 3.2 style: tied embeddings, Llama 3 RoPE scaling
        config = transformers.LlamaConfig(
            **shape, tie_word_embeddings=True, rope_theta=100000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192})
        model_class = transformers.LlamaForCausalLM
    elif family == "qwen2":  # Qwen2.5-1.5B style: qkv bias, tied embeddings
        config = transformers.Qwen2Config(**shape, tie_word_embeddings=True, rope_theta=1000000.0)
        model_class = transformers.Qwen2ForCausalLM
    elif family == "qwen3":  # Qwen3 style: q/k norms, explicit head_dim, untied
        config = transformers.Qwen3Config(**shape, head_dim=24, tie_word_embeddings=False)
        model_class = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
        if eos_logit_scale != 1.0:
            if config.tie_word_embeddings:
                raise ValueError("eos_logit_scale needs an untied output layer")
            model.lm_head.weight[eos_token_id] *= eos_logit_scale
    return model


def save_tiny_hf_model(family: str, out_dir: str | Path, tokenizer_dir: str | Path, *, dtype=torch.float32,
                       **kwargs) -> Path:
    """Write a tiny model of ``family`` with the given tokenizer files as a complete HF folder."""
    out_dir = Path(out_dir)
    model = tiny_hf_model(family, **kwargs).to(dtype)
    model.save_pretrained(out_dir)
    for path in Path(tokenizer_dir).iterdir():
        if path.is_file() and not path.name.endswith((".safetensors", ".gguf")) and path.name != "config.json":
            shutil.copy2(path, out_dir / path.name)
    return out_dir


def tiny_grpo_run(root: Path, tokenizer_dir: str | Path, train_data: Path, *, ppo_mini_batch_size: int,
                  max_response_length: int) -> tuple[Path, list[str]]:
    """The tiny Qwen3 (in ``root/tiny``; EOS likely enough that rationales end at varied lengths) and the training
    flags of a GRPO run on ``train_data`` that launch tests share: 4 prompts × 4 rollouts in one micro-batch, no
    sample logging. Returns the model folder and the flags; each test adds its own steps, save and load flags."""
    model = save_tiny_hf_model("qwen3", root / "tiny", tokenizer_dir, eos_logit_scale=70.0)
    flags = ["--hf-model", str(model), "--train-data", str(train_data), "--global-batch-size", "4",
             "--ppo-mini-batch-size", str(ppo_mini_batch_size), "--rollout-n", "4", "--micro-batch-size", "4",
             "--max-response-length", str(max_response_length), "--max-prompt-length", "128", "--lr", "2e-5",
             "--sample-interval", "0"]
    return model, flags


def first_rows(source: Path, count: int, path: Path) -> Path:
    """``path`` holding the first ``count`` lines of the JSONL file ``source``."""
    path.write_text("".join(source.read_text().splitlines(True)[:count]))
    return path


# Per-step metrics that measure the machine, not the run: runs are compared without them.
VOLATILE_METRICS = ("seconds_per_step", "peak_memory_gb")


# Per-step metrics that depend on the layout: each data-parallel rank sorts and trims its own rows into micro-batches,
# and sequence parallelism rounds widths up to the TP size. Runs at different layouts are compared without them.
LAYOUT_DEPENDENT_METRICS = ("padding_share_forward", "padding_share_update")


def stable_metrics(metrics: dict) -> dict:
    """A step's metrics without timings, throughputs and memory (``time_*``, ``*_per_s``, :data:`VOLATILE_METRICS`)."""
    return {k: v for k, v in metrics.items()
            if not (k.startswith("time_") or k.endswith("_per_s") or k in VOLATILE_METRICS)}


def cuda_backend_on_cpu() -> str:
    """The process-group backend a CUDA run starts with, NCCL played by gloo bound to the same device types.

    A bare ``"nccl"`` serves the ``cuda`` device type only, so it becomes ``"cuda:gloo"``: on CPU, any collective of a
    CPU tensor then fails as it would under NCCL ("No backend type associated with device type cpu").
    """
    from .platform import process_group_backend

    backend = process_group_backend(cuda=True)
    return {"nccl": "cuda:nccl"}.get(backend, backend).replace("nccl", "gloo")


def run_torchrun(script: str | Path, *args: str, nproc: int = 4, timeout: float = 900) -> None:
    """Run ``script`` on ``nproc`` local ranks (gloo on CPU); raise with the tail of its output if it fails."""
    import os
    import subprocess
    import sys

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={port}", str(script), *map(str, args)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                           f"{result.stderr[-8000:]}")


class HostReadCounter(torch.overrides.TorchFunctionMode):
    """Counts the tensor operations that make the host wait for the device on a GPU: reading values back
    (``item``, ``tolist``, ``cpu``, ``numpy``, Python ``bool``/``int``/``float`` of a tensor), ``nonzero`` and indexing
    with a boolean mask (its output shape depends on the values). On CPU nothing waits, but the same calls are made,
    so a loop that is sync-free here is sync-free on the device. Every such call counts, host tensors included (an
    over-count)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
             torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero,
             torch.nonzero, torch.Tensor.masked_select, torch.masked_select}
    INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put}

    def __init__(self):
        super().__init__()
        self.reads: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS or (func in self.INDEXING and _has_boolean_index(args[1:2])):
            name = getattr(func, "__name__", str(func))
            self.reads[name] = self.reads.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.reads.values())


def _has_boolean_index(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    if isinstance(index, (tuple, list)):
        return any(_has_boolean_index(part) for part in index)
    return False


def left_padded_batch(lengths: list[int], vocab_size: int, generator: torch.Generator):
    """Tokens [rows, width] with row r's random tokens in its last ``lengths[r]`` columns (0 before), the rows'
    starts, and the attention mask the rollout engine builds for them (causal, pads hidden, a pad sees itself)."""
    width = max(lengths)
    starts = torch.tensor([width - length for length in lengths])
    is_pad = torch.arange(width).unsqueeze(0) < starts.unsqueeze(1)
    tokens = torch.randint(3, vocab_size, (len(lengths), width), generator=generator).masked_fill(is_pad, 0)
    mask = (torch.ones(width, width, dtype=torch.bool).triu(1).unsqueeze(0) | is_pad.unsqueeze(1)).unsqueeze(1)
    mask &= ~torch.eye(width, dtype=torch.bool)
    return tokens, starts, mask


def decode_logits_column_by_column(stage, tokens: torch.Tensor, starts: torch.Tensor, attention=None) -> torch.Tensor:
    """This TP rank's logits [rows, width, V/TP] of our decode step fed one column at a time (a row still inside its
    left padding attends to itself only), for comparison with a forward over the whole batch."""
    from .rollout.decode_step import KVCache, decode_step, stage_weights

    rows, width = tokens.shape
    weights = stage_weights(stage, width)
    cache = KVCache.allocate(weights, rows, width, stage.config.params_dtype, tokens.device)
    options = {} if attention is None else {"attention": attention}
    columns = []
    for column in range(width):
        positions = torch.full((rows,), column, device=tokens.device)
        columns.append(decode_step(weights, cache, tokens[:, column], positions, torch.minimum(starts, positions),
                                   key_length=column + 1, **options))
    return torch.stack(columns, dim=1)


def sampler_ending_rows(sampler, row_seeds: torch.Tensor, steps: torch.Tensor, eos_token_id: int):
    """``sampler`` (a :func:`~megatron_grace.kernels.sample_tokens`) that returns EOS for the row of seed
    ``row_seeds[i]`` at response index ``steps[i]``: chosen rollout lengths on any model. Device ops of static shape,
    so it also runs inside a graphed decode step."""
    def sample(logits, temperatures, seeds, positions, **kwargs):
        tokens, log_probs = sampler(logits, temperatures, seeds, positions, **kwargs)
        match = seeds.unsqueeze(1) == row_seeds.to(seeds.device).unsqueeze(0)
        ends = (match & (positions.unsqueeze(1) == steps.to(seeds.device).unsqueeze(0))).any(dim=1)
        return torch.where(ends, eos_token_id, tokens), log_probs
    return sample
