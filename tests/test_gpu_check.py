"""``benchmarks/gpu_check.sh --dry-run``: the GPU check's steps on CPU with tiny shapes, so the script cannot rot.

Checks every step's exit status, the tiny bf16 run's two steps (the second resumed from the first's checkpoint), its
rollout-vs-forward log-prob mismatch (bf16: < 0.05 nats per token), the HF export, and the benchmark JSONs (the decode
benchmark runs every row to its cap; trimmed micro-batches never carry more padding than padded ones).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    completed = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=REPO,
                               capture_output=True, text=True, timeout=1500,
                               env=dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="2",
                                        PYTHONWARNINGS="ignore"))
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").is_file() else ""
    assert completed.returncode == 0, completed.stdout + log[-6000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["passed"] and all(step["rc"] == 0 for step in summary["steps"])
    assert [m["step"] for m in summary["tiny_training_metrics"]] == [1, 2]
    assert all(m["logprob_mismatch"] < 0.05 for m in summary["tiny_training_metrics"])
    assert summary["tiny_training_export"]
    assert summary["update_mfu"]["tokens_per_s"] > 0 and summary["smollm2_step"]["seconds_per_step"] > 0
    assert {"bench_pooling", "bench_reward"} <= set(summary)
    decode = summary["rollout_decode"]
    assert decode["generated_tokens"] == 8 * 16 and decode["decode_tokens_per_s"] > 0
    assert 0 <= summary["smollm2_step"]["padding_share_trimmed"] <= summary["smollm2_step"]["padding_share_padded"]
