"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): bias on the Q, K and V projections only; tied embeddings on small sizes."""
from .config import ModelArchitecture, common_fields, common_hf_config

HF_ARCHITECTURES = ("Qwen2ForCausalLM",)


def architecture_from_hf(hf_config: dict) -> ModelArchitecture:
    return ModelArchitecture(**common_fields(hf_config, "qwen2"), qkv_bias=True)


def hf_config_from_architecture(arch: ModelArchitecture) -> dict:
    return {**common_hf_config(arch, "qwen2"), "use_sliding_window": False}
