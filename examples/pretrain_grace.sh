#!/usr/bin/env bash
# GRACE training (supervised by default) with torchrun, single- or multi-node.
#
#   bash examples/pretrain_grace.sh                      # CPU demo: the embedded SmolLM2-135M-Instruct, a few minutes
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

TRAIN_MODE=${TRAIN_MODE:-supervised}
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

# last_flag_value FLAG DEFAULT ARGS...: the value the trainer will see for FLAG (its last occurrence wins).
last_flag_value() {
    local name=$1 value=$2
    shift 2
    while (( $# )); do
        case $1 in
            "$name") (( $# >= 2 )) && value=$2 ;;
            "$name"=*) value=${1#*=} ;;
        esac
        shift
    done
    echo "$value"
}

DISTRIBUTED_ARGS=(
    --nproc-per-node "$NPROC_PER_NODE"
    --nnodes "$NNODES"
    --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR"
    --master-port "$MASTER_PORT"
)

if [[ -n ${CONFIG:-} ]]; then
    # shellcheck source=/dev/null
    source "$CONFIG"
    RUN_DIR=${SAVE_DIR:-runs/$(basename "$CONFIG" .sh)}
else
    # CPU demo on the embedded default model and the bundled WordNet sample: small batches, a learning rate that
    # moves a 135M model within minutes. Rationales up to 128 tokens at T 0.7: at T 1.0 SmolLM2 rambles (half of its
    # rationales do not end within 128 tokens; with a 48-token cap 70 % were cut and penalised, and GRPO learnt
    # little but stopping early). Four optimizer steps per step teach it to finish before the cap within a few
    # steps; a KL term to the initial policy (beta 0.04, DeepSeekMath's GRPO value) keeps the rationales from
    # shrinking to ~20 tokens on the way (results/quality_smollm2_cpu/README.md). --hf-model defaults to the
    # embedded SmolLM2.
    #
    # The user's flags come last and win; the demo defaults that depend on other flags follow the user's values:
    # the KL term only for GRPO (the baselines refuse it), the global batch 4 prompts or one per data-parallel rank
    # if there are more ranks, and the PPO mini-batch a quarter of the global batch, rounded down to a multiple of
    # the data-parallel size (the whole batch where that does not divide it).
    RUN_DIR=${SAVE_DIR:-runs/grace-smollm2-${TRAIN_MODE}}
    tensor_parallel=$(last_flag_value --tensor-model-parallel-size 1 "$@")
    pipeline_parallel=$(last_flag_value --pipeline-model-parallel-size 1 "$@")
    data_parallel=$(( NNODES * NPROC_PER_NODE / (tensor_parallel * pipeline_parallel) ))
    (( data_parallel >= 1 )) || data_parallel=1
    demo_global_batch=$(( data_parallel > 4 ? data_parallel : 4 ))
    global_batch=$(last_flag_value --global-batch-size "$demo_global_batch" "$@")
    mini_batch=$(( global_batch / 4 / data_parallel * data_parallel ))
    if (( mini_batch < 1 || global_batch % mini_batch != 0 )); then
        mini_batch=$global_batch
    fi
    GRACE_ARGS=(
        --train-mode "$TRAIN_MODE"
        --train-iters "${TRAIN_ITERS:-8}"
        --global-batch-size "$demo_global_batch"
        --ppo-mini-batch-size "$mini_batch"
        --rollout-n 4
        --micro-batch-size 4
        --max-prompt-length 256
        --max-response-length 128
        --rollout-temperature 0.7
        --lr 2e-5
        --seed 1234
        --save "$RUN_DIR"
        --load "$RUN_DIR"
        --save-interval 4
        --sample-interval 4
        --export-hf  # <save>/hf: follows a --save given on the command line
    )
    if [[ $(last_flag_value --algorithm grace "$@") == grace ]]; then
        GRACE_ARGS+=(--kl-coef 0.04)
    fi
fi

echo "[pretrain_grace] $NNODES node(s) × $NPROC_PER_NODE process(es); run directory $RUN_DIR"
"$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" -m megatron_grace.train "${GRACE_ARGS[@]}" "$@"

if [[ $NODE_RANK == 0 && -f $RUN_DIR/metrics.jsonl ]]; then
    "$PYTHON" tools/plot_metrics.py --run "$RUN_DIR" --output "$RUN_DIR/metrics.png"
    echo "[pretrain_grace] metrics: $RUN_DIR/metrics.jsonl, plot: $RUN_DIR/metrics.png," \
        "report: $RUN_DIR/report.html, HF export: $RUN_DIR/hf"
fi
