"""The rollout engine with and without the two CPU decode changes of 2026-12-03, toggled in place and interleaved in
one process (best of N; every variant must draw the same tokens):

    torchrun --nproc-per-node 1 results/rollout_cpu_ab/ab.py [grace_demo_batch|16x8_128_tokens] [repeats]

Variants: ``old`` (eager sampling, Megatron-Core's SelfAttention), ``sample`` (sampling's element-wise part compiled),
``sample+rope`` (and keys rotated once on their way into the KV cache). Results: docs/measurements.md.
"""
import dataclasses
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_rollout import CASES, case_rows  # noqa: E402
from megatron.core.transformer.attention import SelfAttention  # noqa: E402

from megatron_grace.config import parse_args  # noqa: E402
from megatron_grace.models.hf_io import eos_token_ids  # noqa: E402
from megatron_grace.models.layers import RotatedKeyCacheSelfAttention  # noqa: E402
from megatron_grace.platform import ParallelLayout, initialize_distributed  # noqa: E402
from megatron_grace.rollout import RolloutEngine, RolloutRequest  # noqa: E402
from megatron_grace.kernels.sample_tokens import row_seed
from megatron_grace.train import GraceTrainer  # noqa: E402
from megatron_grace.utils import unwrap  # noqa: E402

VARIANTS = ("old", "sample", "sample+rope")


def main() -> None:
    case = sys.argv[1] if len(sys.argv) > 1 else "grace_demo_batch"
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    initialize_distributed(ParallelLayout())
    trainer = GraceTrainer(parse_args(["--global-batch-size", "4", "--ppo-mini-batch-size", "4", "--rollout-n", "4",
                                       "--micro-batch-size", "4", "--max-prompt-length", "256",
                                       "--sample-interval", "0"]))
    prompts, rollouts, with_query_rows, max_new_tokens = CASES[case]
    rows = case_rows(trainer.dataset, prompts, rollouts, with_query_rows, trainer.config)
    requests = [RolloutRequest(p, t, row_seed(0, 0, i, 0)) for i, (p, t) in enumerate(rows)]
    # The A/B measured the Megatron-decoded loop (the decode step of its time).
    engine = RolloutEngine(trainer.model, dataclasses.replace(trainer.config.rollout, rollout_decode_step="megatron"),
                           eos_token_ids=eos_token_ids(trainer.hf_dir, trainer.tokenizer, trainer.arch),
                           pad_token_id=trainer.pad_token_id)
    sampling = importlib.import_module("megatron_grace.kernels.sample_tokens")  # the module, not the function
    compiled, eager = sampling._local_sample_compiled, sampling._local_sample_reference
    attentions = [layer.self_attention for layer in unwrap(trainer.model).decoder.layers]

    def use(variant: str) -> None:
        sampling._local_sample_compiled = compiled if "sample" in variant else eager
        for attention in attentions:
            attention.__class__ = RotatedKeyCacheSelfAttention if "rope" in variant else SelfAttention

    best, tokens, responses = dict.fromkeys(VARIANTS, float("inf")), {}, {}
    for variant in VARIANTS:  # warm-up: compilation, allocations
        use(variant)
        engine.generate(requests, 4)
    for _ in range(repeats):
        for variant in VARIANTS:
            use(variant)
            start = time.perf_counter()
            out = engine.generate(requests, max_new_tokens)
            best[variant] = min(best[variant], time.perf_counter() - start)
            tokens[variant] = sum(len(r.response) for r in out)
            responses[variant] = [r.response for r in out]
    for variant in VARIANTS:
        print(f"{variant}: best {best[variant]:.2f} s, {tokens[variant]} tokens, "
              f"{tokens[variant] / best[variant]:.1f} tok/s; same tokens as old: "
              f"{responses[variant] == responses['old']}")


if __name__ == "__main__":
    main()
