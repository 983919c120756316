"""Rotary position embedding for the local (non-Transformer-Engine) spec, registered as Megatron-Core's "fused" RoPE.

Megatron-Core's unfused RoPE recomputes cos/sin of the rotary frequencies for the queries and the keys of every layer
(60 times per forward for a 30-layer model) and rotates with a chunk/negate/concatenate sequence; in token-by-token
generation those small ops dominate a layer. This version computes cos/sin once per frequency tensor (every layer of
a forward receives the same one) and rotates in one compiled kernel (eagerly for a single position). Without
Transformer Engine, Megatron's fused-RoPE hook is empty; :func:`install` fills it, so ``apply_rope_fusion=True``
routes the standard call sites here. The arithmetic per element is Megatron's own (t·cos + rotate_half(t)·sin), so
results are bit-identical to the unfused path.
"""
from __future__ import annotations

import torch

from ..platform import has_cuda

# key -> (frequency tensor, cos, sin), two entries: with a KV cache, queries and keys get different frequency slices.
# Holding the frequency tensor keeps its storage alive, so its data pointer cannot be reused while the entry is cached.
_cache: dict[tuple, tuple] = {}
_CACHE_ENTRIES = 2


def _cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Inference-mode tensors have no version counter (and Megatron never writes its frequencies in place).
    version = -1 if freqs.is_inference() else freqs._version
    key = (freqs.data_ptr(), tuple(freqs.shape), freqs.stride(), version, freqs.dtype, dtype)
    if key not in _cache:
        if len(_cache) >= _CACHE_ENTRIES:
            del _cache[next(iter(_cache))]  # the oldest
        # Megatron's frequencies are [f, f] (non-interleaved): one half determines both.
        half = freqs[..., : freqs.shape[-1] // 2]
        _cache[key] = (freqs, torch.cos(half).to(dtype), torch.sin(half).to(dtype))
    return _cache[key][1], _cache[key][2]


def clear_cache() -> None:
    """Drop the cached cos/sin (called after rollouts, whose frequencies are inference-mode tensors)."""
    _cache.clear()


def apply_rotary_cached(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False, **unused) -> torch.Tensor:
    """Rotate ``t`` [s, b, heads, dim] by ``freqs`` [s, 1, 1, rot_dim] (rot_dim ≤ dim; the rest passes through)."""
    if interleaved:
        raise NotImplementedError("interleaved rotary embeddings are not used by the supported model families")
    cos, sin = _cos_sin(freqs, t.dtype)
    # The compiled rotation is a CPU choice (measured there, docs/performance.md): on CUDA the element-wise ops are
    # cheap kernels. One position (the query while decoding) is a handful of tiny ops, cheaper eager than through the
    # compiled graph's guards.
    return rotate(t, cos, sin) if t.is_cuda or t.shape[0] == 1 else _rotate_compiled(t, cos, sin)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Megatron's non-interleaved RoPE, t·cos + rotate_half(t)·sin, with cos/sin of one half (dims past 2·half pass
    through); also our decode step's rotation of the new token."""
    half = cos.shape[-1]
    first, second = t[..., :half], t[..., half: 2 * half]
    parts = [first * cos - second * sin, second * cos + first * sin]
    if t.shape[-1] > 2 * half:
        parts.append(t[..., 2 * half:])
    return torch.cat(parts, dim=-1)


# Compiled into one pass over t (equal results to the eager ops). Dynamic shapes from the start: sequence length, batch
# and heads per TP rank vary between prefill, training and layouts.
_rotate_compiled = torch.compile(rotate, dynamic=True)


def install() -> None:
    """Use :func:`apply_rotary_cached` as Megatron-Core's fused RoPE (only where Transformer Engine is absent)."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = apply_rotary_cached
    if not has_cuda():
        # CPU only, where the rotation is compiled: queries and keys (different head counts and strides), grad modes
        # (rollout prefill, no-grad pass, update) and the 0/1 specialisation of heads per TP rank each give it (and
        # Megatron's compiled SwiGLU) a graph; past torch's default limit of 8 per function, dynamo falls back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
