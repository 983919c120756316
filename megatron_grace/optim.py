"""Megatron DDP + distributed optimizer for the policy, wired into the model config the way Megatron-LM's training
loop does (gradient finalisation with per-token loss scaling, loss scaling for fp16, no-sync for micro-batches), and
the learning-rate schedule; :class:`GuardedOptimizer` is what a training step calls."""
from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from . import fault_injection
from .config import OptimConfig
from .guards import NonFiniteGuard


def _fix_torch_adamw_checkpoint_loading() -> None:
    """Two defects of Megatron-Core 0.16.1's distributed optimizer with torch's AdamW (no apex/TE fused Adam), where
    every parameter's optimizer state carries its own ``step`` tensor:

    * the fully reshardable checkpoint format stores only the moments (the step travels in param_groups), and loading
      then looks up ``step`` among the saved tensors and fails: keep the value already restored instead;
    * loading restores ``step`` as ONE tensor shared by all parameters; AdamW increments it in place once per
      parameter, so after a resume the bias correction runs far ahead and the first update differs from an
      uninterrupted run: give every parameter its own copy.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE or getattr(DistributedOptimizer, "_grace_adamw_patch", False):
        return
    original_set_states = DistributedOptimizer._set_main_param_and_optimizer_states
    original_load_state_dict = DistributedOptimizer.load_state_dict

    def set_states(self, model_param, tensors):
        current = self._get_main_param_and_optimizer_states(model_param)
        original_set_states(self, model_param, {**current, **tensors})

    def load_state_dict(self, state_dict):
        original_load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    DistributedOptimizer.load_state_dict = load_state_dict
    DistributedOptimizer._grace_adamw_patch = True


ADAM_EPS = 1e-8  # Megatron-LM's --adam-eps default; not a flag here


def wrap_for_training(model, optim: OptimConfig, *, use_distributed_optimizer: bool = True):
    """Wrap one model stage in Megatron DDP and build the (distributed) AdamW optimizer from ``optim`` (``--lr``,
    ``--weight-decay``, ``--adam-beta1/2``, ``--clip-grad``).

    Losses are sums over tokens and ``num_tokens`` is returned from the loss function
    (``calculate_per_token_loss``): Megatron then divides gradients by the token count of the whole mini-batch, summed
    over micro-batches and data-parallel ranks, which is GRPO's token-mean aggregation.
    """
    config = model.config
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=ADAM_EPS,
        clip_grad=optim.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(optimizer_config, [ddp_model])
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if keeps_step_per_parameter(inner.optimizer):
            _fix_torch_adamw_checkpoint_loading()
            inner.init_state_fn = _with_step_counter(inner.init_state_fn)
        # Eager state (zero moments, step 0: what AdamW creates lazily at its first step) so that a fresh optimizer
        # can take a checkpoint's state, whose loading starts from this optimizer's own state_dict.
        inner.init_state_fn(inner.optimizer, inner.config)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp_model.no_sync
    return ddp_model, optimizer


def keeps_step_per_parameter(optimizer) -> bool:
    """torch's Adam/AdamW (Megatron's choice without TE or apex) keep a ``step`` tensor in every parameter's state.
    TE's and apex's FusedAdam keep it in the param groups, and TE's ``state_dict()`` raises ``KeyError`` on any other
    per-parameter key, so nothing may be added for them."""
    return isinstance(optimizer, torch.optim.Adam)  # AdamW subclasses Adam


def _with_step_counter(init_state_fn):
    """Megatron's state initialiser (run before loading optimizer state into a fresh optimizer) creates Adam's moments
    but not torch AdamW's per-parameter ``step``, which the distributed optimizer's state_dict requires when neither
    apex nor Transformer Engine provides the fused Adam. Add it."""

    def init_state(opt, config=None):
        init_state_fn(opt, config)
        for group in opt.param_groups:
            for param in group["params"]:
                opt.state[param].setdefault("step", torch.tensor(0.0))

    return init_state


def optimizer_step(ddp_model, optimizer) -> tuple[bool, float | None]:
    """One optimizer step after the forward/backward schedule. Returns (applied, grad norm)."""
    applied, grad_norm, _ = optimizer.step()
    return bool(applied), (None if grad_norm is None else float(grad_norm))


def zero_grads(ddp_model, optimizer) -> None:
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()


def learning_rate(optim: OptimConfig, optimizer_steps: int) -> float:
    """The schedule: linear warm-up over ``--lr-warmup-iters`` optimizer steps, then constant ``--lr`` (the
    paper's). ``optimizer_steps``: the steps already taken."""
    warmup = optim.lr_warmup_iters
    scale = min(1.0, (optimizer_steps + 1) / warmup) if warmup > 0 else 1.0
    return optim.lr * scale


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class GuardedOptimizer:
    """The optimizer as a training step uses it: each update starts with the learning rate of the schedule and
    zeroed gradient buffers, and is applied only if no loss and no gradient is NaN/Inf on any rank (checked before
    ``optimizer.step()``, which clips with the grad norm and applies the update in one call)."""

    def __init__(self, model, optimizer, optim: OptimConfig, nonfinite: NonFiniteGuard):
        self.model, self.optimizer, self.optim, self.nonfinite = model, optimizer, optim, nonfinite
        self.optimizer_steps = 0  # updates applied; the schedule's position, saved in the checkpoint

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def begin_update(self) -> None:
        set_learning_rate(self.optimizer, learning_rate(self.optim, self.optimizer_steps))
        zero_grads(self.model, self.optimizer)

    def finish_update(self, step: int, outputs: list[dict]) -> tuple[bool, float]:
        """After the forward/backward schedule whose per-micro-batch metrics are ``outputs``: the optimizer step,
        unless something is non-finite. Returns (applied, grad norm; NaN when skipped)."""
        fault_injection.nonfinite("grad", step, next(self.model.parameters()).main_grad)
        if not (self.nonfinite.check(step, "loss", [v for out in outputs for v in out.values()])
                and self.nonfinite.check_gradients(step, self.model)):
            return False, float("nan")
        _, grad_norm = optimizer_step(self.model, self.optimizer)
        self.optimizer_steps += 1
        return True, float("nan") if grad_norm is None else grad_norm
