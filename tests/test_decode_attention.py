"""kernels/decode_attention.py: the split-K Triton decode attention (interpreter on CPU, compiled on GPU) and the SDPA
path against a float64 reference.

Cases: GQA ratios 1, 4, 6 and 7 (query heads per KV head), head dims 64 and 128 (and 24, a Qwen3-tiny width that is
not a power of two), rows with different starts and lengths in one batch, a length of 1, lengths that are not a
multiple of the key block, more splits than a short row has blocks (empty splits), and bf16 / fp16 / fp32 inputs.
Tolerances against float64: fp32 2e-5; fp16 2e-3; bf16 1.6e-2 absolute on outputs of magnitude ~1 (the output is
rounded to the input dtype once: half an ulp is 2^-11 for fp16, 2^-8 for bf16, plus the rounding of the inputs
products, which the float32 accumulation keeps small). Under the interpreter bf16 products are taken in float32 (its
bf16 dot is not the hardware's); the GPU run of this file checks the bf16 tensor-core path against the same bound.
"""
import os
from pathlib import Path

if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run in the interpreter

import pytest
import torch

from megatron_grace.kernels.decode_attention import (BLOCK_N, decode_attention, decode_attention_reference,
                                                     decode_attention_torch, decode_attention_triton)
from megatron_grace.kernels._triton import use_triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
needs_triton = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1 set before triton is imported")
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def cache_and_query(rows, kv_heads, group, head_dim, max_len, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, kv_heads * group, head_dim, generator=generator)
    keys = torch.randn(rows, max_len, kv_heads, head_dim, generator=generator)
    values = torch.randn(rows, max_len, kv_heads, head_dim, generator=generator)
    return [t.to(dtype).to(DEVICE) for t in (query, keys, values)]


def ranges(lengths, starts):
    return (torch.tensor(starts, device=DEVICE), torch.tensor([s + n for s, n in zip(starts, lengths)],
                                                              device=DEVICE))


def float64_reference(query, keys, values, starts, ends):
    return decode_attention_reference(query.double(), keys.double(), values.double(), starts, ends)


# Rows: different starts (left padding), a length of 1, lengths off the block size, one row spanning the cache.
STARTS = [0, 7, 9, 3, 0]
LENGTHS = [1, BLOCK_N + 5, 3 * BLOCK_N - 1, 2 * BLOCK_N, 200]
MAX_LEN = 200


@needs_triton
@pytest.mark.parametrize("group", [1, 4, 6, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_equals_float64_across_gqa_ratios_and_head_dims(group, head_dim):
    query, keys, values = cache_and_query(len(STARTS), 2, group, head_dim, MAX_LEN, torch.float32)
    starts, ends = ranges(LENGTHS, STARTS)
    output = decode_attention_triton(query, keys, values, starts, ends, num_splits=3)
    torch.testing.assert_close(output.double(), float64_reference(query, keys, values, starts, ends),
                               rtol=0, atol=TOLERANCE[torch.float32])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 4, 16])
def test_kernel_dtypes_and_split_counts(dtype, num_splits):
    query, keys, values = cache_and_query(len(STARTS), 2, 4, 64, MAX_LEN, dtype, seed=1)
    starts, ends = ranges(LENGTHS, STARTS)
    output = decode_attention_triton(query, keys, values, starts, ends, num_splits=num_splits)
    assert output.dtype == dtype
    torch.testing.assert_close(output.double(), float64_reference(query, keys, values, starts, ends),
                               rtol=0, atol=TOLERANCE[dtype])


@needs_triton
def test_kernel_head_dim_off_a_power_of_two_and_default_splits():
    query, keys, values = cache_and_query(3, 2, 2, 24, 70, torch.float32, seed=2)
    starts, ends = ranges([70, 1, 33], [0, 40, 20])
    output = decode_attention_triton(query, keys, values, starts, ends)
    torch.testing.assert_close(output.double(), float64_reference(query, keys, values, starts, ends),
                               rtol=0, atol=TOLERANCE[torch.float32])


def test_keys_outside_a_rows_range_do_not_matter():
    """Changing every cache entry outside [start, end) (pads, the unwritten tail) changes no output."""
    query, keys, values = cache_and_query(len(STARTS), 2, 4, 64, MAX_LEN, torch.float32, seed=3)
    starts, ends = ranges(LENGTHS, STARTS)
    positions = torch.arange(MAX_LEN, device=DEVICE)
    outside = ~((positions >= starts[:, None]) & (positions < ends[:, None]))
    noisy_keys, noisy_values = keys.clone(), values.clone()
    noisy_keys[outside] = 1e4
    noisy_values[outside] = 1e4
    implementations = [decode_attention_torch] + ([decode_attention_triton] if use_triton(query) else [])
    for implementation in implementations:
        torch.testing.assert_close(implementation(query, noisy_keys, noisy_values, starts, ends),
                                   implementation(query, keys, values, starts, ends), rtol=0, atol=1e-6)
    if use_triton(query):  # the kernel never loads them: not even NaN reaches the output
        noisy_values[outside] = float("nan")
        torch.testing.assert_close(decode_attention_triton(query, noisy_keys, noisy_values, starts, ends),
                                   decode_attention_triton(query, keys, values, starts, ends), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_equals_float64_and_reads_only_key_length(dtype):
    query, keys, values = cache_and_query(len(STARTS), 2, 6, 64, MAX_LEN, dtype, seed=4)
    starts, ends = ranges(LENGTHS, STARTS)
    expected = float64_reference(query, keys, values, starts, ends)
    for key_length in (None, int(ends.max())):
        output = decode_attention_torch(query, keys, values, starts, ends, key_length=key_length)
        torch.testing.assert_close(output.double(), expected, rtol=0, atol=TOLERANCE[dtype])
    assert torch.equal(decode_attention(query, keys, values, starts, ends),
                       (decode_attention_triton if query.is_cuda else decode_attention_torch)(
                           query, keys, values, starts, ends))


def test_bad_shapes_name_the_problem():
    query, keys, values = cache_and_query(2, 2, 3, 64, 16, torch.float32)
    starts, ends = ranges([4, 4], [0, 0])
    with pytest.raises(ValueError, match="does not fit the cache"):
        decode_attention_torch(query[:, :5], keys, values, starts, ends)
    with pytest.raises(ValueError, match="starts and ends"):
        decode_attention_torch(query, keys, values, starts[:1], ends)
