#!/usr/bin/env bash
# GPU check for the kernels: the kernel tests compiled for the GPU (no interpreter), then both benchmarks at the
# paper's shapes. Fits in ~8 minutes on one H100. Results (JSON + logs) go to $OUT if set, else benchmarks/results/.
#   bash benchmarks/gpu_check.sh        (PYTHON=/path/to/python to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
results="${OUT:-benchmarks/results}"
python="${PYTHON:-python}"
mkdir -p "$results"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/gpu.txt"
timeout 150 "$python" -m pytest -q tests/test_masked_mean_pool.py tests/test_grace_rewards.py 2>&1 \
    | tee "$results/kernel_tests.log" || status=1
timeout 180 "$python" benchmarks/bench_pooling.py --device cuda --output "$results/bench_pooling.json" 2>&1 \
    | tee "$results/bench_pooling.log" || status=1
timeout 150 "$python" benchmarks/bench_reward.py --device cuda --output "$results/bench_reward.json" 2>&1 \
    | tee "$results/bench_reward.log" || status=1
exit $status
