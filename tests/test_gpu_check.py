"""``benchmarks/gpu_check.sh --dry-run``: the GPU check's steps on CPU with tiny shapes, so the script cannot rot.

Checks every step's exit status and that each step left its own JSON (written when it ended, so a check killed from
outside keeps them); the tiny bf16 run (two steps, the second resumed from the first's checkpoint, equal to an
uninterrupted run's step 2, non-zero update; rollout-vs-forward log-prob mismatch < 0.05 nats per token in bf16) and
its HF export; the decode attention benchmark (Triton under the interpreter against SDPA); the rollout cases (both
decoders with EOS off run every row to its cap; with the length spread EOS ends rows early); the GRACE step's phases
and padding shares; the update's time breakdown; and a budget that skips the steps it cannot hold.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_check(out_dir: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=1500,
                          env=dict(os.environ, OUT=str(out_dir), PYTHON=sys.executable, OMP_NUM_THREADS="2",
                                   PYTHONWARNINGS="ignore", **env))


def test_gpu_check_dry_run(tmp_path):
    completed = run_check(tmp_path)
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").is_file() else ""
    assert completed.returncode == 0, completed.stdout + log[-6000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["passed"] and all(step["rc"] == 0 for step in summary["steps"])
    steps = [step["step"] for step in summary["steps"]]
    assert steps[:3] == ["kernel_decode_attention", "bench_decode_attention", "rollout_512"]
    for name in ("bench_decode_attention", "rollout_512", "rollout_grace_eos", "rollout_2048", "tiny_training",
                 "paper_step", "update_mfu", "bench_masked_mean_pool", "bench_grace_rewards"):
        assert (tmp_path / f"{name}.json").is_file(), name
    assert {f"kernel_{op}" for op in ("decode_attention", "sample_tokens", "masked_mean_pool", "grace_rewards")} \
        <= set(steps)

    tiny = summary["tiny_training"]
    assert tiny["problems"] == [] and [s["step"] for s in tiny["steps"]] == [1, 2]
    assert all(s["logprob_mismatch"] < 0.05 and s["grad_norm"] > 0 for s in tiny["steps"])

    attention = summary["bench_decode_attention"]["cases"]
    assert attention["triton"]["max_abs_diff_vs_sdpa"] < 1e-4 and attention["sdpa_masked"]["ms"] > 0
    short = summary["rollout_512"]["engines"]
    assert short["ours"]["generated_tokens"] == 8 * 16 and short["megatron"]["generated_tokens"] == 8 * 8
    assert short["ours"]["ms_per_decode_step"] > 0 and summary["rollout_512"]["speedup_ms_per_step"] > 0
    spread = summary["rollout_grace_eos"]["engines"]["ours"]
    assert 32 <= spread["generated_tokens"] < 8 * 32 and spread["mean_rows_per_step"] < 8
    assert summary["rollout_2048"]["engines"]["ours"]["generated_tokens"] == 8 * 48

    paper = summary["paper_step"]
    assert paper["seconds_per_step"] > 0 and all(paper[f"time_{phase}_s"] > 0 for phase in
                                                 ("rollout", "forward", "reward", "update"))
    assert 0 <= paper["padding_share_trimmed"] <= paper["padding_share_padded"]
    breakdown = summary["update_mfu"]["breakdown"]
    assert summary["update_mfu"]["tokens_per_s"] > 0 and breakdown["forward_s"] > 0 and breakdown["optimizer_s"] > 0
    assert {"bench_masked_mean_pool", "bench_grace_rewards"} <= set(summary)


def test_a_step_the_budget_cannot_hold_is_skipped_and_recorded(tmp_path):
    completed = run_check(tmp_path, BUDGET="12")
    assert completed.returncode == 1
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert steps and all(step.get("skipped") == "budget" for step in steps)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["passed"] is False
