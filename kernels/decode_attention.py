"""Decode attention: one query token per row against that row's KV cache, a split-K Triton kernel and its references.

``decode_attention(query, key_cache, value_cache, starts, ends)`` attends each row's query heads to the keys at cache
positions ``[start, end)`` of that row (left padding and the not-yet-written tail are outside the range; no mask
tensor exists). Shapes: ``query`` [rows, heads, head_dim]; ``key_cache`` / ``value_cache`` [rows, max_len, kv_heads,
head_dim] (one layer of the static cache, keys already rotated); ``starts`` / ``ends`` [rows] int. Grouped-query
attention: query head ``h`` reads KV head ``h // (heads / kv_heads)`` (Megatron's and HF's grouping).

The kernel (as SGLang's and vLLM's Triton decode kernels do) runs in two passes:

1. grid (rows, kv_heads, splits): the query heads that share a KV head go through one ``tl.dot`` per block of keys,
   so every key and value is read once per KV head, not once per query head; each split covers an equal share of
   its row's own range (rows of different lengths get equal work per split) and keeps an online softmax in float32,
   writing its normalised partial output and log-sum-exp;
2. grid (rows, heads): the splits merge by log-sum-exp.

The split count fills the GPU when rows × kv_heads is small and is fixed for a given (rows, max_len), so a captured
CUDA graph replays the same launch at every decode step (the per-row ranges are read on the device).

``decode_attention_reference`` is the float-exact definition (softmax over the row's range in the inputs' dtype,
float64 in the tests); ``decode_attention_torch`` is the dispatcher's path off CUDA (SDPA with a [rows, keys] range
mask, bounded by ``key_length`` so CPU decoding reads only the filled part of the cache).
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_N = 64  # keys per block
MAX_SPLITS = 16


def _check(query, key_cache, value_cache, starts, ends):
    if query.dim() != 3 or key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"expected query [rows, heads, d] and caches [rows, max_len, kv_heads, d], got "
                         f"{tuple(query.shape)}, {tuple(key_cache.shape)}, {tuple(value_cache.shape)}")
    rows, heads, head_dim = query.shape
    if key_cache.shape[0] != rows or key_cache.shape[3] != head_dim or heads % key_cache.shape[2]:
        raise ValueError(f"query {tuple(query.shape)} does not fit the cache {tuple(key_cache.shape)} (rows, head "
                         f"dim, and heads a multiple of the KV heads)")
    if starts.shape != (rows,) or ends.shape != (rows,):
        raise ValueError(f"starts and ends must be [{rows}], got {tuple(starts.shape)}, {tuple(ends.shape)}")


def decode_attention_reference(query, key_cache, value_cache, starts, ends, scale=None):
    """Softmax attention of each row's query over keys ``[start, end)``, in the inputs' dtype (plain torch)."""
    _check(query, key_cache, value_cache, starts, ends)
    rows, heads, head_dim = query.shape
    group = heads // key_cache.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    keys = key_cache.repeat_interleave(group, dim=2)  # [rows, max_len, heads, d]
    values = value_cache.repeat_interleave(group, dim=2)
    scores = torch.einsum("rhd,rlhd->rhl", query, keys) * scale
    positions = torch.arange(key_cache.shape[1], device=query.device)
    inside = (positions >= starts.unsqueeze(1)) & (positions < ends.unsqueeze(1))  # [rows, max_len]
    scores = scores.masked_fill(~inside.unsqueeze(1), float("-inf"))
    return torch.einsum("rhl,rlhd->rhd", torch.softmax(scores, dim=-1), values)


def decode_attention_torch(query, key_cache, value_cache, starts, ends, scale=None, key_length=None):
    """SDPA over the first ``key_length`` cache positions (default all) with the row ranges as a boolean mask."""
    _check(query, key_cache, value_cache, starts, ends)
    length = key_cache.shape[1] if key_length is None else key_length
    positions = torch.arange(length, device=query.device)
    inside = (positions >= starts.unsqueeze(1)) & (positions < ends.unsqueeze(1))
    output = F.scaled_dot_product_attention(
        query.unsqueeze(2), key_cache[:, :length].transpose(1, 2), value_cache[:, :length].transpose(1, 2),
        attn_mask=inside[:, None, None, :], scale=scale, enable_gqa=key_cache.shape[2] != query.shape[1])
    return output.squeeze(2)


@triton.jit
def _split_kernel(query_ptr, key_ptr, value_ptr, start_ptr, end_ptr, partial_ptr, lse_ptr,
                  stride_q_row, stride_q_head, stride_k_row, stride_k_pos, stride_k_head,
                  stride_v_row, stride_v_pos, stride_v_head, scale,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    start = tl.load(start_ptr + row).to(tl.int32)
    end = tl.load(end_ptr + row).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(end - start, NUM_SPLITS), BLOCK_N) * BLOCK_N
    low = start + split * per_split
    high = tl.minimum(low + per_split, end)

    groups = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + groups
    head_valid = groups < GROUP
    dim_valid = dims < HEAD_DIM
    query = tl.load(query_ptr + row * stride_q_row + heads[:, None] * stride_q_head + dims[None, :],
                    mask=head_valid[:, None] & dim_valid[None, :], other=0.0)
    running_max = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_G,), tl.float32)
    accumulator = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    offsets = tl.arange(0, BLOCK_N)
    for block in range(low, high, BLOCK_N):
        positions = block + offsets
        inside = positions < high
        keys = tl.load(key_ptr + row * stride_k_row + positions[:, None] * stride_k_pos + kv_head * stride_k_head
                       + dims[None, :], mask=inside[:, None] & dim_valid[None, :], other=0.0)
        if IEEE:
            scores = tl.dot(query.to(tl.float32), tl.trans(keys.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(query, tl.trans(keys))
        scores = tl.where(inside[None, :], scores * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(weights, axis=1)
        values = tl.load(value_ptr + row * stride_v_row + positions[:, None] * stride_v_pos
                         + kv_head * stride_v_head + dims[None, :], mask=inside[:, None] & dim_valid[None, :],
                         other=0.0)
        if IEEE:
            update = tl.dot(weights, values.to(tl.float32), input_precision="ieee")
        else:
            update = tl.dot(weights.to(values.dtype), values)
        accumulator = accumulator * correction[:, None] + update
        running_max = new_max
    # An empty split (its share starts past the row's end) reports log-sum-exp -inf and weighs nothing in the merge.
    empty = running_sum == 0.0
    output = accumulator / tl.where(empty, 1.0, running_sum)[:, None]
    log_sum_exp = tl.where(empty, float("-inf"), running_max + tl.log(running_sum))
    slot = (row * GROUP * (tl.num_programs(1)) + heads) * NUM_SPLITS + split  # [rows, heads, splits] layout
    tl.store(partial_ptr + slot[:, None] * HEAD_DIM + dims[None, :], output,
             mask=head_valid[:, None] & dim_valid[None, :])
    tl.store(lse_ptr + slot, log_sum_exp, mask=head_valid)


@triton.jit
def _merge_kernel(partial_ptr, lse_ptr, out_ptr, stride_o_row, stride_o_head, num_heads,
                  HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    base = (row * num_heads + head) * NUM_SPLITS
    log_sum_exp = tl.load(lse_ptr + base + splits, mask=splits < NUM_SPLITS, other=float("-inf"))
    weights = tl.exp(log_sum_exp - tl.max(log_sum_exp, axis=0))
    partial = tl.load(partial_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :],
                      mask=(splits < NUM_SPLITS)[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    output = tl.sum(partial * weights[:, None], axis=0) / tl.sum(weights, axis=0)
    tl.store(out_ptr + row * stride_o_row + head * stride_o_head + dims, output.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def default_num_splits(rows: int, kv_heads: int, max_len: int, device: torch.device) -> int:
    """Enough splits that rows × kv_heads × splits programs cover the GPU about twice, at most one per key block
    and :data:`MAX_SPLITS`; a function of the launch's static sizes only (CUDA graphs replay one launch)."""
    programs = rows * kv_heads
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(MAX_SPLITS, triton.cdiv(max_len, BLOCK_N), triton.cdiv(2 * sms, programs)))


def _float32_products(query) -> bool:
    """Products in float32 (no TF32) for float32 inputs; bf16 inputs multiply in bf16 on the GPU (float32
    accumulation), but in float32 under the interpreter, whose bf16 dot and bf16 rounding are not the hardware's."""
    return query.dtype == torch.float32 or (query.dtype == torch.bfloat16 and not query.is_cuda)


def decode_attention_triton(query, key_cache, value_cache, starts, ends, scale=None, num_splits=None):
    """The two-pass Triton kernel (CUDA, or the interpreter). Every row needs ``end > start``."""
    _check(query, key_cache, value_cache, starts, ends)
    rows, heads, head_dim = query.shape
    max_len, kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if num_splits is None:
        num_splits = default_num_splits(rows, kv_heads, max_len, query.device)
    query = query if query.stride(2) == 1 else query.contiguous()
    if key_cache.stride(3) != 1 or value_cache.stride(3) != 1:
        raise ValueError("the caches' head dimension must be contiguous")
    partial = torch.empty(rows, heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
    log_sum_exp = torch.empty(rows, heads, num_splits, dtype=torch.float32, device=query.device)
    output = torch.empty_like(query)
    block_d = triton.next_power_of_2(max(head_dim, 16))
    _split_kernel[(rows, kv_heads, num_splits)](
        query, key_cache, value_cache, starts, ends, partial, log_sum_exp,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), scale,
        GROUP=group, HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_G=triton.next_power_of_2(max(group, 16)),
        BLOCK_D=block_d, BLOCK_N=BLOCK_N, IEEE=_float32_products(query))
    _merge_kernel[(rows, heads)](partial, log_sum_exp, output, output.stride(0), output.stride(1), heads,
                                 HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
                                 BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d)
    return output


def decode_attention(query, key_cache, value_cache, starts, ends, scale=None, key_length=None):
    """Dispatch: the Triton kernel on CUDA (it reads each row's own range; ``key_length`` is not needed there), the
    SDPA path elsewhere (over the first ``key_length`` positions)."""
    if query.is_cuda:
        return decode_attention_triton(query, key_cache, value_cache, starts, ends, scale)
    return decode_attention_torch(query, key_cache, value_cache, starts, ends, scale, key_length)
