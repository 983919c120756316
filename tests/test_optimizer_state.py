"""Optimizer state through a checkpoint with both optimizer kinds Megatron-Core picks: torch's AdamW (no TE/apex,
every parameter's state carries a ``step``) and Transformer Engine's FusedAdam (``step`` in the param groups; its
``state_dict()`` raises ``KeyError`` on any other per-parameter key). TE cannot be imported on CPU: a stand-in with
FusedAdam's checkpoint behaviour is installed where Megatron-Core looks the optimizer up.

Each kind: one update, save, load into a fresh optimizer; the restored moments equal the saved ones exactly and the
next update of the restored optimizer equals the uninterrupted one's exactly.
"""
import pytest
import torch

from megatron_grace.checkpointing import load_checkpoint, save_checkpoint
from megatron_grace.models import architecture_from_hf_config
from megatron_grace.models.builder import build_gpt_model, make_transformer_config
from megatron_grace.config import OptimConfig
from megatron_grace.optim import optimizer_step, wrap_for_training, zero_grads
from megatron_grace.platform import ParallelLayout, destroy_distributed, initialize_distributed, seed_everything
from megatron_grace.testing import tiny_hf_model


class FusedAdamStandIn(torch.optim.Optimizer):
    """TE's FusedAdam as far as checkpoints go: Adam(W) with ``step`` in each param group, ``exp_avg`` /
    ``exp_avg_sq`` per parameter, and a ``state_dict()`` that rejects other state keys as TE's does."""

    STATE_KEYS = {"exp_avg", "exp_avg_sq", "master_param"}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(param), torch.zeros_like(param)
                state["exp_avg"].mul_(beta1).add_(param.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                corrected = (state["exp_avg_sq"] / (1 - beta2 ** group["step"])).sqrt().add_(group["eps"])
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.addcdiv_(state["exp_avg"], corrected, value=-group["lr"] / (1 - beta1 ** group["step"]))

    def state_dict(self):
        for state in self.state.values():
            for key in state:
                if key not in self.STATE_KEYS:
                    raise KeyError(key)
        return super().state_dict()


@pytest.fixture
def fused_adam(monkeypatch):
    from megatron.core import optimizer as megatron_optimizer
    from megatron.core.optimizer import distrib_optimizer

    monkeypatch.setattr(megatron_optimizer, "USING_PYTORCH_OPTIMIZER", False)
    monkeypatch.setattr(megatron_optimizer, "Adam", FusedAdamStandIn)
    monkeypatch.setattr(distrib_optimizer, "Adam", FusedAdamStandIn)
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    monkeypatch.setattr(distrib_optimizer, "USING_TE_OPTIMIZER", True)


@pytest.fixture(scope="module")
def world_of_one():
    initialize_distributed(ParallelLayout())
    yield
    destroy_distributed()


def build(arch):
    seed_everything(0)
    model = build_gpt_model(arch, make_transformer_config(arch))
    return wrap_for_training(model, OptimConfig(lr=1e-3))


def update(model, optimizer, seed: int) -> None:
    zero_grads(model, optimizer)
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.main_grad.copy_(torch.randn(param.shape, generator=generator))
    applied, _ = optimizer_step(model, optimizer)
    assert applied


def moments(optimizer) -> list[torch.Tensor]:
    inner = optimizer.optimizer
    return [inner.state[p][key].clone() for group in inner.param_groups for p in group["params"]
            for key in ("exp_avg", "exp_avg_sq")]


@pytest.mark.parametrize("kind", ["torch-adamw", "te-fused-adam"])
def test_optimizer_state_survives_a_checkpoint(world_of_one, request, tmp_path, kind):
    if kind == "te-fused-adam":
        request.getfixturevalue("fused_adam")
    hf_model = tiny_hf_model("qwen2")
    arch = architecture_from_hf_config({**hf_model.config.to_dict(), "architectures": ["Qwen2ForCausalLM"]})
    model, optimizer = build(arch)
    expected_class = torch.optim.AdamW if kind == "torch-adamw" else FusedAdamStandIn
    assert type(optimizer.optimizer) is expected_class
    update(model, optimizer, seed=1)
    save_checkpoint(tmp_path, 1, model, optimizer, arch=arch)
    saved_moments = moments(optimizer)
    update(model, optimizer, seed=2)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    resumed_model, resumed_optimizer = build(arch)
    load_checkpoint(tmp_path / "iter_0000001", resumed_model, resumed_optimizer, arch=arch)
    for restored, saved in zip(moments(resumed_optimizer), saved_moments):
        assert torch.equal(restored, saved)
    update(resumed_model, resumed_optimizer, seed=2)
    for resumed, expected in zip(resumed_model.parameters(), uninterrupted):
        assert torch.equal(resumed.detach(), expected)
