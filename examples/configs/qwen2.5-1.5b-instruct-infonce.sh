# shellcheck shell=bash
# Baseline: contrastive (InfoNCE) training of Qwen2.5-1.5B-Instruct on the supervised E5 data, 8xH100 nodes.
#
# The paper's "CL" column (Qwen2.5-1.5B: Base 30.33 -> CL 43.21 -> GRACE 45.48), in the same system as GRACE: same
# model builder, prompt, pooling, data, layouts, checkpoints and export; no rationale. Shared baseline settings in
# paper_defaults.sh (BASELINE_PAPER_ARGS): 256 queries per step, lr 1e-5, tau 0.05, 1000 steps, bf16. Candidates of
# each query: every positive and every hard negative of the global batch (gathered over data-parallel ranks).
#
# Layout as qwen2.5-1.5b-instruct.sh: TP1 PP1, every GPU data parallel; 32 queries per GPU on one node (96 sequences:
# query, positive, negative), in micro-batches of 8.
# Model folder and data as for GRACE (see qwen2.5-1.5b-instruct.sh); override with HF_MODEL, TRAIN_DATA, SAVE_DIR,
# WANDB_PROJECT.

# shellcheck source=SCRIPTDIR/paper_defaults.sh
source "$(dirname "${BASH_SOURCE[0]}")/paper_defaults.sh"

paper_config BASELINE_PAPER_ARGS supervised models/Qwen2.5-1.5B-Instruct data/e5/train.jsonl \
    runs/infonce-qwen2.5-1.5b-instruct-sup \
    --algorithm infonce \
    --tensor-model-parallel-size 1 \
    --pipeline-model-parallel-size 1 \
    --micro-batch-size 8
