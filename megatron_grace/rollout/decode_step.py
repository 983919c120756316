"""Our decode step: one token per row through the policy stage's own weights, with a static KV cache.

Megatron-Core's fast decode paths need flash-attn; its eager path goes through ~30 modules per layer, masks and
Python per token. This module is the same arithmetic written as one function of tensors, so that a CUDA graph can hold
a whole step (``cuda_graphs.py``) and ``torch.compile(fullgraph=True)`` can check on CPU that nothing in it breaks a
graph:

* :class:`StageWeights` holds references to the Megatron module's parameters (``.weight`` tensors, read in place: no
  copy, no sync; an optimizer step is seen by the next rollout), for the local and the Transformer Engine layer spec
  (whose norms live in ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``);
* :class:`KVCache`: keys and values [layers, rows, max_len, kv_heads / TP, head_dim] in the policy's dtype, allocated
  once per rollout; keys stored rotated; a row's real tokens start at its ``starts`` entry (left padding is a start
  index, never a mask tensor);
* :func:`decode_step`: embedding → per layer (RMSNorm, QKV with optional bias, Qwen3's q/k RMSNorm, RoPE of the new
  token and its append to the cache, decode attention over [start, position], output projection, RMSNorm, SwiGLU MLP)
  → final norm → this TP rank's vocabulary shard of the logits. Tensor parallelism as Megatron's layers do it: the
  column-parallel matmuls are local, the row-parallel ones are followed by an all-reduce in the TP group, and the
  vocabulary-parallel embedding masks and all-reduces. Pipeline parallelism is not covered (the engine keeps
  Megatron's decode there).

Every operation has a static shape for a given (rows, max_len): no host reads, no data-dependent shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from ..kernels.decode_attention import decode_attention
from ..models.rope import rotate
from ..utils import unwrap


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [groups_local * (heads_per_group + 2) * head_dim, hidden]: Megatron's per-group layout
    qkv_bias: torch.Tensor | None
    query_norm: torch.Tensor | None  # Qwen3's q/k RMSNorm over the head dimension
    key_norm: torch.Tensor | None
    projection: torch.Tensor  # [hidden, heads_local * head_dim], row-parallel
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * ffn_local, hidden]: this rank's gate shard, then its up shard
    down: torch.Tensor  # [hidden, ffn_local], row-parallel


@dataclass
class StageWeights:
    embedding: torch.Tensor  # [vocab / TP, hidden], this rank's shard of the vocabulary-parallel embedding
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    output: torch.Tensor  # [vocab / TP, hidden]; the embedding itself when tied
    rotary_frequencies: torch.Tensor  # [max_len, head_dim] (Megatron's [f, f] layout), float32
    eps: float
    heads: int  # on this TP rank
    groups: int  # KV heads on this TP rank
    head_dim: int
    vocab_start: int
    tp_group: object | None  # None at TP 1

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)


def _norm_weight(norm_module, fused_linear) -> torch.Tensor:
    """The RMSNorm weight of the local spec's norm module, or of Transformer Engine's norm fused into the linear."""
    weight = getattr(norm_module, "weight", None)
    return weight if weight is not None else fused_linear.layer_norm_weight


def _bias(linear) -> torch.Tensor | None:
    """A linear layer's bias; None when it has none (Transformer Engine keeps an empty tensor there)."""
    bias = getattr(linear, "bias", None)
    return bias if bias is not None and bias.numel() > 0 else None


def unsupported_reason(model) -> str | None:
    """Why :func:`decode_step` cannot run this policy stage, or None when it can."""
    stage = unwrap(model)
    if not (stage.pre_process and stage.post_process):
        return "pipeline parallelism (each stage holds only some layers)"
    config = stage.config
    if config.num_moe_experts:
        return "mixture-of-experts layers"
    if getattr(config, "rotary_interleaved", False) or config.normalization != "RMSNorm" or not config.gated_linear_unit:
        return "a layer type outside Llama 3 / Qwen2 / Qwen3 (RMSNorm, SwiGLU, non-interleaved RoPE)"
    if config.add_bias_linear:
        return "biases on the output projection or the MLP"
    return None


def stage_weights(model, max_len: int) -> StageWeights:
    """References to the stage's parameters (no copies) and the rotary frequencies of positions [0, max_len)."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"our decode step does not cover {reason}")
    stage = unwrap(model)
    config = stage.config
    tp = parallel_state.get_tensor_model_parallel_world_size()
    layers = []
    for layer in stage.decoder.layers:
        attention, mlp = layer.self_attention, layer.mlp
        q_norm = getattr(attention, "q_layernorm", None)
        k_norm = getattr(attention, "k_layernorm", None)
        layers.append(LayerWeights(
            input_norm=_norm_weight(layer.input_layernorm, attention.linear_qkv),
            qkv=attention.linear_qkv.weight, qkv_bias=_bias(attention.linear_qkv),
            query_norm=getattr(q_norm, "weight", None), key_norm=getattr(k_norm, "weight", None),
            projection=attention.linear_proj.weight,
            mlp_norm=_norm_weight(layer.pre_mlp_layernorm, mlp.linear_fc1),
            gate_up=mlp.linear_fc1.weight, down=mlp.linear_fc2.weight))
    embedding = stage.embedding.word_embeddings.weight
    output = stage.shared_embedding_or_output_weight() if stage.share_embeddings_and_output_weights \
        else stage.output_layer.weight
    frequencies = stage.rotary_pos_emb(max_len)  # [max_len, 1, 1, head_dim]
    return StageWeights(
        embedding=embedding, layers=layers, final_norm=stage.decoder.final_layernorm.weight, output=output,
        rotary_frequencies=frequencies.reshape(max_len, -1).float(), eps=config.layernorm_epsilon,
        heads=config.num_attention_heads // tp, groups=config.num_query_groups // tp, head_dim=config.kv_channels,
        vocab_start=parallel_state.get_tensor_model_parallel_rank() * embedding.shape[0],
        tp_group=parallel_state.get_tensor_model_parallel_group() if tp > 1 else None)


@dataclass
class KVCache:
    keys: torch.Tensor  # [layers, rows, max_len, kv_heads_local, head_dim], rotated
    values: torch.Tensor

    @classmethod
    def allocate(cls, weights: StageWeights, rows: int, max_len: int, dtype, device) -> "KVCache":
        shape = (len(weights.layers), rows, max_len, weights.groups, weights.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @staticmethod
    def bytes_for(weights: StageWeights, rows: int, max_len: int, dtype) -> int:
        return 2 * len(weights.layers) * rows * max_len * weights.groups * weights.head_dim * dtype.itemsize

    def move_rows(self, keep: torch.Tensor, length: int) -> None:
        """Rows ``keep`` to the front, positions [0, length) (the filled part); the other rows leave. One layer at a
        time: the gathered copy is then one layer's rows, not a second cache (14 GB at the paper's shape)."""
        for cache in (self.keys, self.values):
            for layer in cache:
                layer[: keep.numel(), :length] = layer[keep, :length]


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, group=group)
    return tensor


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(hidden, (hidden.shape[-1],), weight, eps)


def embed(weights: StageWeights, tokens: torch.Tensor) -> torch.Tensor:
    """Vocabulary-parallel embedding lookup: rows outside this rank's shard read 0, then one all-reduce."""
    if weights.tp_group is None:
        return F.embedding(tokens, weights.embedding)
    local = tokens - weights.vocab_start
    outside = (local < 0) | (local >= weights.embedding.shape[0])
    hidden = F.embedding(local.masked_fill(outside, 0), weights.embedding).masked_fill(outside.unsqueeze(1), 0)
    return _all_reduce(hidden, weights.tp_group)


def decode_step(weights: StageWeights, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                starts: torch.Tensor, *, key_length: int | None = None, attention=decode_attention) -> torch.Tensor:
    """Feed ``tokens`` [rows] at cache positions ``positions`` [rows] (their keys and values are written there);
    each row attends to its positions [``starts``, ``positions``]. Returns this rank's vocabulary shard of the next
    token's logits, [rows, V/TP], in the policy's dtype. ``key_length`` bounds the cache positions the torch attention
    reads (CPU; a Python int, so not for graphs); ``attention`` is the decode attention op."""
    rows = tokens.shape[0]
    heads, groups, head_dim = weights.heads, weights.groups, weights.head_dim
    per_group = heads // groups
    row_index = torch.arange(rows, device=tokens.device)
    ends = positions + 1
    half = weights.rotary_frequencies[positions, : head_dim // 2].unsqueeze(1)  # [rows, 1, d/2], float32
    hidden = embed(weights, tokens)
    cos, sin = torch.cos(half).to(hidden.dtype), torch.sin(half).to(hidden.dtype)
    for index, layer in enumerate(weights.layers):
        mixed = F.linear(_rms_norm(hidden, layer.input_norm, weights.eps), layer.qkv, layer.qkv_bias)
        mixed = mixed.view(rows, groups, per_group + 2, head_dim)
        query = mixed[:, :, :per_group].reshape(rows, heads, head_dim)
        key, value = mixed[:, :, per_group], mixed[:, :, per_group + 1]
        if layer.query_norm is not None:
            query = _rms_norm(query, layer.query_norm, weights.eps)
            key = _rms_norm(key, layer.key_norm, weights.eps)
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        # This step's rows are the cache's first rows (compaction moves live rows to the front).
        keys, values = cache.keys[index, :rows], cache.values[index, :rows]
        keys.index_put_((row_index, positions), key)
        values.index_put_((row_index, positions), value)
        context = attention(query, keys, values, starts, ends, weights.softmax_scale, key_length)
        hidden = hidden + _all_reduce(F.linear(context.reshape(rows, heads * head_dim), layer.projection),
                                      weights.tp_group)
        gate, up = F.linear(_rms_norm(hidden, layer.mlp_norm, weights.eps), layer.gate_up).chunk(2, dim=-1)
        hidden = hidden + _all_reduce(F.linear(F.silu(gate) * up, layer.down), weights.tp_group)
    return F.linear(_rms_norm(hidden, weights.final_norm, weights.eps), weights.output)
