"""GRPO pieces as plain tensor functions: length penalty, group advantages, the PPO clipped surrogate with dual clip,
the low-variance KL and the vocabulary-parallel entropy. Each is checked against hand computation in the tests."""
from __future__ import annotations

import torch


def apply_length_penalty(rewards: torch.Tensor, truncated: torch.Tensor, penalty: float) -> torch.Tensor:
    """A response that hit the length limit without EOS gets ``penalty`` *instead of* its reward (not added)."""
    return torch.where(truncated, torch.full_like(rewards, penalty), rewards)


def group_advantages(rewards: torch.Tensor, group_size: int, *, norm_by_std: bool = False,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages of group-major rewards [G·K]: reward minus its group's mean (divided by the group's std + eps
    with ``norm_by_std``). A group of identical rewards gets zero advantages, never NaN."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if norm_by_std:
        # Unbiased std as in verl (torch.std); K = 1 has no spread, so its std counts as 0.
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def ppo_clipped_token_losses(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                             *, clip_low: float, clip_high: float, dual_clip_c: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO loss with dual clip (verl's ``compute_policy_loss``).

    loss = max(-A·r, -A·clip(r, 1-low, 1+high)); for A < 0 it is further capped at -A·c, so a very large ratio on a
    bad action cannot dominate. Returns (losses, clipped mask, dual-clipped mask), all shaped like ``log_probs``.
    """
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    losses = torch.maximum(unclipped, clipped)
    dual_bound = -advantages * dual_clip_c
    dual_clipped = (advantages < 0) & (losses > dual_bound)
    losses = torch.where(dual_clipped, dual_bound, losses)
    return losses, clipped > unclipped, dual_clipped


def low_var_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π‖π_ref) per token: exp(ref - logp) - (ref - logp) - 1, clamped to [-10, 10] like verl."""
    log_ratio = ref_log_probs - log_probs
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, min=-10.0, max=10.0)


def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, from vocabulary-parallel logits [..., V/TP] (padded rows = -inf),
    differentiable; only three [...]-sized reductions cross the TP group."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    group = parallel_state.get_tensor_model_parallel_group()
    logits = logits.float()
    local_max = logits.max(dim=-1, keepdim=True).values.detach()
    global_max = local_max.clone()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = logits - global_max
    exp = torch.exp(shifted)
    sum_exp = reduce_from_tensor_model_parallel_region(exp.sum(dim=-1))
    # Padded vocabulary rows are -inf: exp = 0 there, and 0·(-inf) must count as 0.
    sum_exp_logit = reduce_from_tensor_model_parallel_region(
        torch.where(exp > 0, exp * shifted, torch.zeros_like(exp)).sum(dim=-1))
    return torch.log(sum_exp) - sum_exp_logit / sum_exp
