#!/bin/bash
# A fixed-seed run of the tiny test model from one source tree: 3 steps, metrics in OUT_DIR/metrics.jsonl.
#   bash results/refactor_fixed_seed/run.sh SRC_TREE TINY_MODEL_DIR OUT_DIR PORT [grace|infonce]
# (TINY_MODEL_DIR: megatron_grace.testing.save_tiny_hf_model("qwen3", DIR, default_tokenizer_dir(), eos_logit_scale=70.0))
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRITON_INTERPRET=1 OMP_NUM_THREADS=1 PYTHONPATH=$1
cd "$1"
case "${5:-grace}" in
  grace) algorithm_args=(--ppo-mini-batch-size 2 --rollout-n 4 --max-response-length 10) ;;
  infonce) algorithm_args=(--algorithm infonce) ;;
  *) echo "unknown algorithm ${5}: grace or infonce" >&2; exit 2 ;;
esac
"${PYTHON:-python}" -m torch.distributed.run --nproc-per-node 1 --master-port "$4" -m megatron_grace.train \
  --hf-model "$2" --train-iters 3 --global-batch-size 4 --micro-batch-size 4 --max-prompt-length 128 --lr 2e-5 \
  --seed 1234 "${algorithm_args[@]}" --save "$3" --no-report --sample-interval 0
