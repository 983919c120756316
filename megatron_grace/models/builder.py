"""Build a Megatron-Core GPTModel for a :class:`ModelArchitecture` on the current parallel layout.

Layer spec: Transformer Engine modules where TE imports (GPU machines with the ``gpu`` extra), otherwise the local spec
with our sequence-parallel-safe :class:`RMSNorm` and SDPA core attention. Both specs share checkpoint keys (the local
spec maps its norms onto TE's fused names), so a checkpoint moves between them.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import ParallelConfig
from ..platform import has_cuda
from .config import ModelArchitecture
from . import rope
from .layers import RMSNorm, RotatedKeyCacheSelfAttention, SDPAttention
from .output import GraceGPTModel


def transformer_engine_available() -> bool:
    if not has_cuda():
        return False  # TE imports fail without CUDA; never touch it on CPU paths.
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def make_transformer_config(arch: ModelArchitecture, *, params_dtype: torch.dtype = torch.float32,
                            sequence_parallel: bool = ParallelConfig.sequence_parallel, recompute: bool = False,
                            hidden_dropout: float = 0.0) -> TransformerConfig:
    """``hidden_dropout`` (embedding output and after attention and MLP) is 0 for the GRPO policy, whose ratio
    needs the rollout's and the update's log-probs from the same function; SimCSE turns it on."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    arch.check_tensor_parallel(tp)
    arch.check_pipeline_parallel(pp)
    if sequence_parallel and tp == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if not transformer_engine_available():
        rope.install()  # cached-cos/sin RoPE behind Megatron's fused-RoPE switch below
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=hidden_dropout,
        attention_dropout=0.0,
        # SwiGLU through Megatron's jit-fused kernel (pure torch, faster than silu on the strided half of fc1 on CPU
        # too: docs/performance.md). The other fusions need apex/TE kernels; their unfused paths are numerically the
        # reference ones.
        bias_activation_fusion=True,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=True,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # CPU initialisation gives the same random init at every TP size (tests and fresh runs compare layouts).
        use_cpu_initialization=not has_cuda(),
        perform_initialization=True,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )


def layer_spec(config: TransformerConfig) -> TransformerBlockSubmodules | ModuleSpec:
    if transformer_engine_available():
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
        spec.submodules.self_attention.module = RotatedKeyCacheSelfAttention
        return spec
    spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
    layer = spec.submodules
    layer.self_attention.module = RotatedKeyCacheSelfAttention
    layer.input_layernorm = RMSNorm
    layer.pre_mlp_layernorm = RMSNorm
    attention = layer.self_attention.submodules
    attention.core_attention = SDPAttention
    if config.qk_layernorm:
        attention.q_layernorm = RMSNorm
        attention.k_layernorm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm)


def build_gpt_model(arch: ModelArchitecture, config: TransformerConfig, *, pre_process: bool | None = None,
                    post_process: bool | None = None) -> GraceGPTModel:
    """One pipeline stage of the model (the stage of this rank unless pre/post_process are given)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    model = GraceGPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config),
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        rope_scaling=arch.llama3_rope_scaling_factor is not None,
        rope_scaling_factor=arch.llama3_rope_scaling_factor or 8.0,
    )
    model.arch = arch
    if has_cuda():
        model.cuda(torch.cuda.current_device())
    return model


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set logits of padded vocabulary rows to -inf on this TP rank's vocabulary shard (last dimension).

    The padded embedding rows are zero, so their logits are 0, not -inf: without this they would take probability mass
    in sampling and log-probs.
    """
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    valid = vocab_size - start
    if valid >= shard:
        return logits
    return torch.cat([logits[..., : max(valid, 0)],
                      logits.new_full((*logits.shape[:-1], shard - max(valid, 0)), float("-inf"))], dim=-1)


@contextlib.contextmanager
def config_overrides(config: TransformerConfig, **values):
    """Set TransformerConfig fields for the duration (Megatron's modules and schedules read them at call time)."""
    saved = {name: getattr(config, name) for name in values}
    for name, value in values.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)
