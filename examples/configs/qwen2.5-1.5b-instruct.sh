# shellcheck shell=bash
# GRACE, supervised, Qwen2.5-1.5B-Instruct on one or more 8xH100 nodes.
#
# Paper settings (see paper_defaults.sh and docs/algorithm.md): 64 prompts x 8 rollouts, mini-batch 16 prompts,
# lr 1e-6 constant, wd 0.01, clip-grad 1.0, bf16, prompt 1024 / response 2048, tau 0.1, lambda1 = lambda2 = 0.2,
# kl 0, entropy 0, clip 0.2/0.2, dual clip 3, T_query 0.5, T_rollout 1.0, 1000 steps. Paper MTEB: 45.48 (base 30.33).
#
# Layout: 1.5B parameters (28 layers, hidden 1536, 12 heads / 2 KV heads, tied embeddings) fit one H100 with room
# for rollout KV cache, so TP1 PP1 and all 8 GPUs of a node are data parallel: fastest, no TP communication.
#
# Model folder (--hf-model takes a local HF folder, not a Hub id), once, where there is internet:
#   huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct --local-dir models/Qwen2.5-1.5B-Instruct
# Override with environment variables: HF_MODEL (the HF folder), TRAIN_DATA, SAVE_DIR,
# WANDB_PROJECT. Data: python tools/prepare_data.py e5.jsonl --mode supervised --hf-model "$HF_MODEL"
#       --output-dir data/e5

# shellcheck source=SCRIPTDIR/paper_defaults.sh
source "$(dirname "${BASH_SOURCE[0]}")/paper_defaults.sh"

grace_paper_config supervised models/Qwen2.5-1.5B-Instruct data/e5/train.jsonl runs/grace-qwen2.5-1.5b-instruct-sup \
    --tensor-model-parallel-size 1 \
    --pipeline-model-parallel-size 1 \
    --micro-batch-size 4
