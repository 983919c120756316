# shellcheck shell=bash
# The CPU demo: GRACE on the embedded SmolLM2-135M-Instruct and the bundled WordNet sample, a few minutes on CPU.
# examples/pretrain_grace.sh sources it when no CONFIG is given; results/quality_smollm2_cpu/run_study.sh builds its
# GRACE runs from it (with its own step count and learning rate after it).
#
#   source examples/configs/smollm2-cpu-demo.sh [USER_FLAGS...]   # defines GRACE_ARGS and GRACE_SAVE_DIR
#
# Small batches and a learning rate that moves a 135M model within minutes. Rationales up to 128 tokens at T 0.7: at
# T 1.0 SmolLM2 rambles (half of its rationales do not end within 128 tokens; with a 48-token cap 70 % were cut and
# penalised, and GRPO learnt little but stopping early). Four optimizer steps per step teach it to finish before the
# cap within a few steps; a KL term to the initial policy (beta 0.04, DeepSeekMath's GRPO value) keeps the rationales
# from shrinking to ~20 tokens on the way (results/quality_smollm2_cpu/README.md). The per-rollout reward variant: in
# the paper's `code` variant the negative and cross-group terms are the same for every rollout of a group and cancel
# in the advantage, and on these settings SmolLM2 learnt rationales that make every text look alike (64 steps: the
# margin cos(q, pos) - cos(q, neg) fell from 0.007 to -0.002 while the cross-group cosine rose from 0.86 to 0.95);
# per-rollout scores each rationale against the negative and the other groups, and the margin rose from 0.002 to
# 0.027 in 32 steps with the cross-group cosine flat (issue 32, results/collapse_study_smollm2_cpu/). The paper
# configs keep `code` for fidelity. --hf-model and --train-data default to the embedded SmolLM2 and the bundled sample.
#
# The user's flags (the arguments) are not part of GRACE_ARGS (the launcher passes them after it, and the last
# occurrence of a flag wins); the demo defaults that depend on other flags follow their values: the KL term only for
# GRPO (the baselines refuse it), the global batch 4 prompts or one per data-parallel rank if there are more ranks,
# and the PPO mini-batch a quarter of the global batch, rounded down to a multiple of the data-parallel size (the
# whole batch where that does not divide it).
# Environment: TRAIN_MODE (supervised), TRAIN_ITERS (8), SAVE_DIR (runs/grace-smollm2-<mode>), NNODES and
# NPROC_PER_NODE (1 and 1: the data-parallel size).

# shellcheck source=SCRIPTDIR/last_flag_value.sh
source "$(dirname "${BASH_SOURCE[0]}")/last_flag_value.sh"

demo_train_mode=${TRAIN_MODE:-supervised}
GRACE_SAVE_DIR=${SAVE_DIR:-runs/grace-smollm2-${demo_train_mode}}
demo_tensor_parallel=$(last_flag_value --tensor-model-parallel-size 1 "$@")
demo_pipeline_parallel=$(last_flag_value --pipeline-model-parallel-size 1 "$@")
demo_data_parallel=$(( ${NNODES:-1} * ${NPROC_PER_NODE:-1} / (demo_tensor_parallel * demo_pipeline_parallel) ))
(( demo_data_parallel >= 1 )) || demo_data_parallel=1
demo_global_batch=$(( demo_data_parallel > 4 ? demo_data_parallel : 4 ))
demo_user_global_batch=$(last_flag_value --global-batch-size "$demo_global_batch" "$@")
demo_mini_batch=$(( demo_user_global_batch / 4 / demo_data_parallel * demo_data_parallel ))
if (( demo_mini_batch < 1 || demo_user_global_batch % demo_mini_batch != 0 )); then
    demo_mini_batch=$demo_user_global_batch
fi
# shellcheck disable=SC2034  # read by the script that sources this file
GRACE_ARGS=(
    --train-mode "$demo_train_mode"
    --train-iters "${TRAIN_ITERS:-8}"
    --global-batch-size "$demo_global_batch"
    --ppo-mini-batch-size "$demo_mini_batch"
    --rollout-n 4
    --micro-batch-size 4
    --max-prompt-length 256
    --max-response-length 128
    --rollout-temperature 0.7
    --reward-variant per-rollout
    --lr 2e-5
    --seed 1234
    --save "$GRACE_SAVE_DIR"
    --load "$GRACE_SAVE_DIR"
    --save-interval 4
    --sample-interval 4
    --export-hf  # <save>/hf: follows a --save given on the command line
)
if [[ $(last_flag_value --algorithm grace "$@") == grace ]]; then
    GRACE_ARGS+=(--kl-coef 0.04)
fi
