#!/usr/bin/env bash
# One-shot GPU check: everything CUDA-only this project has, run once on one GPU, results as one JSON and one log.
#
#   bash benchmarks/gpu_check.sh              on the GPU machine (one H200: Python 3.12, torch 2.11 + CUDA 13,
#                                             Triton 3.6, transformers 5.17, no Transformer Engine or flash-attn)
#   bash benchmarks/gpu_check.sh --dry-run    the same steps with tiny shapes on CPU (CI runs this)
#
# Steps (each under its own time limit; the whole run ends well inside 8 minutes):
#   kernel_tests     the Triton kernels' tests, compiled for the GPU (interpreter in the dry run)
#   tiny_training    a tiny model, 2 GRACE steps in bf16 at TP1: step 1 with save, step 2 resumed, HF export;
#                    its metrics.jsonl gives logprob_mismatch (rollout tokens vs the one-pass forward) and peak memory
#   smollm2_step     one GRACE step of SmolLM2-135M (random weights of its shape unless the real model is cached):
#                    seconds per phase, padding shares
#   rollout_decode   decode of 80 rows × 2048 new tokens on a random-weight Qwen2.5-1.5B-shaped model (the paper's
#                    per-GPU rollout batch, EOS never drawn): tokens/s and share of the memory-bandwidth bound
#   bench_pooling, bench_reward   kernel bandwidth against torch eager and torch.compile
#   update_mfu       the update's model FLOP utilisation on a random-weight Qwen2.5-1.5B-shaped model, peak memory
# Output: $OUT (else benchmarks/results/gpu_check/) gets gpu_check.json (every step's status and numbers) and
# gpu_check.log (all output). Megatron-Core travels as a cp312 wheel in .whl/ (installed here when not importable),
# the SmolLM2 tokenizer in .gpu_assets/ (see benchmarks/gpu_check.py). Exit status 0 only if every step passed.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
dry_run=0
[[ ${1:-} == --dry-run ]] && dry_run=1
results=${OUT:-$repo/benchmarks/results/gpu_check}
mkdir -p "$results"
work=$(mktemp -d)
log="$results/gpu_check.log"
: > "$log"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
# Every step is a world of its own: a rendezvous inherited from the caller (a test process, a job step) would point
# the single-process benchmarks at a port that is taken.
unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE

if (( dry_run )); then
    python=${PYTHON:-python}
    export TRITON_INTERPRET=1
    device=cpu
else
    python=${PYTHON:-python3}
    export TRITON_INTERPRET=0
    device=cuda
    export MEGATRON_GRACE_CACHE=${MEGATRON_GRACE_CACHE:-$repo/.gpu_assets}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log" 2>&1
    if ! "$python" -c "import megatron_grace.train" >/dev/null 2>&1; then
        # No network there: Megatron-Core from the carried wheel, this checkout without dependencies or build isolation.
        site=/tmp/grace-site
        "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl . \
            --no-build-isolation >> "$log" 2>&1 || { echo "install failed, see $log"; exit 1; }
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi

status=0
# step NAME SECONDS COMMAND...: run with a time limit, append the output to the log, record status and duration.
step() {
    local name=$1 limit=$2 started=$SECONDS rc
    shift 2
    echo "== $name: $*" | tee -a "$log"
    timeout "$limit" "$@" >> "$log" 2>&1
    rc=$?
    printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" $((SECONDS - started)) >> "$work/steps.jsonl"
    echo "   rc $rc in $((SECONDS - started)) s" | tee -a "$log"
    (( rc == 0 )) || status=1
}

kernel_tests=(tests/test_masked_mean_pool.py tests/test_grace_rewards.py tests/test_sample_tokens.py)
# Under the interpreter the full kernel suites are CI's own tests already; the dry run runs the sampling one.
(( dry_run )) && kernel_tests=(tests/test_sample_tokens.py)
step kernel_tests 150 "$python" -m pytest -q -p no:cacheprovider "${kernel_tests[@]}"

tiny="$work/tiny"
port=$("$python" -c "from megatron_grace.platform import free_port; print(free_port())")
train=("$python" -m torch.distributed.run --nproc-per-node 1 --master-port "$port" -m megatron_grace.train
       --hf-model "$tiny/model" --train-data "$tiny/data.jsonl" --bf16 --tensor-model-parallel-size 1
       --global-batch-size 2 --ppo-mini-batch-size 2 --rollout-n 4 --micro-batch-size 4 --max-prompt-length 128
       --max-response-length 16 --sample-interval 0 --save "$tiny/run" --load "$tiny/run" --save-interval 1)
step tiny_model 120 "$python" benchmarks/gpu_check.py tiny-model "$tiny"
step tiny_training 150 "${train[@]}" --train-iters 1
step tiny_training_resumed 150 "${train[@]}" --train-iters 2 --export-hf "$tiny/run/hf"

if (( dry_run )); then
    smollm2_model=$tiny/model
    step_shape=(--global-batch-size 2 --rollout-n 2 --max-response-length 8 --steps 1)
    decode_shape=(--paper-shape tiny --rows 8 --max-new-tokens 16)
    update_shape=(--shape tiny --seq-length 64 --micro-batch-size 2 --micro-batches 2 --steps 1)
else
    smollm2_model=$work/smollm2
    step smollm2_model 120 "$python" benchmarks/gpu_check.py smollm2 "$smollm2_model"
    step_shape=(--global-batch-size 4 --rollout-n 4 --max-response-length 64 --steps 2)
    decode_shape=(--paper-shape qwen2.5-1.5b --rows 80 --max-new-tokens 2048)
    update_shape=(--shape qwen2.5-1.5b --seq-length 1024 --micro-batch-size 4 --micro-batches 4 --steps 3)
fi
step smollm2_step 180 "$python" benchmarks/bench_step.py --hf-model "$smollm2_model" --bf16 "${step_shape[@]}" \
    --output "$work/smollm2_step.json"
step rollout_decode 240 "$python" benchmarks/bench_rollout.py "${decode_shape[@]}" --output "$work/rollout_decode.json"
step bench_pooling 150 "$python" benchmarks/bench_pooling.py --device "$device" --output "$work/bench_pooling.json"
step bench_reward 120 "$python" benchmarks/bench_reward.py --device "$device" --output "$work/bench_reward.json"
step update_mfu 150 "$python" benchmarks/bench_update.py "${update_shape[@]}" --output "$work/update_mfu.json"

"$python" benchmarks/gpu_check.py summary "$work" "$results/gpu_check.json" 2>> "$log" | tee -a "$log"
rm -rf "$work"
exit $status
