"""Llama 3.x and SmolLM2 (LlamaForCausalLM): no biases, optional Llama 3 RoPE scaling, optionally tied embeddings."""
from .config import ModelArchitecture, UnsupportedModelError, common_fields, common_hf_config

HF_ARCHITECTURES = ("LlamaForCausalLM",)


def architecture_from_hf(hf_config: dict) -> ModelArchitecture:
    if hf_config.get("attention_bias"):
        raise UnsupportedModelError("Llama with attention_bias=true is not supported")
    return ModelArchitecture(**common_fields(hf_config, "llama"))


def hf_config_from_architecture(arch: ModelArchitecture) -> dict:
    return {**common_hf_config(arch, "llama"), "attention_bias": False, "mlp_bias": False}
