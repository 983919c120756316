# shellcheck shell=bash
# Baseline: unsupervised SimCSE training of Qwen2.5-1.5B-Instruct on wiki1m sentences, 8xH100 nodes.
#
# The paper's unsupervised contrastive baseline, in the same system as GRACE: same model builder, prompt, pooling,
# data, layouts, checkpoints and export; no rationale. Each sentence is embedded twice with hidden dropout 0.1 (the
# two views); every other sentence of the global batch is a negative. Shared baseline settings in paper_defaults.sh
# (BASELINE_PAPER_ARGS): 256 sentences per step, lr 1e-5, tau 0.05, 1000 steps, bf16. Dropout replay (the gradient
# pass sees the embedding pass's masks) needs sequence parallelism off, which TP1 is.
#
# Layout as qwen2.5-1.5b-instruct-unsup.sh: TP1 PP1, every GPU data parallel; micro-batches of 8 sequences.
# Model folder and data as for GRACE (see qwen2.5-1.5b-instruct-unsup.sh); override with HF_MODEL, TRAIN_DATA,
# SAVE_DIR, WANDB_PROJECT.

# shellcheck source=SCRIPTDIR/paper_defaults.sh
source "$(dirname "${BASH_SOURCE[0]}")/paper_defaults.sh"

paper_config BASELINE_PAPER_ARGS unsupervised models/Qwen2.5-1.5B-Instruct data/wiki1m/train.txt \
    runs/simcse-qwen2.5-1.5b-instruct-unsup \
    --algorithm simcse \
    --hidden-dropout 0.1 \
    --tensor-model-parallel-size 1 \
    --pipeline-model-parallel-size 1 \
    --micro-batch-size 8
