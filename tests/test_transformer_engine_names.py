"""The HF adapter and the weight loader against the parameter names of Megatron-Core's Transformer Engine layer spec.

TE cannot be imported without CUDA, so the names are written out from Megatron-Core 0.16.1's
``get_gpt_layer_with_transformer_engine_spec`` (``gpt_layer_specs.py``): ``linear_qkv`` and ``linear_fc1`` are
``TELayerNormColumnParallelLinear`` (the pre-attention and pre-MLP norms fused in as ``layer_norm_weight``),
``linear_proj`` and ``linear_fc2`` are ``TERowParallelLinear``, q/k norms and the final norm are ``TENorm``. HF → TE-named
Megatron state → HF must be bit-identical, and a model whose parameters carry TE names must load every tensor.
"""
import pytest
import torch

from megatron_grace.models import architecture_from_hf_config
from megatron_grace.models.builder import make_transformer_config
from megatron_grace.models.state_dict import (hf_to_mcore, load_global_state_into_model, mcore_to_hf,
                                              transformer_engine_name)
from megatron_grace.platform import ParallelLayout, destroy_distributed, initialize_distributed
from megatron_grace.testing import FAMILIES, tiny_hf_model

TE_LAYER_PARAMETERS = (
    "self_attention.linear_qkv.layer_norm_weight",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight",
    "mlp.linear_fc1.layer_norm_weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
)
TE_QKV_BIAS = ("self_attention.linear_qkv.bias",)
TE_QK_NORMS = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")
TE_MODEL_PARAMETERS = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight")
TE_UNTIED_OUTPUT = ("output_layer.weight",)


def te_parameter_names(arch) -> set[str]:
    per_layer = TE_LAYER_PARAMETERS + (TE_QKV_BIAS if arch.qkv_bias else ()) + (TE_QK_NORMS if arch.qk_layernorm
                                                                                 else ())
    names = {f"decoder.layers.{layer}.{suffix}" for layer in range(arch.num_layers) for suffix in per_layer}
    return names | set(TE_MODEL_PARAMETERS) | (set() if arch.tie_word_embeddings else set(TE_UNTIED_OUTPUT))


def hf_model_and_arch(family: str):
    model = tiny_hf_model(family)
    arch = architecture_from_hf_config({**model.config.to_dict(), "architectures": [type(model).__name__]})
    return {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}, arch


class TransformerEngineNamedStage(torch.nn.Module):
    """Stands in for a GPTModel stage built with the TE spec: parameters under TE's names, Megatron's config."""

    def __init__(self, config, shapes: dict[str, torch.Size]):
        super().__init__()
        self.config = config
        for name, shape in shapes.items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(torch.full(shape, float("nan"), dtype=torch.bfloat16)))


def assert_bit_identical(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name].view(torch.int16), tensor.view(torch.int16)), name


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_transformer_engine_names_and_back_is_bit_identical(family):
    hf_state, arch = hf_model_and_arch(family)
    te_state = {transformer_engine_name(name): tensor for name, tensor in hf_to_mcore(hf_state, arch).items()}
    assert set(te_state) == te_parameter_names(arch)
    tied_copy = {"lm_head.weight"} if arch.tie_word_embeddings else set()
    assert_bit_identical(mcore_to_hf(te_state, arch), {k: v for k, v in hf_state.items() if k not in tied_copy})


@pytest.fixture(scope="module")
def world_of_one():
    initialize_distributed(ParallelLayout())
    yield
    destroy_distributed()


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_load_into_a_transformer_engine_named_model(world_of_one, family):
    hf_state, arch = hf_model_and_arch(family)
    mcore_state = hf_to_mcore(hf_state, arch)
    shapes = {transformer_engine_name(name): tensor.shape for name, tensor in mcore_state.items()}
    stage = TransformerEngineNamedStage(make_transformer_config(arch, params_dtype=torch.bfloat16), shapes)
    assert {name for name, _ in stage.named_parameters()} == te_parameter_names(arch)

    load_global_state_into_model(stage, mcore_state)

    exported = mcore_to_hf({name: param.detach() for name, param in stage.named_parameters()}, arch)
    tied_copy = {"lm_head.weight"} if arch.tie_word_embeddings else set()
    assert_bit_identical(exported, {k: v for k, v in hf_state.items() if k not in tied_copy})
