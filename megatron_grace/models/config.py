"""The architecture of a supported decoder LLM, independent of Hugging Face and Megatron-Core naming.

Each model family module (``llama``, ``qwen2``, ``qwen3``) maps its Hugging Face ``config.json`` to a
:class:`ModelArchitecture` and back; :mod:`megatron_grace.models.builder` turns the architecture into a Megatron-Core
``TransformerConfig`` + ``GPTModel``, and :mod:`megatron_grace.models.state_dict` moves weights between the two
namings. The architecture is stored inside every Megatron checkpoint, so an export needs no HF source folder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Padded vocabularies are a multiple of this, whatever the tensor-parallel size, so that one checkpoint reshards to any
# TP size that divides it (the padded rows never reach logits, log-probs or exports).
VOCAB_PAD_MULTIPLE = 128


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelArchitecture:
    family: str  # "llama" | "qwen2" | "qwen3"
    hf_architecture: str  # e.g. "LlamaForCausalLM"
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_layernorm: bool = False
    # Llama 3 RoPE scaling factor (None: no scaling). Low/high frequency factors and original context are fixed to the
    # values Megatron-Core implements (1, 4, 8192), checked when the HF config is read.
    llama3_rope_scaling_factor: float | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "bfloat16"

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelArchitecture":
        return cls(**values)

    def check_tensor_parallel(self, tp: int) -> None:
        for name, count in (("attention heads", self.num_attention_heads), ("KV heads", self.num_query_groups),
                            ("padded vocabulary rows", self.padded_vocab_size)):
            if count % tp:
                raise ValueError(f"--tensor-model-parallel-size {tp} does not divide the model's {count} {name}")

    def check_pipeline_parallel(self, pp: int) -> None:
        if pp > self.num_layers:
            raise ValueError(f"--pipeline-model-parallel-size {pp} exceeds the model's {self.num_layers} layers")


def read_rope_settings(hf_config: dict) -> tuple[float, dict | None]:
    """RoPE theta and scaling from transformers 5.x (``rope_parameters``) or 4.x (``rope_theta``/``rope_scaling``)."""
    params = hf_config.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        return float(theta), (None if rope_type == "default" else params)
    scaling = hf_config.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(hf_config.get("rope_theta", 10000.0)), scaling


def common_fields(hf_config: dict, family: str) -> dict:
    """Fields every supported family shares, read from an HF config dict."""
    heads = hf_config["num_attention_heads"]
    for flag in ("use_sliding_window", "mlp_bias"):
        if hf_config.get(flag):
            raise UnsupportedModelError(f"{flag}=true in config.json is not supported")
    theta, scaling = read_rope_settings(hf_config)
    return dict(
        family=family,
        hf_architecture=hf_config["architectures"][0],
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hf_config["hidden_size"],
        ffn_hidden_size=hf_config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        vocab_size=hf_config["vocab_size"],
        max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        llama3_rope_scaling_factor=_llama3_scaling_factor(scaling),
        bos_token_id=hf_config.get("bos_token_id"),
        eos_token_id=hf_config.get("eos_token_id"),
        torch_dtype=str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "bfloat16"),
    )


def _llama3_scaling_factor(scaling: dict | None) -> float | None:
    if scaling is None:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "llama3":
        raise UnsupportedModelError(f"RoPE scaling type {rope_type!r} is not supported (only 'llama3')")
    fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for key, expected in fixed.items():
        if float(scaling.get(key, expected)) != expected:
            raise UnsupportedModelError(
                f"Llama 3 RoPE scaling with {key}={scaling[key]} is not supported: Megatron-Core implements "
                f"{key}={expected}"
            )
    return float(scaling["factor"])


def common_hf_config(arch: ModelArchitecture, model_type: str) -> dict:
    """The HF config.json fields shared by all families (the inverse of :func:`common_fields`)."""
    rope_parameters = {"rope_type": "default", "rope_theta": arch.rope_theta}
    if arch.llama3_rope_scaling_factor is not None:
        rope_parameters = {"rope_type": "llama3", "rope_theta": arch.rope_theta,
                           "factor": arch.llama3_rope_scaling_factor, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return {
        "architectures": [arch.hf_architecture],
        "model_type": model_type,
        "num_hidden_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": arch.tie_word_embeddings,
        # Both spellings, so the export loads in transformers 4.x and 5.x.
        "rope_theta": arch.rope_theta,
        "rope_scaling": None if arch.llama3_rope_scaling_factor is None else rope_parameters,
        "rope_parameters": rope_parameters,
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": arch.eos_token_id,
        "torch_dtype": arch.torch_dtype,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
