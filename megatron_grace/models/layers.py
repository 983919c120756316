"""Layer modules of the GPT layer specs (mostly the local, non-Transformer-Engine one).

* :class:`RMSNorm`: torch RMSNorm that works under sequence parallelism. Megatron-Core's ``WrappedTorchNorm`` refuses
  sequence parallel because it does not mark its weight; with sequence-parallel activations each TP rank sees a
  different slice of tokens, so the norm weight's gradient must be all-reduced over the TP group, which Megatron's DDP
  does for parameters tagged ``sequence_parallel``.
* :class:`SDPAttention`: Megatron's core-attention interface on ``F.scaled_dot_product_attention`` (fused kernels on
  CPU and flash/efficient attention on GPU without Transformer Engine), a drop-in for the unfused local
  ``DotProductAttention`` (baddbmm + softmax).
* :class:`RotatedKeyCacheSelfAttention` (both specs, Transformer Engine's too): Megatron's self-attention with keys
  rotated once on their way into the static KV cache, instead of the whole cache at every decode step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor_from_config
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        # Read by Megatron DDP: all-reduce this weight's gradient over the TP group under sequence parallel.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)


class SDPAttention(MegatronModule):
    """Core attention: [sq, b, np, hn] queries and [sk, b, ng, hn] keys/values → [sq, b, np·hn]. A given boolean
    ``attention_mask`` is always applied, whatever the mask type (rollouts rely on it for left padding)."""

    honours_attention_mask = True

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        assert config.context_parallel_size == 1, "SDPAttention does not implement context parallelism"
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None, "not supported by SDPAttention"
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, batch, heads, head_dim = query.shape
        sk = key.shape[0]
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        is_causal = False
        sdpa_mask = None
        if attention_mask is not None:
            # Megatron's masks are True where attention is NOT allowed; SDPA's boolean masks are the opposite.
            sdpa_mask = ~attention_mask
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq == sk:
                is_causal = True
            else:
                # Queries are the last sq positions of a cached sequence (bottom-right aligned causal mask).
                sdpa_mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=sdpa_mask, is_causal=is_causal,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale,
            enable_gqa=k.shape[1] != heads,
        )
        # [b, n, sq, d] -> [sq, b, n·d]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, heads * head_dim)


class RotatedKeyCacheSelfAttention(SelfAttention):
    """Megatron-Core's self-attention, with each key rotated once, at its own position, before it enters the static
    KV cache.

    Megatron-Core's static-batching path caches keys unrotated and rotates the whole cache again at every decode step:
    element-wise work that grows with the context in every layer at every token, and one more read and write of all
    cached keys next to attention's own read. Rotation is per position, so rotating on the way in gives the keys
    attention sees either way. Training and the one-pass forward (no inference context) are untouched."""

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        if (inference_context is None or rotary_pos_emb is None or self.config.flash_decode
                or not inference_context.is_static_batching()):
            return super()._adjust_key_value_for_inference(inference_context, query, key, value, rotary_pos_emb,
                                                           *args, **kwargs)
        query_pos_emb, key_pos_emb = rotary_pos_emb
        start = inference_context.sequence_len_offset
        key = apply_rotary_pos_emb(key, key_pos_emb[start: start + key.shape[0]], config=self.config,
                                   mscale=_yarn_get_concentration_factor_from_config(self.config),
                                   cp_group=self.pg_collection.cp)
        query, key, value, (query_pos_emb, _), mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        return query, key, value, (query_pos_emb, None), mask_type, block_table
