"""Qwen3 (Qwen3ForCausalLM): per-head RMSNorm on queries and keys, no biases, explicit head_dim."""
from .config import ModelArchitecture, UnsupportedModelError, common_fields, common_hf_config

HF_ARCHITECTURES = ("Qwen3ForCausalLM",)


def architecture_from_hf(hf_config: dict) -> ModelArchitecture:
    if hf_config.get("attention_bias"):
        raise UnsupportedModelError("Qwen3 with attention_bias=true is not supported")
    return ModelArchitecture(**common_fields(hf_config, "qwen3"), qk_layernorm=True)


def hf_config_from_architecture(arch: ModelArchitecture) -> dict:
    return {**common_hf_config(arch, "qwen3"), "attention_bias": False, "use_sliding_window": False}
