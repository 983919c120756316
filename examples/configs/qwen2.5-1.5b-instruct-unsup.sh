# shellcheck shell=bash
# GRACE, unsupervised (one sentence per example, SimCSE-style), Qwen2.5-1.5B-Instruct on 8xH100 nodes.
#
# Paper settings (see paper_defaults.sh and docs/algorithm.md): 64 prompts x 8 rollouts, mini-batch 16 prompts,
# lr 1e-6 constant, wd 0.01, clip-grad 1.0, bf16, prompt 1024 / response 2048, tau 0.1, lambda1 = lambda2 = 0.2,
# kl 0, entropy 0, clip 0.2/0.2, dual clip 3, T_rollout 1.0, 1000 steps; T 0.5 here samples the anchor: the
# same sentence's rationale, shared by its 8 rollouts.
# Reward (code variant): R = pos/tau + lambda1 * clust/tau - lambda2 * cross/tau, pos against the anchor.
#
# Layout: 1.5B parameters (28 layers, hidden 1536, 12 heads / 2 KV heads, tied embeddings) fit one H100 with room
# for rollout KV cache, so TP1 PP1 and all 8 GPUs of a node are data parallel: fastest, no TP communication.
#
# Model folder (--hf-model takes a local HF folder, not a Hub id), once, where there is internet:
#   huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct --local-dir models/Qwen2.5-1.5B-Instruct
# Override with environment variables: HF_MODEL (the HF folder), TRAIN_DATA, SAVE_DIR,
# WANDB_PROJECT. Data: python tools/prepare_data.py wiki1m_for_simcse.txt --mode unsupervised --hf-model "$HF_MODEL"
#       --output-dir data/wiki1m

# shellcheck source=SCRIPTDIR/paper_defaults.sh
source "$(dirname "${BASH_SOURCE[0]}")/paper_defaults.sh"

grace_paper_config unsupervised models/Qwen2.5-1.5B-Instruct data/wiki1m/train.txt \
    runs/grace-qwen2.5-1.5b-instruct-unsup \
    --tensor-model-parallel-size 1 \
    --pipeline-model-parallel-size 1 \
    --micro-batch-size 4
