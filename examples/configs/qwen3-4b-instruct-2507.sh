# shellcheck shell=bash
# GRACE, supervised, Qwen3-4B-Instruct-2507 on one or more 8xH100 nodes.
#
# Paper settings (see paper_defaults.sh and docs/algorithm.md): 64 prompts x 8 rollouts, mini-batch 16 prompts,
# lr 1e-6 constant, wd 0.01, clip-grad 1.0, bf16, prompt 1024 / response 2048, tau 0.1, lambda1 = lambda2 = 0.2,
# kl 0, entropy 0, clip 0.2/0.2, dual clip 3, T_query 0.5, T_rollout 1.0, 1000 steps. Paper MTEB: 56.64 (base 45.49).
#
# Model: 4B parameters: 36 layers, hidden 2560, 32 heads / 8 KV heads, tied embeddings.
# Layout: TP2 PP1 with sequence parallel, 4 data-parallel groups per 8-GPU node. TP2 halves the bf16 weights, the fp32
# gradient buffer and the vocab-parallel logits (a 151k vocabulary x 3072-token sequences) on each GPU, which
# leaves room for the rollout KV cache of 3072-token sequences; 32 query and 8 KV heads split evenly over 2 ranks.
# TP1 may also fit with --micro-batch-size 1; measure before switching (it trades memory for TP communication).
#
# Model folder (--hf-model takes a local HF folder, not a Hub id), once, where there is internet:
#   huggingface-cli download Qwen/Qwen3-4B-Instruct-2507 --local-dir models/Qwen3-4B-Instruct-2507
# Override with environment variables: HF_MODEL (the HF folder), TRAIN_DATA, SAVE_DIR,
# WANDB_PROJECT. Data: python tools/prepare_data.py e5.jsonl --mode supervised --hf-model "$HF_MODEL"
#       --output-dir data/e5

# shellcheck source=SCRIPTDIR/paper_defaults.sh
source "$(dirname "${BASH_SOURCE[0]}")/paper_defaults.sh"

grace_paper_config supervised models/Qwen3-4B-Instruct-2507 data/e5/train.jsonl runs/grace-qwen3-4b-instruct-2507-sup \
    --tensor-model-parallel-size 2 \
    --pipeline-model-parallel-size 1 \
    --sequence-parallel \
    --micro-batch-size 2
