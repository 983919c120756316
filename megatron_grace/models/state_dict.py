"""State-dict adapter between Hugging Face and Megatron-Core naming, for every supported family.

The Megatron side is the *global* (unsharded, TP1/PP1) state dict with global layer indices. Two layout changes happen
on the way:
* Q, K and V are fused into ``linear_qkv`` interleaved per query group: for each KV head, its query heads, then its key
  head, then its value head. Sharding that tensor in contiguous row blocks hands each TP rank whole query groups.
* ``gate_proj`` and ``up_proj`` are fused into ``linear_fc1`` as [gate; up]. Under TP each rank holds
  [gate shard; up shard], so fc1 is sharded per half (see :func:`shard_for_rank`).
The vocabulary is zero-padded to ``arch.padded_vocab_size`` on the way in and cut back on the way out.
Megatron parameter names come in two forms: the local layer spec's (``input_layernorm.weight``, used here) and
Transformer Engine's, whose spec fuses the two per-layer norms into the next linear layer
(``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``). The adapter reads both
(:func:`local_spec_name`) and loads into models of either spec.
Families differ only in which tensors exist (qkv biases for Qwen2, q/k norms for Qwen3, lm_head unless tied), so one
adapter serves all of them.
"""
from __future__ import annotations

import re

import torch

from .config import ModelArchitecture

_LAYER = re.compile(r"^(model\.layers|decoder\.layers)\.(\d+)\.(.+)$")

# Per-layer tensors whose only change is the name: HF suffix -> Megatron suffix.
_RENAMED_LAYER_TENSORS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
}


# Transformer Engine layer spec: the pre-attention and pre-MLP norms live inside the fused norm + linear modules. The
# q/k norms keep their names (``self_attention.q_layernorm`` / ``k_layernorm``) in both specs.
_TE_FUSED_NORM_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_LOCAL_NORM_NAMES = {te: local for local, te in _TE_FUSED_NORM_NAMES.items()}


def local_spec_name(name: str) -> str:
    """A Megatron parameter name of either layer spec → the local spec's name (what this adapter reads and writes)."""
    for te_suffix, local_suffix in _LOCAL_NORM_NAMES.items():
        if name.endswith("." + te_suffix):
            return name[: -len(te_suffix)] + local_suffix
    return name


def transformer_engine_name(name: str) -> str:
    """A local-spec Megatron parameter name → the Transformer Engine spec's name of the same tensor."""
    for local_suffix, te_suffix in _TE_FUSED_NORM_NAMES.items():
        if name.endswith("." + local_suffix):
            return name[: -len(local_suffix)] + te_suffix
    return name


class StateDictMismatchError(ValueError):
    pass


def _expect(state: dict, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in state:
        raise StateDictMismatchError(f"missing tensor {name!r}")
    tensor = state[name]
    if tuple(tensor.shape) != shape:
        raise StateDictMismatchError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def _pad_vocab(weight: torch.Tensor, arch: ModelArchitecture) -> torch.Tensor:
    pad = arch.padded_vocab_size - weight.shape[0]
    return torch.cat([weight, weight.new_zeros(pad, weight.shape[1])]) if pad else weight


def hf_to_mcore(hf_state: dict[str, torch.Tensor], arch: ModelArchitecture) -> dict[str, torch.Tensor]:
    """HF ``*ForCausalLM`` state dict → global Megatron GPTModel state dict. Checks every name and shape."""
    hidden, head_dim = arch.hidden_size, arch.head_dim
    groups, heads_per_group = arch.num_query_groups, arch.num_attention_heads // arch.num_query_groups
    out = {
        "embedding.word_embeddings.weight": _pad_vocab(
            _expect(hf_state, "model.embed_tokens.weight", (arch.vocab_size, hidden)), arch),
        "decoder.final_layernorm.weight": _expect(hf_state, "model.norm.weight", (hidden,)),
    }
    if not arch.tie_word_embeddings:
        out["output_layer.weight"] = _pad_vocab(_expect(hf_state, "lm_head.weight", (arch.vocab_size, hidden)), arch)
    for layer in range(arch.num_layers):
        hf, mc = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        for hf_suffix, mc_suffix in _RENAMED_LAYER_TENSORS.items():
            if "_norm" in hf_suffix and not arch.qk_layernorm:
                continue
            shape = _renamed_shape(hf_suffix, arch)
            out[mc + mc_suffix] = _expect(hf_state, hf + hf_suffix, shape)
        qkv_parts = []
        for proj, rows in (("q", heads_per_group * head_dim), ("k", head_dim), ("v", head_dim)):
            weight = _expect(hf_state, f"{hf}self_attn.{proj}_proj.weight", (groups * rows, hidden))
            qkv_parts.append(weight.reshape(groups, rows, hidden))
        out[mc + "self_attention.linear_qkv.weight"] = torch.cat(qkv_parts, dim=1).reshape(-1, hidden)
        if arch.qkv_bias:
            bias_parts = [
                _expect(hf_state, f"{hf}self_attn.{proj}_proj.bias", (groups * rows,)).reshape(groups, rows)
                for proj, rows in (("q", heads_per_group * head_dim), ("k", head_dim), ("v", head_dim))
            ]
            out[mc + "self_attention.linear_qkv.bias"] = torch.cat(bias_parts, dim=1).reshape(-1)
        gate = _expect(hf_state, f"{hf}mlp.gate_proj.weight", (arch.ffn_hidden_size, hidden))
        up = _expect(hf_state, f"{hf}mlp.up_proj.weight", (arch.ffn_hidden_size, hidden))
        out[mc + "mlp.linear_fc1.weight"] = torch.cat([gate, up])
    unused = set(hf_state) - _hf_names(arch)
    if unused:
        raise StateDictMismatchError(f"tensors not used by a {arch.hf_architecture}: {sorted(unused)[:5]}")
    return out


def _renamed_shape(hf_suffix: str, arch: ModelArchitecture) -> tuple[int, ...]:
    if hf_suffix.startswith("self_attn.o_proj"):
        return (arch.hidden_size, arch.num_attention_heads * arch.head_dim)
    if hf_suffix.startswith("mlp.down_proj"):
        return (arch.hidden_size, arch.ffn_hidden_size)
    if "_norm" in hf_suffix and hf_suffix.startswith("self_attn"):
        return (arch.head_dim,)
    return (arch.hidden_size,)


def _hf_names(arch: ModelArchitecture) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    # Some tied checkpoints still store lm_head.weight (a copy of the embedding); it is accepted and ignored.
    names.add("lm_head.weight")
    for layer in range(arch.num_layers):
        prefix = f"model.layers.{layer}."
        names.update(prefix + suffix for suffix in _RENAMED_LAYER_TENSORS)
        names.update(f"{prefix}self_attn.{p}_proj.{kind}" for p in "qkv" for kind in ("weight", "bias"))
        names.update(f"{prefix}mlp.{p}_proj.weight" for p in ("gate", "up"))
    return names


def mcore_to_hf(mc_state: dict[str, torch.Tensor], arch: ModelArchitecture) -> dict[str, torch.Tensor]:
    """Global Megatron GPTModel state dict (names of either layer spec) → HF ``*ForCausalLM`` state dict (inverse of
    :func:`hf_to_mcore`)."""
    mc_state = {local_spec_name(name): tensor for name, tensor in mc_state.items()}
    hidden, head_dim = arch.hidden_size, arch.head_dim
    groups, heads_per_group = arch.num_query_groups, arch.num_attention_heads // arch.num_query_groups
    padded = arch.padded_vocab_size
    out = {
        "model.embed_tokens.weight": _expect(mc_state, "embedding.word_embeddings.weight", (padded, hidden))[
            : arch.vocab_size],
        "model.norm.weight": _expect(mc_state, "decoder.final_layernorm.weight", (hidden,)),
    }
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = _expect(mc_state, "output_layer.weight", (padded, hidden))[: arch.vocab_size]
    qkv_rows = (heads_per_group + 2) * head_dim
    for layer in range(arch.num_layers):
        hf, mc = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        for hf_suffix, mc_suffix in _RENAMED_LAYER_TENSORS.items():
            if "_norm" in hf_suffix and not arch.qk_layernorm:
                continue
            out[hf + hf_suffix] = _expect(mc_state, mc + mc_suffix, _renamed_shape(hf_suffix, arch))
        qkv = _expect(mc_state, mc + "self_attention.linear_qkv.weight", (groups * qkv_rows, hidden))
        q, k, v = qkv.reshape(groups, qkv_rows, hidden).split([heads_per_group * head_dim, head_dim, head_dim], 1)
        for proj, part in zip("qkv", (q, k, v)):
            out[f"{hf}self_attn.{proj}_proj.weight"] = part.reshape(-1, hidden)
        if arch.qkv_bias:
            bias = _expect(mc_state, mc + "self_attention.linear_qkv.bias", (groups * qkv_rows,))
            for proj, part in zip("qkv", bias.reshape(groups, qkv_rows).split(
                    [heads_per_group * head_dim, head_dim, head_dim], 1)):
                out[f"{hf}self_attn.{proj}_proj.bias"] = part.reshape(-1)
        fc1 = _expect(mc_state, mc + "mlp.linear_fc1.weight", (2 * arch.ffn_hidden_size, hidden))
        out[f"{hf}mlp.gate_proj.weight"], out[f"{hf}mlp.up_proj.weight"] = fc1.chunk(2)
    return {name: tensor.contiguous() for name, tensor in out.items()}


def shard_for_rank(name: str, full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of a global tensor, following the parameter's Megatron partitioning attributes."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp_size, dim)[tp_rank], up.chunk(tp_size, dim)[tp_rank]])
    return full.chunk(tp_size, dim)[tp_rank]


def global_name(local_name: str, layer_offset: int) -> str:
    """Local parameter name of a pipeline stage → global name (layer numbers shifted by the stage's offset)."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    return f"{match.group(1)}.{int(match.group(2)) + layer_offset}.{match.group(3)}"


@torch.no_grad()
def load_global_state_into_model(model: torch.nn.Module, global_state: dict[str, torch.Tensor]) -> None:
    """Copy a global Megatron state dict (local-spec names) into this rank's model stage (any TP/PP, either layer
    spec), checking every shape."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    offset = get_transformer_layer_offset(model.config)
    for local_name, param in model.named_parameters():
        name = local_spec_name(global_name(local_name, offset))
        if name == "output_layer.weight" and name not in global_state:
            # Tied embeddings: the last stage keeps its own copy of the input embedding.
            name = "embedding.word_embeddings.weight"
        if name not in global_state:
            raise StateDictMismatchError(f"checkpoint has no tensor for parameter {name!r}")
        shard = shard_for_rank(local_name, global_state[name], param, tp_rank, tp_size)
        if shard.shape != param.shape:
            raise StateDictMismatchError(
                f"tensor {name!r}: shard shape {tuple(shard.shape)} does not match parameter {tuple(param.shape)}")
        param.copy_(shard)
