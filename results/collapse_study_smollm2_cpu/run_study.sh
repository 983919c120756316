#!/usr/bin/env bash
# The collapse study of issue 32 (outside CI): GRACE on the CPU demo's settings (examples/configs/smollm2-cpu-demo.sh:
# SmolLM2-135M-Instruct, the bundled WordNet sample, 4 prompts x 4 rollouts, lr 2e-5, KL 0.04, T 0.7) for 64 steps in
# each reward variant (VARIANTS, default "code per-rollout"; "per-rollout-kl0" adds per-rollout without the KL term),
# checkpoints every 16 steps; then each checkpoint at steps 16, 32 and 64 exported to HF and evaluated on the offline
# local suite with rationales (--limit 32, sampling seeds 0, 1, 2), next to the base model with and without
# rationales (step 0). Run from the repository root:
#   STAGE=train|eval|summary|all bash results/collapse_study_smollm2_cpu/run_study.sh [WORK_DIR]
# Two lanes of one thread each keep a 2-core machine busy.
set -euo pipefail
WORK=${1:-runs/collapse_study_smollm2_cpu}
OUT=results/collapse_study_smollm2_cpu
STAGE=${STAGE:-all}
VARIANTS=${VARIANTS:-code per-rollout}
STEPS=${STEPS:-64}
EVAL_STEPS=${EVAL_STEPS:-16 32 64}
SEEDS=${SEEDS:-0 1 2}
LIMIT=${LIMIT:-32}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$WORK/models"

# shellcheck source=../../examples/configs/smollm2-cpu-demo.sh
source examples/configs/smollm2-cpu-demo.sh
variant_flags() {  # the reward flags of a lane name
    case $1 in
        code) echo --reward-variant code ;;
        per-rollout) echo --reward-variant per-rollout ;;
        per-rollout-kl0) echo --reward-variant per-rollout --kl-coef 0 ;;
        *) echo "unknown variant $1" >&2; return 1 ;;
    esac
}
train() {  # train NAME PORT
    local name=$1 port=$2 flags
    read -r -a flags <<< "$(variant_flags "$name")"
    /usr/bin/time -f "$name: %e s wall, %U s user" -a -o "$WORK/wall_times.txt" \
        "$PYTHON" -m torch.distributed.run --nproc-per-node 1 --master-port "$port" -m megatron_grace.train \
        "${GRACE_ARGS[@]}" --train-iters "$STEPS" --save-interval 16 --sample-interval 8 "${flags[@]}" \
        --save "$WORK/$name" --load "$WORK/$name" --export-hf "$WORK/models/$name-step$STEPS" \
        > "$WORK/$name.log" 2>&1
}
evaluate() {  # evaluate MODEL_DIR FLAGS...: one folder, so that summary.md holds every model side by side
    "$PYTHON" tools/eval_mteb.py --model "$1" --tasks local --limit "$LIMIT" --output "$WORK/eval" "${@:2}" \
        >> "$WORK/eval.log" 2>&1
}
evaluate_lane() {  # evaluate_lane NAME: its checkpoints at EVAL_STEPS, with rationales, every seed
    local name=$1 step model
    for step in $EVAL_STEPS; do
        model="$WORK/models/$name-step$step"
        [[ -f $model/config.json ]] || "$PYTHON" tools/convert_hf.py mcore-to-hf \
            --load "$WORK/$name/iter_$(printf %07d "$step")" --save "$model" >> "$WORK/eval.log" 2>&1
        for seed in $SEEDS; do
            evaluate "$model" --rationale --max-new-tokens 128 --temperature 1.0 --seed "$seed"
        done
    done
}

if [[ $STAGE == train || $STAGE == all ]]; then
    port=29640
    for name in $VARIANTS; do
        train "$name" "$port" &
        port=$((port + 1))
    done
    wait
fi
if [[ $STAGE == eval || $STAGE == all ]]; then
    BASE=$("$PYTHON" -c "from megatron_grace.default_model import default_model_dir; print(default_model_dir())")
    (evaluate "$BASE" --no-rationale
     for seed in $SEEDS; do evaluate "$BASE" --rationale --max-new-tokens 128 --temperature 1.0 --seed "$seed"; done
     evaluate_lane "${VARIANTS%% *}") &
    for name in ${VARIANTS#* }; do evaluate_lane "$name"; done
    wait
fi
if [[ $STAGE == summary || $STAGE == all || $STAGE == train ]]; then
    runs=() labels=()
    for name in $VARIANTS; do
        mkdir -p "$OUT/$name"
        cp "$WORK/$name/metrics.jsonl" "$WORK/$name/samples.jsonl" "$OUT/$name/"
        runs+=(--run "$WORK/$name") labels+=(--label "GRACE $name")
    done
    cp "$WORK/wall_times.txt" "$OUT/training_wall_times.txt"
    "$PYTHON" tools/plot_metrics.py "${runs[@]}" "${labels[@]}" --smooth 4 --output "$OUT/training.png" \
        --summary-json "$OUT/training_summary.json"
    "$PYTHON" "$OUT/windows.py" "$OUT" $VARIANTS > "$OUT/windows.md"
fi
if [[ -d $WORK/eval/results && ( $STAGE == summary || $STAGE == all || $STAGE == eval ) ]]; then
    mkdir -p "$OUT/eval"
    cp -r "$WORK/eval/results" "$WORK/eval/summary.md" "$WORK/eval/summary.json" "$OUT/eval/"
fi
