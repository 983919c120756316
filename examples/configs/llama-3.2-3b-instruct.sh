# shellcheck shell=bash
# GRACE, supervised, Llama-3.2-3B-Instruct on one or more 8xH100 nodes.
#
# Paper settings (see paper_defaults.sh and docs/algorithm.md): 64 prompts x 8 rollouts, mini-batch 16 prompts,
# lr 1e-6 constant, wd 0.01, clip-grad 1.0, bf16, prompt 1024 / response 2048, tau 0.1, lambda1 = lambda2 = 0.2,
# kl 0, entropy 0, clip 0.2/0.2, dual clip 3, T_query 0.5, T_rollout 1.0, 1000 steps. Paper MTEB: 48.49 (base 39.34).
#
# Model: 3B parameters: 28 layers, hidden 3072, 24 heads / 8 KV heads, tied embeddings.
# Layout: TP2 PP1 with sequence parallel, 4 data-parallel groups per 8-GPU node. TP2 halves the bf16 weights, the fp32
# gradient buffer and the vocab-parallel logits (a 128k vocabulary x 3072-token sequences) on each GPU, which
# leaves room for the rollout KV cache of 3072-token sequences; 24 query and 8 KV heads split evenly over 2 ranks.
# TP1 may also fit with --micro-batch-size 1; measure before switching (it trades memory for TP communication).
#
# Model folder (--hf-model takes a local HF folder, not a Hub id), once, where there is internet:
#   huggingface-cli download meta-llama/Llama-3.2-3B-Instruct --local-dir models/Llama-3.2-3B-Instruct
# Override with environment variables: HF_MODEL (the HF folder), TRAIN_DATA, SAVE_DIR,
# WANDB_PROJECT. Data: python tools/prepare_data.py e5.jsonl --mode supervised --hf-model "$HF_MODEL"
#       --output-dir data/e5

# shellcheck source=SCRIPTDIR/paper_defaults.sh
source "$(dirname "${BASH_SOURCE[0]}")/paper_defaults.sh"

grace_paper_config supervised models/Llama-3.2-3B-Instruct data/e5/train.jsonl runs/grace-llama-3.2-3b-instruct-sup \
    --tensor-model-parallel-size 2 \
    --pipeline-model-parallel-size 1 \
    --sequence-parallel \
    --micro-batch-size 2
