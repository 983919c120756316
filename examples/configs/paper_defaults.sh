# shellcheck shell=bash
# GRACE hyperparameters shared by every config in this folder (sourced by them; not a config on its own).
#
# Values from docs/algorithm.md ("GRACE", arXiv 2510.04506, and its reference verl code):
#   batch         64 prompts x 8 rollouts per step; PPO mini-batch 16 prompts (4 optimizer steps per step); 1 epoch
#   optimizer     AdamW, lr 1e-6 constant, weight decay 0.01, grad clip 1.0, bf16
#   lengths       max prompt 1024 tokens, max response 2048 tokens (right truncation; a truncated response gets -1)
#   reward        code variant; tau 0.1; clustering weight (lambda1) 0.2; cross-group weight (lambda2) 0.2
#   objective     GRPO, advantage = R - group mean (no std division); PPO clip 0.2 / 0.2, dual clip c = 3;
#                 KL coefficient 0 (no reference model); entropy coefficient 0
#   sampling      main rollouts T = 1.0; query / anchor / negative rationale T = 0.5
#   length        ~1000 steps (the paper's curves; "2 epochs" nominal on the 1.5M-row E5 set)
#
# Model size, parallel layout, data and output paths are per config; anything here can be overridden by passing the
# flag again on the command line (the launch scripts put "$@" last and the last occurrence of a flag wins).

# The trainer's defaults (megatron_grace/config.py) are the paper's settings above; this array holds only what a paper
# run sets differently from them (tests/test_config.py checks that nothing here repeats a default).
# shellcheck disable=SC2034  # read by the config that sources this file
GRACE_PAPER_ARGS=(
    --bf16
    --save-interval 100
    --sample-interval 50
)

# GRACE_ARGS of a paper config: the shared flags (the array named first: GRACE_PAPER_ARGS or BASELINE_PAPER_ARGS),
# the training mode, model folder and data, the config's own flags (the arguments after the first five: layout,
# algorithm) and the run-directory flags. The save folder is also --load, so resubmitting the same job resumes from
# its latest checkpoint; WANDB_PROJECT, when set, adds wandb logging.
#   paper_config SHARED_ARRAY MODE DEFAULT_HF_MODEL DEFAULT_TRAIN_DATA DEFAULT_SAVE_DIR CONFIG_FLAGS...
# Environment overrides: HF_MODEL, TRAIN_DATA, SAVE_DIR, WANDB_PROJECT.
paper_config() {
    local -n shared=$1
    local mode=$2
    GRACE_HF_MODEL=${HF_MODEL:-$3}
    local train_data=${TRAIN_DATA:-$4}
    GRACE_SAVE_DIR=${SAVE_DIR:-$5}
    shift 5
    # shellcheck disable=SC2034  # read by the launcher that sources the config
    GRACE_ARGS=(
        "${shared[@]}"
        --hf-model "$GRACE_HF_MODEL"
        --train-data "$train_data"
        --train-mode "$mode"
        "$@"
        --save "$GRACE_SAVE_DIR"
        --load "$GRACE_SAVE_DIR"
        --export-hf  # <save>/hf, and TensorBoard under <save>/tensorboard: both follow a --save given later
    )
    if [[ -n ${WANDB_PROJECT:-} ]]; then
        GRACE_ARGS+=(--wandb-project "$WANDB_PROJECT")
    fi
}

# GRACE configs: grace_paper_config MODE DEFAULT_HF_MODEL DEFAULT_TRAIN_DATA DEFAULT_SAVE_DIR LAYOUT_FLAGS...
grace_paper_config() {
    paper_config GRACE_PAPER_ARGS "$@"
}

# The contrastive baselines of the paper's table (InfoNCE supervised, SimCSE unsupervised), trained in this system on
# the same model, data, prompt and pooling, without rationales (megatron_grace/contrastive.py). The spec gives no
# hyperparameters for them; these are the usual full fine-tuning settings of LLM contrastive embedders, stated once:
#   batch         256 texts per step (in-batch negatives: every other text of the global batch), 1000 steps
#   optimizer     AdamW, lr 1e-5 constant, weight decay 0.01, grad clip 1.0, bf16
#   loss          InfoNCE with cosine similarity, temperature 0.05 (SimCSE's); SimCSE: hidden dropout 0.1
#   lengths       max prompt 1024 tokens, as GRACE
# Only the flags that differ from the trainer's defaults (1000 steps, max prompt 1024, weight decay, clipping and τ
# 0.05 are the defaults).
# shellcheck disable=SC2034  # read by the config that sources this file
BASELINE_PAPER_ARGS=(
    --global-batch-size 256
    --lr 1e-5
    --bf16
    --save-interval 100
)

