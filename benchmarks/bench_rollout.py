#!/usr/bin/env python
"""Rollout throughput with EOS honoured: our engine against HF transformers ``generate`` on the same model, rows and
sampling settings, and what the decode loop costs the host.

    python benchmarks/bench_rollout.py [--hf-model DIR] [--output results/bench_rollout_cpu.json]
    python benchmarks/bench_rollout.py --paper-shape qwen2.5-1.5b [--rows 80] [--max-new-tokens 2048]
        [--megatron-max-new-tokens 64] [--eos] [--output FILE]

``--paper-shape``: decode on a random-weight model of that shape (bf16 on a GPU), our decode step and, with
``--megatron-max-new-tokens``, the Megatron-decoded engine in the same process: tokens/s, ms per decode step, peak
memory, and the share of the memory-bandwidth bound (the bytes every decode step must read, weights plus the live
rows' KV cache, over the card's measured copy bandwidth). EOS off by default (every row runs to the cap: fixed
work); ``--eos`` ends rows at a paper-like spread of lengths.

Cases: the GRACE rollout batch of the CPU demo as it was when the engine was tuned (4 prompts × 4 rollouts at T=1.0
plus their 4 query and 4 negative rows at T=0.5, 48 new tokens; ``examples/pretrain_grace.sh`` now samples at T 0.7 up
to 128 tokens, kept here so the committed ratios stay comparable) and a larger one (16 prompts × 8 rollouts at T=1.0, 128 new
tokens), both on the bundled WordNet prompts with the GRACE template. Every engine stops a row at EOS; tokens/s counts
the response tokens actually generated (up to and including EOS) over the best wall time of interleaved repeats. The
engines draw different random tokens, so their lengths differ a little; both report them.

Engines: ``megatron_grace`` (our decode step, sync-free, finished-row compaction every ``--rollout-sync-interval``
tokens), ``megatron_grace_megatron_decode`` (the same engine decoding through Megatron-Core, ``--rollout-decode-step
megatron``),
``hf_generate`` (left-padded batch; one call per temperature, since ``generate`` has one temperature per call) and,
with ``--vllm-python``, vLLM's CPU build from its own environment (benchmarks/bench_vllm_cpu.py, run after ours on
the same rows). On CPU a host read costs nothing, so the sync-free loop shows here as the read count only.
Per case also: host reads per decoded token, and forward rows per generated token (1.0 = no row decodes after its
EOS). ``ratio_vs_hf_generate`` of the CPU demo batch is printed last.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
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


def case_rows(dataset, prompts: int, rollouts: int, with_query_rows: bool, config) -> list[tuple[list[int], float]]:
    """(prompt ids, temperature) per row, in a GRACE step's order: main rows group-major, then queries, negatives."""
    examples = [dataset[i] for i in range(prompts)]
    rows = [(ex.main.input_ids, config.rollout.rollout_temperature) for ex in examples for _ in range(rollouts)]
    if with_query_rows:
        rows += [(ex.query.input_ids, config.rollout.query_temperature) for ex in examples]
        rows += [(ex.negatives[0].input_ids, config.rollout.query_temperature) for ex in examples if ex.negatives]
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
    from megatron_grace.rollout import RolloutEngine, RolloutRequest
    from megatron_grace.kernels.sample_tokens import row_seed
    from megatron_grace.testing import HostReadCounter

    requests = [RolloutRequest(prompt, temperature, row_seed(0, 0, i, 0)) for i, (prompt, temperature)
                in enumerate(rows)]
    # Our engine with our decode step (the default) and with Megatron-Core's, so the two decoders compare in one run.
    engines = {name: RolloutEngine(trainer.model, dataclasses.replace(trainer.config.rollout, rollout_decode_step=decode),
                                   eos_token_ids=eos_token_ids, pad_token_id=trainer.pad_token_id)
               for name, decode in (("megatron_grace", "ours"), ("megatron_grace_megatron_decode", "megatron"))}
    generated: dict[str, int] = {}

    def run_engine(name, engine, new_tokens):
        generated[name] = sum(len(r.response) for r in engine.generate(requests, new_tokens))

    runs = {name: functools.partial(run_engine, name, engine) for name, engine in engines.items()}
    runs["hf_generate"] = lambda new_tokens: generated.__setitem__("hf_generate", hf_generate_rows(
        hf_model, rows, new_tokens, trainer.pad_token_id, eos_token_ids))
    for run in runs.values():
        run(4)  # warm-up: allocations, compilation
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):  # interleaved, best of: contention on a shared machine only ever adds time
        for name, run in runs.items():
            start = time.perf_counter()
            run(max_new_tokens)
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
        "ratio_megatron_decode_vs_hf_generate": round(tokens_per_s["megatron_grace_megatron_decode"]
                                                      / tokens_per_s["hf_generate"], 2),
    }


def paper_lengths(rows: int, max_new_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Response lengths like the paper's rationales: log-normal around a quarter of the cap (a few hundred tokens at
    2,048), a few percent cut at the cap; at least one row runs to the cap, as some row always does in a real step."""
    lengths = torch.exp(torch.randn(rows, generator=generator) * 0.8) * (max_new_tokens / 4)
    lengths = lengths.clamp(1, max_new_tokens).long()
    lengths[0] = max_new_tokens
    return lengths


def decode_at_shape(shape: str, rows: int, rollouts: int, prompt_length: int, max_new_tokens: dict, *,
                    eos: bool, repeats: int) -> dict:
    """Decode throughput of a random-weight model of ``shape`` (benchmarks/bench_update.py's shapes) for each
    engine in ``max_new_tokens`` ({"ours": n, "megatron": m}: the old engine is ~30x slower, so it may run fewer
    tokens), interleaved, best of ``repeats``. Without ``eos`` no row ends early (fixed work: every row runs to the
    cap); with it, rows end at :func:`paper_lengths`. Against the memory-bandwidth bound: each decode step must read
    the weights and the live rows' KV cache of the context so far once."""
    from _measure import device_copy_bandwidth, matmul_tflops
    from bench_update import architecture

    from megatron_grace.config import RolloutConfig
    from megatron_grace.models.builder import build_gpt_model, make_transformer_config
    from megatron_grace.platform import ParallelLayout, initialize_distributed
    from megatron_grace.rollout import RolloutEngine, RolloutRequest
    from megatron_grace.kernels.sample_tokens import row_seed
    from megatron_grace.testing import sampler_ending_rows

    initialize_distributed(ParallelLayout())
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    arch = architecture(shape)
    model = build_gpt_model(arch, make_transformer_config(arch, params_dtype=dtype))
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, arch.vocab_size, (prompt_length,), generator=generator).tolist()
               for _ in range(rows // rollouts)]
    requests = [RolloutRequest(prompts[row // rollouts], 1.0, row_seed(0, 0, row, 0)) for row in range(rows)]
    engines, lengths = {}, {}
    for name, new_tokens in max_new_tokens.items():
        engines[name] = RolloutEngine(model, RolloutConfig(rollout_decode_step=name), eos_token_ids=[2] if eos else [],
                                      pad_token_id=0)
        if eos:
            lengths[name] = paper_lengths(rows, new_tokens, torch.Generator().manual_seed(1))
            # A real length spread on random weights: row i ends with EOS at response index lengths[i] - 1.
            engines[name].sampler = sampler_ending_rows(engines[name].sampler, torch.tensor([r.seed for r in requests]),
                                                        lengths[name] - 1, eos_token_id=2)
        engines[name].generate(requests, 8)  # warm-up: kernels compile, our step's graphs for the batch bucket
    element = torch.finfo(dtype).bits // 8
    weight_bytes = sum(p.numel() for p in model.parameters()) * element
    kv_bytes_per_token = 2 * arch.num_layers * arch.num_query_groups * arch.head_dim * element
    bandwidth = device_copy_bandwidth() if cuda else None
    measured = {name: {"seconds": float("inf")} for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = engine.generate(requests, max_new_tokens[name])
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if seconds < measured[name]["seconds"]:
                stats = engine.stats
                # Bytes the decode steps had to read: weights once per step, plus each live row's context.
                context = [prompt_length + step for step in range(stats.positions)]
                live_rows = [sum(len(r.response) > step for r in out) for step in range(stats.positions)]
                step_bytes = [weight_bytes + rows_live * ctx * kv_bytes_per_token
                              for rows_live, ctx in zip(live_rows, context)]
                generated = sum(len(r.response) for r in out)
                measured[name] = {
                    "seconds": round(seconds, 3), "max_new_tokens": max_new_tokens[name],
                    "generated_tokens": generated, "decode_steps": stats.positions,
                    "tokens_per_s": round(generated / seconds, 1),
                    "ms_per_decode_step": round(1000 * seconds / max(stats.positions, 1), 3),
                    "graphed_buckets": stats.graphed_buckets, "kv_cache_gb": round(stats.kv_cache_bytes / 1e9, 3),
                    "mean_rows_per_step": round(sum(live_rows) / max(len(live_rows), 1), 1)}
                if cuda:
                    bound_seconds = sum(step_bytes) / bandwidth
                    measured[name].update(bandwidth_bound_seconds=round(bound_seconds, 3),
                                          share_of_bandwidth_bound=round(bound_seconds / seconds, 4),
                                          peak_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    result = {"shape": shape, "dtype": str(dtype), "rows": rows, "prompt_length": prompt_length, "eos": eos,
              "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes_per_token, "engines": measured}
    if cuda:
        result.update(device=torch.cuda.get_device_name(), copy_bandwidth_gbps=round(bandwidth / 1e9, 1),
                      matmul_tflops=round(matmul_tflops(dtype), 1))
    if "ours" in measured and "megatron" in measured:
        result["speedup_ms_per_step"] = round(measured["megatron"]["ms_per_decode_step"]
                                              / measured["ours"]["ms_per_decode_step"], 2)
    print(json.dumps(result), flush=True)
    return result


def add_vllm_results(result: dict, all_rows: dict, vllm_python: str, hf_dir: Path, repeats: int) -> None:
    """Run benchmarks/bench_vllm_cpu.py in vLLM's own environment on the same rows; merge its tokens/s."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        rows_path, out_path = Path(work) / "rows.json", Path(work) / "vllm.json"
        rows_path.write_text(json.dumps(all_rows))
        completed = subprocess.run([vllm_python, str(Path(__file__).with_name("bench_vllm_cpu.py")), "--model",
                                    str(hf_dir), "--rows", str(rows_path), "--repeats", str(repeats), "--output",
                                    str(out_path)], capture_output=True, text=True)
        if completed.returncode != 0:  # recorded, not fatal: our engine's numbers stand on their own
            result["vllm_error"] = completed.stderr[-2000:]
            print(f"vLLM failed:\n{completed.stderr[-2000:]}", flush=True)
            return
        vllm = json.loads(out_path.read_text())
    result["vllm_version"] = vllm["vllm"]
    for name, measured in vllm["cases"].items():
        case = result["cases"][name]
        case["tokens_per_s"]["vllm_cpu"] = measured["tokens_per_s"]
        case["seconds"]["vllm_cpu"] = measured["seconds"]
        case["generated_tokens"]["vllm_cpu"] = measured["generated_tokens"]
        case["ratio_vs_vllm_cpu"] = round(case["tokens_per_s"]["megatron_grace"] / measured["tokens_per_s"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, nargs="+", default=[3],
                        help="interleaved repeats per case (one number for all, or one per case)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output", default=None, help="write the results as JSON to this path")
    parser.add_argument("--rows-out", default=None, help="also write each case's rows (token ids, temperatures) "
                                                         "as JSON, for benchmarks/bench_vllm_cpu.py")
    parser.add_argument("--vllm-python", default=None,
                        help="Python of a separate environment with vllm-cpu: run bench_vllm_cpu.py on the same rows")
    parser.add_argument("--paper-shape", default=None, choices=["qwen2.5-1.5b", "tiny"],
                        help="instead of the cases: decode throughput of a random-weight model of this shape "
                             "against the memory-bandwidth bound (the GPU check)")
    parser.add_argument("--rows", type=int, default=80, help="--paper-shape: rows (80 = 640 sequences / 8 GPUs)")
    parser.add_argument("--max-new-tokens", type=int, default=2048, help="--paper-shape: new tokens per row (ours)")
    parser.add_argument("--megatron-max-new-tokens", type=int, default=0,
                        help="--paper-shape: also run the Megatron-decoded engine, for this many new tokens (0: not)")
    parser.add_argument("--eos", action="store_true", help="--paper-shape: rows end at a spread of lengths "
                                                           "(paper_lengths) instead of all at the cap")
    cli = parser.parse_args()
    if cli.paper_shape:
        max_new = {"ours": cli.max_new_tokens}
        if cli.megatron_max_new_tokens:
            max_new["megatron"] = cli.megatron_max_new_tokens
        result = decode_at_shape(cli.paper_shape, cli.rows, 8, 256, max_new, eos=cli.eos, repeats=cli.repeats[0])
        if cli.output:
            Path(cli.output).write_text(json.dumps({"benchmark": "rollout_decode", **result}, indent=2))
        return

    from transformers import AutoModelForCausalLM

    from megatron_grace.config import parse_args
    from megatron_grace.default_model import default_model_dir
    from megatron_grace.platform import ParallelLayout, initialize_distributed
    from megatron_grace.models.hf_io import eos_token_ids
    from megatron_grace.train import GraceTrainer

    hf_dir = Path(cli.hf_model) if cli.hf_model else default_model_dir()
    initialize_distributed(ParallelLayout())
    trainer = GraceTrainer(parse_args(["--hf-model", str(hf_dir), "--global-batch-size", "4", "--ppo-mini-batch-size",
                                       "4", "--rollout-n", "4", "--micro-batch-size", "4", "--max-prompt-length",
                                       "256", "--sample-interval", "0"] + (["--bf16"] if cli.bf16 else [])))
    eos = eos_token_ids(trainer.hf_dir, trainer.tokenizer, trainer.arch)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=trainer.params_dtype).eval()
    result = {"benchmark": "rollout", "model": hf_dir.name, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "threads": torch.get_num_threads(), "dtype": str(trainer.params_dtype),
              "sync_interval": trainer.config.rollout.rollout_sync_interval, "cases": {}}
    all_rows = {}
    for name in cli.cases:
        prompts, rollouts, with_query_rows, max_new_tokens = CASES[name]
        rows = case_rows(trainer.dataset, prompts, rollouts, with_query_rows, trainer.config)
        all_rows[name] = {"prompts": [p for p, _ in rows], "temperatures": [t for _, t in rows],
                          "max_new_tokens": max_new_tokens, "eos_token_ids": eos}
        repeats = cli.repeats[min(cli.cases.index(name), len(cli.repeats) - 1)]
        measured = measure_case(trainer, hf_model, rows, max_new_tokens, repeats, eos)
        result["cases"][name] = measured
        print(f"{name}: {json.dumps(measured)}", flush=True)
        if cli.rows_out:
            Path(cli.rows_out).write_text(json.dumps(all_rows))
    if cli.vllm_python:
        add_vllm_results(result, all_rows, cli.vllm_python, hf_dir, max(cli.repeats))
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
