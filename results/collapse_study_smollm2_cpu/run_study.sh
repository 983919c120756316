#!/usr/bin/env bash
# The collapse study of issue 32 (outside CI): GRACE on the CPU demo's settings (examples/configs/smollm2-cpu-demo.sh:
# SmolLM2-135M-Instruct, the bundled WordNet sample, 4 prompts x 4 rollouts, lr 2e-5, KL 0.04, T 0.7) for 64 steps in
# each reward variant (VARIANTS, default "code per-rollout"; "per-rollout-kl0" adds per-rollout without the KL term),
# checkpoints every 16 steps; then each checkpoint at steps 16, 32 and 64 exported to HF and evaluated on the offline
# local suite with rationales (--limit 32, sampling seeds 0, 1, 2; the base model with and without rationales, step 0,
# is results/quality_smollm2_cpu/'s). A rerun of the eval stage runs only what is missing. From the repository root:
#   STAGE=train|eval|summary|all bash results/collapse_study_smollm2_cpu/run_study.sh [WORK_DIR]
# Two lanes of one thread each keep a 2-core machine busy. TRAIN_SEED=N trains with --seed N instead of the demo's
# (other prompts in another order, other sampling noise) and keeps its results apart, in train_seed_N/.
set -euo pipefail
WORK=${1:-runs/collapse_study_smollm2_cpu}
STUDY=results/collapse_study_smollm2_cpu
TRAIN_SEED=${TRAIN_SEED:-}
OUT=$STUDY${TRAIN_SEED:+/train_seed_$TRAIN_SEED}
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
        "${GRACE_ARGS[@]}" ${TRAIN_SEED:+--seed "$TRAIN_SEED"} --train-iters "$STEPS" --save-interval 16 \
        --sample-interval 8 "${flags[@]}" \
        --save "$WORK/$name" --load "$WORK/$name" --export-hf "$WORK/models/$name-step$STEPS" \
        > "$WORK/$name.log" 2>&1
}
evaluate() {  # evaluate MODEL_DIR SEED: one folder, so that summary.md holds every model side by side
    "$PYTHON" tools/eval_mteb.py --model "$1" --tasks local --limit "$LIMIT" --output "$WORK/eval" \
        --rationale --max-new-tokens 128 --temperature 1.0 --seed "$2" >> "$WORK/eval.log" 2>&1
}
evaluated() {  # evaluated MODEL_NAME SEED: every task of LOCAL_TASKS has its result in the folder (a rerun resumes)
    local task
    for task in $LOCAL_TASKS; do
        compgen -G "$WORK/eval/results/megatron-grace__$1/*/experiments/*rationale_True__seed_$2__*/$task.json" \
            > /dev/null || return 1
    done
}
export_checkpoint() {  # export_checkpoint NAME STEP: the HF model of one saved step, once
    local model="$WORK/models/$1-step$2"
    [[ -f $model/config.json ]] || "$PYTHON" tools/convert_hf.py mcore-to-hf \
        --load "$WORK/$1/iter_$(printf %07d "$2")" --save "$model" >> "$WORK/eval.log" 2>&1
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
    # Every (lane, step, seed) not yet evaluated, seed-major so that a cut-short run has every model at seed 0 first,
    # dealt round-robin to LANES single-thread lanes. Base without and with rationales (step 0) is not repeated here:
    # results/quality_smollm2_cpu/ holds it on the same suite, limit and sampling settings.
    LOCAL_TASKS=$("$PYTHON" -c "from megatron_grace.eval.mteb_eval import LOCAL_TASK_NAMES; print(*LOCAL_TASK_NAMES)")
    jobs=()
    for seed in $SEEDS; do
        for name in $VARIANTS; do
            for step in $EVAL_STEPS; do
                evaluated "$name-step$step" "$seed" || jobs+=("$name $step $seed")
            done
        done
    done
    for job in "${jobs[@]}"; do read -r name step _ <<< "$job"; export_checkpoint "$name" "$step"; done
    for ((lane = 0; lane < ${LANES:-2}; lane++)); do
        (for ((i = lane; i < ${#jobs[@]}; i += ${LANES:-2})); do
             read -r name step seed <<< "${jobs[i]}"
             evaluate "$WORK/models/$name-step$step" "$seed"
         done) &
    done
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
    "$PYTHON" "$STUDY/windows.py" "$OUT" $VARIANTS > "$OUT/windows.md"
fi
if [[ -d $WORK/eval/results && ( $STAGE == summary || $STAGE == all || $STAGE == eval ) ]]; then
    mkdir -p "$OUT/eval"
    cp -r "$WORK/eval/results" "$WORK/eval/summary.md" "$WORK/eval/summary.json" "$OUT/eval/"
    "$PYTHON" "$STUDY/eval_table.py" "$WORK/eval" results/quality_smollm2_cpu/eval "$OUT/eval.png" > "$OUT/eval_table.md"
fi
