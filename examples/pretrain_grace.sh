#!/usr/bin/env bash
# GRACE training (supervised by default) with torchrun, single- or multi-node.
#
#   bash examples/pretrain_grace.sh                      # CPU demo (configs/smollm2-cpu-demo.sh), a few minutes
#   CONFIG=examples/configs/qwen2.5-3b-instruct.sh bash examples/pretrain_grace.sh   # the paper's settings
#   bash examples/pretrain_grace.sh --train-iters 20 --save runs/mine                 # extra flags win (passed last)
#
# Multi-node: run the same command on every node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (and
# NPROC_PER_NODE: GPUs per node, default all visible GPUs, or 1 process on CPU). SLURM: examples/slurm/.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

# Use the current Python if megatron-grace is importable there; otherwise set up .venv once (fresh machines).
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import megatron_grace.train" >/dev/null 2>&1; then
    [[ -x .venv/bin/python ]] && .venv/bin/python -c "import megatron_grace.train" >/dev/null 2>&1 \
        || bash tools/setup_venv.sh .venv
    PYTHON=.venv/bin/python
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    DEFAULT_NPROC=$(nvidia-smi -L | wc -l)
else
    DEFAULT_NPROC=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$DEFAULT_NPROC}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

# shellcheck source=configs/last_flag_value.sh
source examples/configs/last_flag_value.sh

DISTRIBUTED_ARGS=(
    --nproc-per-node "$NPROC_PER_NODE"
    --nnodes "$NNODES"
    --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR"
    --master-port "$MASTER_PORT"
)

# The config defines GRACE_ARGS and GRACE_SAVE_DIR; without CONFIG, the CPU demo (its header says why each value).
# It sees the user's flags, so that the demo defaults depending on them follow their values.
CONFIG=${CONFIG:-examples/configs/smollm2-cpu-demo.sh}
# shellcheck source=/dev/null
source "$CONFIG" "$@"
# Where metrics.jsonl, the plot and the export land: the config's save folder unless the user's --save moves it.
RUN_DIR=$(last_flag_value --save "$GRACE_SAVE_DIR" "${GRACE_ARGS[@]}" "$@")

echo "[pretrain_grace] $NNODES node(s) × $NPROC_PER_NODE process(es); run directory $RUN_DIR"
"$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" -m megatron_grace.train "${GRACE_ARGS[@]}" "$@"

if [[ $NODE_RANK == 0 && -f $RUN_DIR/metrics.jsonl ]]; then
    "$PYTHON" tools/plot_metrics.py --run "$RUN_DIR" --output "$RUN_DIR/metrics.png"
    echo "[pretrain_grace] metrics: $RUN_DIR/metrics.jsonl, plot: $RUN_DIR/metrics.png," \
        "report: $RUN_DIR/report.html, HF export: $RUN_DIR/hf"
fi
