#!/usr/bin/env bash
# One-shot GPU check: everything CUDA-only this project has, run once on one GPU. Every step has its own time limit
# and writes its status line and its JSON into the results folder the moment it ends, so a check killed from outside
# keeps every finished step; a step whose limit no longer fits the check's budget is recorded as skipped.
#
#   bash benchmarks/gpu_check.sh              on the GPU machine (one H100 or H200: Python 3.12, torch 2.11 + CUDA 13,
#                                             Triton 3.6, transformers 5.17, no Transformer Engine or flash-attn)
#   bash benchmarks/gpu_check.sh --dry-run    the same steps with tiny shapes on CPU (CI runs this)
#
# Steps, most informative and cheapest first (each with its limit in seconds, cut to what is left of BUDGET, 340 s by
# default, so the whole check stays under it):
#   kernel_decode_attention   tests/test_decode_attention.py compiled for the GPU (each kernel file is its own step)
#   bench_decode_attention    the decode attention kernel vs SDPA at 80 rows x 2,048 keys: time, share of copy bandwidth
#   rollout_512               our graphed decode, Qwen2.5-1.5B shape (random weights, bf16), 80 rows x 512 new tokens,
#                             EOS off; the Megatron-decoded engine for 64 tokens in the same process: ms per step,
#                             share of the bandwidth bound, peak memory
#   rollout_grace_eos         the same batch with a paper-like spread of response lengths (EOS honoured), cap 2,048
#   rollout_2048              80 rows x 2,048 new tokens, EOS off
#   tiny_training             a tiny model, bf16: 2 GRACE steps with a resume after step 1 and an HF export, and an
#                             uninterrupted 2-step run; non-zero update, resume exact (gpu_check.py check-training)
#   kernel_sample_tokens, kernel_masked_mean_pool, kernel_grace_rewards   the other kernel test files
#   paper_step                one GRACE step on the Qwen2.5-1.5B shape: 16 prompts x 4 rollouts (+ query and
#                             negative rows), 512-token rationales: rollout, forward, reward and update seconds
#   update_mfu                the update's MFU and time breakdown on the Qwen2.5-1.5B shape
#   bench_masked_mean_pool, bench_grace_rewards   kernel bandwidth against torch eager and torch.compile
# Output: $OUT (else benchmarks/results/gpu_check/): steps.jsonl, one JSON per step, gpu_check.log (all output, with
# the failing test names) and, at the end, gpu_check.json (everything merged). Megatron-Core travels as a cp312 wheel
# in .whl/ (installed here when not importable), the SmolLM2 tokenizer in .gpu_assets/ (see benchmarks/gpu_check.py).
# Exit status 0 only if every step passed.
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
: > "$results/steps.jsonl"
budget=${BUDGET:-340}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
# Every step is a world of its own: a rendezvous inherited from the caller (a test process, a job step) would point
# the single-process benchmarks at a port that is taken.
unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE

if (( dry_run )); then
    python=${PYTHON:-python}
    export TRITON_INTERPRET=1
    device=cpu
    budget=${BUDGET:-1200}
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
started=$SECONDS
# step NAME SECONDS COMMAND...: run with a time limit (or skip it when the check's budget cannot hold the limit),
# append the output to the log, and record status and duration at once.
step() {
    local name=$1 limit=$2 begun=$SECONDS rc left
    shift 2
    left=$(( budget - (SECONDS - started) ))
    if (( left < 15 )); then
        echo "== $name: skipped, $left s of the check's $budget s left" | tee -a "$log"
        printf '{"step": "%s", "rc": -1, "seconds": 0, "skipped": "budget"}\n' "$name" >> "$results/steps.jsonl"
        status=1
        return
    fi
    # The dry run's limits are three times the GPU's: on a CPU the tiny shapes still run interpreted kernels and
    # three torchrun launches (tiny_training), and a test machine may be busy with other tests.
    (( dry_run )) && limit=$(( limit * 3 ))
    (( limit <= left )) || limit=$left
    echo "== $name: $*" | tee -a "$log"
    timeout "$limit" "$@" >> "$log" 2>&1
    rc=$?
    printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" $((SECONDS - begun)) >> "$results/steps.jsonl"
    echo "   rc $rc in $((SECONDS - begun)) s" | tee -a "$log"
    (( rc == 0 )) || status=1
}

# kernel_tests NAME SECONDS FILE: one kernel test file, its failing tests named in the log (-rf). The dry run
# only collects the files CI runs anyway (their imports and parameters), except the decode attention's.
kernel_tests() {
    local only_collect=()
    (( dry_run )) && [[ $3 != tests/test_decode_attention.py ]] && only_collect=(--collect-only)
    step "$1" "$2" "$python" -m pytest -q -rf -p no:cacheprovider "${only_collect[@]}" "$3"
}

if (( dry_run )); then
    attention_shape=(--rows 4 --context 128)
    rollout_short=(--paper-shape tiny --rows 8 --max-new-tokens 16 --megatron-max-new-tokens 8)
    rollout_eos=(--paper-shape tiny --rows 8 --max-new-tokens 32 --eos)
    rollout_long=(--paper-shape tiny --rows 8 --max-new-tokens 48)
    step_shape=(--global-batch-size 2 --rollout-n 2 --max-response-length 8 --steps 1)
    update_shape=(--shape tiny --seq-length 64 --micro-batch-size 2 --micro-batches 2 --steps 1)
else
    attention_shape=(--rows 80 --context 2048)
    rollout_short=(--paper-shape qwen2.5-1.5b --rows 80 --max-new-tokens 512 --megatron-max-new-tokens 64)
    rollout_eos=(--paper-shape qwen2.5-1.5b --rows 80 --max-new-tokens 2048 --eos)
    rollout_long=(--paper-shape qwen2.5-1.5b --rows 80 --max-new-tokens 2048)
    step_shape=(--global-batch-size 16 --rollout-n 4 --max-response-length 512 --steps 1)
    update_shape=(--shape qwen2.5-1.5b --seq-length 1024 --micro-batch-size 4 --micro-batches 4 --steps 3)
fi

kernel_tests kernel_decode_attention 60 tests/test_decode_attention.py
step bench_decode_attention 30 "$python" benchmarks/bench_decode_attention.py --device "$device" \
    "${attention_shape[@]}" --output "$results/bench_decode_attention.json"
step rollout_512 60 "$python" benchmarks/bench_rollout.py "${rollout_short[@]}" --repeats 1 \
    --output "$results/rollout_512.json"
step rollout_grace_eos 45 "$python" benchmarks/bench_rollout.py "${rollout_eos[@]}" --repeats 1 \
    --output "$results/rollout_grace_eos.json"
step rollout_2048 45 "$python" benchmarks/bench_rollout.py "${rollout_long[@]}" --repeats 1 \
    --output "$results/rollout_2048.json"

step tiny_training 75 "$python" benchmarks/gpu_check.py tiny-training "$work/tiny" "$results"

kernel_tests kernel_sample_tokens 45 tests/test_sample_tokens.py
kernel_tests kernel_masked_mean_pool 45 tests/test_masked_mean_pool.py
kernel_tests kernel_grace_rewards 60 tests/test_grace_rewards.py

paper_model=$work/paper_model
if (( dry_run )); then
    step paper_model 30 "$python" benchmarks/gpu_check.py tiny-model "$paper_model"
    paper_model=$paper_model/model
else
    step paper_model 30 "$python" benchmarks/gpu_check.py paper-model "$paper_model"
fi
step paper_step 75 "$python" benchmarks/bench_step.py --hf-model "$paper_model" --bf16 "${step_shape[@]}" \
    --output "$results/paper_step.json"
step update_mfu 45 "$python" benchmarks/bench_update.py "${update_shape[@]}" --output "$results/update_mfu.json"
step bench_masked_mean_pool 30 "$python" benchmarks/bench_masked_mean_pool.py --device "$device" \
    --output "$results/bench_masked_mean_pool.json"
step bench_grace_rewards 30 "$python" benchmarks/bench_grace_rewards.py --device "$device" \
    --output "$results/bench_grace_rewards.json"

"$python" benchmarks/gpu_check.py summary "$results" "$results/gpu_check.json" 2>> "$log" | tee -a "$log"
rm -rf "$work"
exit $status
