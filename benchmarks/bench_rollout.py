#!/usr/bin/env python
"""Rollout throughput with EOS honoured: our engine against HF transformers ``generate`` on the same model, rows and
sampling settings, and what the decode loop costs the host.

    python benchmarks/bench_rollout.py [--hf-model DIR] [--output results/bench_rollout_cpu.json]

Cases: the GRACE rollout batch of the CPU demo (``examples/pretrain_grace.sh``: 4 prompts × 4 rollouts at T=1.0 plus
their 4 query and 4 negative rows at T=0.5, 48 new tokens) and a larger one (16 prompts × 8 rollouts at T=1.0, 128 new
tokens), both on the bundled WordNet prompts with the GRACE template. Every engine stops a row at EOS; tokens/s counts
the response tokens actually generated (up to and including EOS) over the best wall time of interleaved repeats. The
engines draw different random tokens, so their lengths differ a little; both report them.

Engines: ``megatron_grace`` (sync-free decode, finished-row compaction every ``--rollout-sync-interval`` tokens),
``megatron_grace_sync_every_token`` (host check and compaction after every token, the loop's old cadence, for the
ratio), ``hf_generate`` (left-padded batch; one call per temperature, since ``generate`` has one temperature per call).
vLLM: measured separately when its CPU build is installed in another environment (see ``docs/performance.md``).
Per case also: host reads per decoded token, and forward rows per generated token (1.0 = no row decodes after its
EOS). ``ratio_vs_hf_generate`` of the CPU demo batch is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

CASES = {  # name: (prompts, rollouts per prompt, query and negative rows, max new tokens)
    "grace_demo_batch": (4, 4, True, 48),
    "16x8_128_tokens": (16, 8, False, 128),
}


def case_rows(dataset, prompts: int, rollouts: int, with_query_rows: bool, settings) -> list[tuple[list[int], float]]:
    """(prompt ids, temperature) per row, in a GRACE step's order: main rows group-major, then queries, negatives."""
    examples = [dataset[i] for i in range(prompts)]
    rows = [(ex.main.input_ids, settings.rollout_temperature) for ex in examples for _ in range(rollouts)]
    if with_query_rows:
        rows += [(ex.query.input_ids, settings.query_temperature) for ex in examples]
        rows += [(ex.negatives[0].input_ids, settings.query_temperature) for ex in examples if ex.negatives]
    return rows


def hf_generate_rows(hf_model, rows, max_new_tokens: int, pad_token_id: int, eos_token_ids: list[int]) -> int:
    """Generate every row with HF ``generate`` (sampling, full vocabulary, EOS honoured); returns response tokens."""
    generated = 0
    for temperature in sorted({t for _, t in rows}):
        prompts = [p for p, t in rows if t == temperature]
        width = max(map(len, prompts))
        input_ids = torch.full((len(prompts), width), pad_token_id)
        attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding, as HF generation expects
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        with torch.no_grad():
            output = hf_model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                       temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                                       eos_token_id=eos_token_ids, pad_token_id=pad_token_id)
        responses = output[:, width:]
        is_eos = torch.isin(responses, torch.tensor(eos_token_ids))
        # A row's response ends at its first EOS (included); later positions are padding.
        ended_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        generated += int((~ended_before).sum())
    return generated


def measure_case(trainer, hf_model, rows, max_new_tokens: int, repeats: int, eos_token_ids: list[int]) -> dict:
    from megatron_grace.rollout import RolloutEngine, RolloutRequest, row_seed
    from megatron_grace.testing import HostReadCounter

    requests = [RolloutRequest(prompt, temperature, row_seed(0, 0, i, 0)) for i, (prompt, temperature)
                in enumerate(rows)]
    engines = {
        "megatron_grace": RolloutEngine(trainer.model, eos_token_ids=eos_token_ids, pad_token_id=trainer.pad_token_id,
                                        sync_interval=trainer.args.rollout_sync_interval),
        "megatron_grace_sync_every_token": RolloutEngine(trainer.model, eos_token_ids=eos_token_ids,
                                                         pad_token_id=trainer.pad_token_id, sync_interval=1),
    }
    generated: dict[str, int] = {}
    runs = {name: (lambda engine=engine, name=name: generated.__setitem__(
        name, sum(len(r.response) for r in engine.generate(requests, max_new_tokens)))) for name, engine in
        engines.items()}
    runs["hf_generate"] = lambda: generated.__setitem__("hf_generate", hf_generate_rows(
        hf_model, rows, max_new_tokens, trainer.pad_token_id, eos_token_ids))
    for run in runs.values():
        run()  # warm-up
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):  # interleaved, best of: contention on a shared machine only ever adds time
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    engine = engines["megatron_grace"]
    with HostReadCounter() as counter:
        rollouts = engine.generate(requests, max_new_tokens)
    decoded = engine.stats.positions + 1
    tokens_per_s = {name: generated[name] / best[name] for name in runs}
    return {
        "rows": len(rows), "max_new_tokens": max_new_tokens,
        "tokens_per_s": {name: round(value, 1) for name, value in tokens_per_s.items()},
        "seconds": {name: round(value, 3) for name, value in best.items()},
        "generated_tokens": generated,
        "truncated_rows": sum(r.truncated for r in rollouts),
        "host_reads_per_decoded_token": round(counter.total / decoded, 4),
        "forward_rows_per_generated_token": round((len(rows) + sum(engine.stats.forward_rows))
                                                  / sum(len(r.response) for r in rollouts), 3),
        "ratio_vs_hf_generate": round(tokens_per_s["megatron_grace"] / tokens_per_s["hf_generate"], 2),
        "ratio_vs_sync_every_token": round(tokens_per_s["megatron_grace"]
                                           / tokens_per_s["megatron_grace_sync_every_token"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output", default=None, help="write the results as JSON to this path")
    cli = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from megatron_grace.arguments import parse_args
    from megatron_grace.default_model import default_model_dir
    from megatron_grace.platform import ParallelLayout, initialize_distributed
    from megatron_grace.train import GraceTrainer, eos_token_ids

    hf_dir = Path(cli.hf_model) if cli.hf_model else default_model_dir()
    initialize_distributed(ParallelLayout())
    trainer = GraceTrainer(parse_args(["--hf-model", str(hf_dir), "--global-batch-size", "4", "--ppo-mini-batch-size",
                                       "4", "--rollout-n", "4", "--micro-batch-size", "4", "--max-prompt-length",
                                       "256", "--sample-interval", "0"] + (["--bf16"] if cli.bf16 else [])))
    eos = eos_token_ids(trainer.hf_dir, trainer.tokenizer, trainer.arch)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=trainer.params_dtype).eval()
    result = {"benchmark": "rollout", "model": hf_dir.name, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "threads": torch.get_num_threads(), "dtype": str(trainer.params_dtype),
              "sync_interval": trainer.args.rollout_sync_interval, "cases": {}}
    for name in cli.cases:
        prompts, rollouts, with_query_rows, max_new_tokens = CASES[name]
        rows = case_rows(trainer.dataset, prompts, rollouts, with_query_rows, trainer.args)
        measured = measure_case(trainer, hf_model, rows, max_new_tokens, cli.repeats, eos)
        result["cases"][name] = measured
        print(f"{name}: {json.dumps(measured)}", flush=True)
    demo = result["cases"].get("grace_demo_batch")
    if demo is not None:
        result["tokens_per_s"] = demo["tokens_per_s"]
        result["ratio_vs_hf_generate"] = demo["ratio_vs_hf_generate"]
    if cli.output:
        Path(cli.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cli.output).write_text(json.dumps(result, indent=2))
    if demo is not None:
        print(f"ratio_vs_hf_generate (CPU demo GRACE batch, EOS honoured): {demo['ratio_vs_hf_generate']}")


if __name__ == "__main__":
    main()
