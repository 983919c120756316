"""Masked mean pooling of hidden states over the sequence, with a Triton kernel and its torch reference.

GRACE embeds a text as the mean of the last layer's hidden states over the pooling mask (user text, template tail and
rationale; system prompt and padding zeroed), then L2-normalises. The Triton path streams the hidden states once,
accumulating in fp32, and never materialises an upcast or masked copy of them.

Dispatch: the Triton kernels run when the tensor is on CUDA, or when this module was imported with
``TRITON_INTERPRET=1`` (the interpreter, used by the CPU tests); otherwise the torch reference runs (the CPU default).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton import TRITON_INTERPRETED, use_triton

# Same clamp as torch.nn.functional.normalize, so both paths agree on (near-)zero rows.
NORM_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------------
# Shared input handling
# ----------------------------------------------------------------------------------------------------------------
def _batch_seq_hidden_strides(hidden, seq_first):
    """(batch, seq, hidden) sizes and strides of a [B, S, H] tensor, or of Megatron's [S, B, H] with seq_first."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D ([B, S, H], or [S, B, H] with seq_first=True), got {tuple(hidden.shape)}")
    if seq_first:
        (seq_len, batch, hidden_size), (stride_s, stride_b, stride_h) = hidden.shape, hidden.stride()
    else:
        (batch, seq_len, hidden_size), (stride_b, stride_s, stride_h) = hidden.shape, hidden.stride()
    return (batch, seq_len, hidden_size), (stride_b, stride_s, stride_h)


def _valid_token_mask(hidden, mask, seq_first):
    (batch, seq_len, _), _ = _batch_seq_hidden_strides(hidden, seq_first)
    if mask.shape != (batch, seq_len):
        layout = "[S, B, H]" if seq_first else "[B, S, H]"
        raise ValueError(f"mask must be [B, S] = [{batch}, {seq_len}] for hidden {layout} {tuple(hidden.shape)}, "
                         f"got {tuple(mask.shape)}")
    if mask.device != hidden.device:
        raise ValueError(f"mask is on {mask.device} but hidden is on {hidden.device}")
    return mask.bool()


def raise_on_empty_rows(counts):
    """Raise naming every row with no valid token. Reads the counts on the host: one device sync per call."""
    empty_rows = (counts == 0).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(f"masked_mean_pool: row(s) {empty_rows} have no valid token in the pooling mask "
                         f"(the mean would be NaN); check the system-prompt length and padding of those rows")


# ----------------------------------------------------------------------------------------------------------------
# Torch reference
# ----------------------------------------------------------------------------------------------------------------
def _reference_weighted_sum(hidden, weights, seq_first):
    # A batched [1, S] x [S, H] matmul: on CPU several times faster than einsum or a masked multiply-and-sum.
    hidden = hidden.transpose(0, 1) if seq_first else hidden
    return torch.bmm(weights.to(hidden.dtype)[:, None, :], hidden).squeeze(1)


def masked_mean_pool_reference(hidden, mask, normalize=False, *, seq_first=False, check_empty_rows=True):
    """Plain torch masked mean, computed in ``hidden``'s dtype (float64 in the tests; the dispatcher upcasts to fp32).

    Arguments and errors as :func:`masked_mean_pool`.
    """
    valid = _valid_token_mask(hidden, mask, seq_first)
    counts = valid.sum(dim=1)
    if check_empty_rows:
        raise_on_empty_rows(counts)
    weights = valid / counts.clamp_min(1)[:, None]
    pooled = _reference_weighted_sum(hidden, weights, seq_first)
    return F.normalize(pooled, dim=-1, eps=NORM_EPS) if normalize else pooled


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
def _pooling_configs():
    # The interpreter cannot autotune over several configs, and its cost is per program x loop iteration: one config
    # with large blocks. On GPU a small sweep over tile shapes, keyed on the hidden size only, so that a new sequence
    # length (every training step) does not trigger a re-tune.
    if TRITON_INTERPRETED:
        return [triton.Config({"BLOCK_S": 128, "BLOCK_H": 256})]
    return [triton.Config({"BLOCK_S": block_s, "BLOCK_H": block_h}, num_warps=num_warps, num_stages=stages)
            for block_s, block_h, num_warps, stages in
            ((16, 256, 4, 4), (32, 256, 8, 3), (32, 128, 4, 4), (64, 128, 8, 3), (16, 512, 8, 3))]


@triton.autotune(configs=_pooling_configs(), key=["hidden_size"])
@triton.jit
def _masked_weighted_sum_kernel(hidden_ptr, weight_ptr, out_ptr, seq_len, hidden_size,
                                stride_hb, stride_hs, stride_hh, stride_wb, stride_ob,
                                BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[b, h] = sum_s weight[b, s] * hidden[b, s, h]; one program per (row, block of H), looping over S."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 at the paper's shapes
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_valid = cols < hidden_size
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for seq_start in range(0, seq_len, BLOCK_S):
        seqs = seq_start + tl.arange(0, BLOCK_S).to(tl.int64)
        weight = tl.load(weight_ptr + row * stride_wb + seqs, mask=seqs < seq_len, other=0.0)
        # Masked-out tokens (system prompt, padding) are never read from memory.
        token_valid = (seqs < seq_len) & (weight != 0.0)
        tile = tl.load(hidden_ptr + row * stride_hb + seqs[:, None] * stride_hs + cols[None, :] * stride_hh,
                       mask=token_valid[:, None] & col_valid[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32) * weight[:, None], axis=0)
    tl.store(out_ptr + row * stride_ob + cols, acc, mask=col_valid)


@triton.jit
def _l2_normalize_rows_kernel(x_ptr, out_ptr, norm_ptr, n_cols, stride_x, stride_out, eps, BLOCK: tl.constexpr):
    """One program per row of an fp32 [B, H] matrix: out = x / max(||x||, eps), and the norm for the backward."""
    row = tl.program_id(0).to(tl.int64)
    sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for col_start in range(0, n_cols, BLOCK):
        cols = col_start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n_cols, other=0.0)
        sum_sq += x * x
    norm = tl.sqrt(tl.sum(sum_sq, axis=0))
    inv_norm = 1.0 / tl.maximum(norm, eps)
    for col_start in range(0, n_cols, BLOCK):
        cols = col_start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n_cols, other=0.0)
        tl.store(out_ptr + row * stride_out + cols, x * inv_norm, mask=cols < n_cols)
    tl.store(norm_ptr + row, norm)


@triton.jit
def _masked_weighted_sum_backward_kernel(grad_out_ptr, weight_ptr, grad_hidden_ptr, seq_len, hidden_size,
                                         stride_gb, stride_wb, stride_hb, stride_hs, stride_hh,
                                         BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    """grad_hidden[b, s, h] = weight[b, s] * grad_out[b, h]; one program per (row, block of S), looping over H."""
    row = tl.program_id(0).to(tl.int64)
    seqs = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    seq_valid = seqs < seq_len
    weight = tl.load(weight_ptr + row * stride_wb + seqs, mask=seq_valid, other=0.0)
    for col_start in range(0, hidden_size, BLOCK_H):
        cols = col_start + tl.arange(0, BLOCK_H)
        col_valid = cols < hidden_size
        grad = tl.load(grad_out_ptr + row * stride_gb + cols, mask=col_valid, other=0.0)
        tl.store(grad_hidden_ptr + row * stride_hb + seqs[:, None] * stride_hs + cols[None, :] * stride_hh,
                 (weight[:, None] * grad[None, :]).to(grad_hidden_ptr.dtype.element_ty),
                 mask=seq_valid[:, None] & col_valid[None, :])


def _normalize_block(n_cols):
    return min(triton.next_power_of_2(n_cols), 4096)


class _MaskedWeightedPool(torch.autograd.Function):
    """pooled[b] = sum_s weights[b, s] * hidden[b, s] (then optionally L2-normalised), with the gradient w.r.t. hidden.

    ``weights`` is the fp32 [B, S] pooling mask divided by the row's token count (mean) or the mask itself (sum).
    """

    @staticmethod
    def forward(ctx, hidden, weights, normalize, seq_first):
        (batch, seq_len, hidden_size), (stride_b, stride_s, stride_h) = _batch_seq_hidden_strides(hidden, seq_first)
        pooled = torch.empty(batch, hidden_size, dtype=torch.float32, device=hidden.device)
        if batch > 0 and hidden_size > 0:
            grid = lambda meta: (batch, triton.cdiv(hidden_size, meta["BLOCK_H"]))  # noqa: E731
            _masked_weighted_sum_kernel[grid](hidden, weights, pooled, seq_len, hidden_size,
                                              stride_b, stride_s, stride_h, weights.stride(0), pooled.stride(0))
        norms = None
        if normalize:
            norms = torch.empty(batch, dtype=torch.float32, device=hidden.device)
            if batch > 0:
                _l2_normalize_rows_kernel[(batch,)](pooled, pooled, norms, hidden_size, pooled.stride(0),
                                                    pooled.stride(0), NORM_EPS, BLOCK=_normalize_block(hidden_size))
        ctx.save_for_backward(weights, pooled, norms)
        ctx.hidden_meta = (hidden.shape, hidden.dtype, seq_first)
        return pooled

    @staticmethod
    def backward(ctx, grad_pooled):
        weights, pooled, norms = ctx.saved_tensors
        hidden_shape, hidden_dtype, seq_first = ctx.hidden_meta
        grad_pooled = grad_pooled.float()
        if norms is not None:
            # pooled holds y = p / |p|; d y / d p = (I - y y^T) / |p|, a tiny [B, H] correction done in torch.
            grad_pooled = (grad_pooled - pooled * (pooled * grad_pooled).sum(-1, keepdim=True)) \
                / norms.clamp_min(NORM_EPS)[:, None]
        grad_pooled = grad_pooled.contiguous()
        grad_hidden = torch.empty(hidden_shape, dtype=hidden_dtype, device=grad_pooled.device)
        (batch, seq_len, hidden_size), (stride_b, stride_s, stride_h) = \
            _batch_seq_hidden_strides(grad_hidden, seq_first)
        block_s, block_h = (128, 256) if TRITON_INTERPRETED else (32, 128)
        if grad_hidden.numel() > 0:
            _masked_weighted_sum_backward_kernel[(batch, triton.cdiv(seq_len, block_s))](
                grad_pooled, weights, grad_hidden, seq_len, hidden_size, grad_pooled.stride(0), weights.stride(0),
                stride_b, stride_s, stride_h, BLOCK_S=block_s, BLOCK_H=block_h)
        return grad_hidden, None, None, None


def _triton_pool(hidden, valid, divide_by_count, normalize, seq_first, check_empty_rows):
    counts = valid.sum(dim=1)
    if check_empty_rows:
        raise_on_empty_rows(counts)
    weights = valid.float()
    if divide_by_count:
        weights = weights / counts.clamp_min(1)[:, None]
    return _MaskedWeightedPool.apply(hidden, weights.contiguous(), normalize, seq_first), counts


def masked_mean_pool_triton(hidden, mask, normalize=False, *, seq_first=False, check_empty_rows=True):
    """The Triton path of :func:`masked_mean_pool`, whatever the device (tests call it directly)."""
    valid = _valid_token_mask(hidden, mask, seq_first)
    pooled, _ = _triton_pool(hidden, valid, True, normalize, seq_first, check_empty_rows)
    return pooled


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def masked_mean_pool(hidden, mask, normalize=False, *, seq_first=False, check_empty_rows=True):
    """Mean of ``hidden`` over the valid tokens of each row, accumulated in fp32; returns float32 [B, H].

    Args:
        hidden: [B, S, H] (or Megatron's [S, B, H] with ``seq_first=True``), float32 / bfloat16 / float16.
        mask: [B, S] bool or 0/1 pooling mask (system prompt and padding already zero).
        normalize: L2-normalise each pooled row (GRACE embeddings are unit vectors).
        check_empty_rows: raise ``ValueError`` naming every row with no valid token. The check reads the token counts
            on the host, one device sync per call; pass False where masks are known to be non-empty to keep the call
            asynchronous (an empty row then pools to zeros).

    Differentiable w.r.t. ``hidden`` (contrastive baseline).
    """
    if use_triton(hidden):
        return masked_mean_pool_triton(hidden, mask, normalize, seq_first=seq_first,
                                       check_empty_rows=check_empty_rows)
    return masked_mean_pool_reference(hidden.float(), mask, normalize, seq_first=seq_first,
                                      check_empty_rows=check_empty_rows)


def masked_sum_pool_partial(hidden, mask, *, seq_first=False):
    """Per-shard masked sums (float32 [B, H]) and valid-token counts (float32 [B]) for a sequence- or context-parallel
    shard: ``hidden`` and ``mask`` cover this rank's slice of the sequence. Finish with :func:`all_reduce_masked_mean`;
    a row may be empty on one shard (the system prompt), so no empty-row check happens here.
    """
    valid = _valid_token_mask(hidden, mask, seq_first)
    if use_triton(hidden):
        sums, counts = _triton_pool(hidden, valid, False, False, seq_first, False)
    else:
        sums, counts = _reference_weighted_sum(hidden.float(), valid, seq_first), valid.sum(dim=1)
    return sums, counts.float()


def all_reduce_masked_mean(sums, counts, group=None, *, normalize=False, check_empty_rows=True):
    """Sum the shards' (sums, counts) with one all-reduce over ``group`` and return the float32 [B, H] mean
    (L2-normalised if ``normalize``). Only [B, H + 1] floats travel; the hidden states are never gathered.

    Forward only: ``torch.distributed.all_reduce`` does not propagate gradients.
    """
    packed = torch.cat([sums.float(), counts.float()[:, None]], dim=1)
    dist.all_reduce(packed, group=group)
    total_sums, total_counts = packed[:, :-1], packed[:, -1]
    if check_empty_rows:
        raise_on_empty_rows(total_counts)
    mean = total_sums / total_counts.clamp_min(1)[:, None]
    return F.normalize(mean, dim=-1, eps=NORM_EPS) if normalize else mean
