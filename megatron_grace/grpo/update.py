"""Stage 6 of a GRPO step: PPO epochs over mini-batches of whole groups, one optimizer update per mini-batch, with
the per-token loss (clipped surrogate with dual clip, optional low-variance KL and entropy terms) token-meaned over
the mini-batch by the schedule. The tensor maths is in :mod:`megatron_grace.grpo`."""
from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state

from .. import fault_injection
from ..config import ObjectiveConfig, TrainingConfig
from .experience import Experience, SequenceBatch
from .losses import low_var_kl, ppo_clipped_token_losses, vocab_parallel_entropy
from ..optim import GuardedOptimizer
from ..schedule import StageOutput, run_microbatches
from .rows import GrpoRows


def grpo_update(model, optimizer: GuardedOptimizer, batch: SequenceBatch, experience: Experience,
                reference_log_probs: torch.Tensor | None, advantages: torch.Tensor | None, rows: GrpoRows,
                temperatures: torch.Tensor, *, training: TrainingConfig, objective: ObjectiveConfig,
                step: int) -> dict:
    """The policy update over this rank's main rows. Only the last pipeline stage holds the old log-probs, the
    reference log-probs and the advantages; the other stages pass zeros of the same shapes, which their loss never
    reads. Returns the summed loss metrics of the applied updates, the token counts and the largest grad norm."""
    is_last_stage = parallel_state.is_pipeline_last_stage()
    rows_per_mini_batch = (training.ppo_mini_batch_size // parallel_state.get_data_parallel_world_size()
                           * rows.rollout_n)
    width = batch.tokens.shape[1] - 1
    old_log_probs = experience.old_log_probs if is_last_stage else torch.zeros(len(batch), width)
    if advantages is None:
        advantages = torch.zeros(rows.num_main)
    per_row = {"advantages": advantages, "old_log_probs": old_log_probs[rows.main],
               "temperatures": temperatures[rows.main]}
    if reference_log_probs is not None:
        per_row["reference_log_probs"] = (reference_log_probs if is_last_stage
                                          else torch.zeros(len(batch), width))[rows.main]
    main = batch.select(rows.main)
    loss_fn = partial(policy_loss, objective=objective, step=step)
    totals: dict[str, float] = {}
    grad_norms = []
    for _ in range(training.ppo_epochs):
        for first in range(0, rows.num_main, rows_per_mini_batch):
            mini_rows = slice(first, first + rows_per_mini_batch)
            mini = main.select(mini_rows)
            micro = mini.microbatches(training.micro_batch_size, **{k: v[mini_rows] for k, v in per_row.items()})
            computed, real = mini.token_counts(training.micro_batch_size)
            totals["update_tokens"] = totals.get("update_tokens", 0.0) + computed
            totals["update_real_tokens"] = totals.get("update_real_tokens", 0.0) + real
            optimizer.begin_update()
            outputs = run_microbatches(model, micro, loss_fn, forward_only=False,
                                       need_logits=objective.entropy_coef > 0)
            applied, grad_norm = optimizer.finish_update(step, outputs)
            grad_norms.append(grad_norm)
            if not applied:
                continue
            for out in outputs:
                for key, value in out.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
    totals["grad_norm"] = max(grad_norms) if grad_norms else float("nan")
    return totals


def policy_loss(micro: dict, output: StageOutput, *, objective: ObjectiveConfig, step: int):
    """One micro-batch's summed token losses over its rationale tokens (filler rows masked out), their count (the
    schedule divides by the mini-batch's total) and the summed metrics."""
    log_probs = output.log_probs
    mask = (micro["response_mask"] & ~micro["is_filler"].unsqueeze(1)).float()
    advantages = micro["advantages"].unsqueeze(1).to(log_probs.dtype)
    losses, clipped, dual_clipped = ppo_clipped_token_losses(
        log_probs, micro["old_log_probs"], advantages, clip_low=objective.clip_ratio_low,
        clip_high=objective.clip_ratio_high, dual_clip_c=objective.clip_ratio_c)
    policy_loss_sum = (losses * mask).sum()
    fault_injection.nonfinite("loss", step, policy_loss_sum)
    loss = policy_loss_sum
    metrics = {"policy_loss_sum": policy_loss_sum.detach(), "clipped": (clipped.float() * mask).sum(),
               "dual_clipped": (dual_clipped.float() * mask).sum()}
    if "reference_log_probs" in micro:
        kl_sum = (low_var_kl(log_probs, micro["reference_log_probs"]) * mask).sum()
        loss = loss + objective.kl_coef * kl_sum
        metrics["kl_sum"] = kl_sum.detach()
    if objective.entropy_coef > 0:
        entropy_sum = (vocab_parallel_entropy(output.logits[:, :-1]) * mask).sum()
        loss = loss - objective.entropy_coef * entropy_sum
        metrics["entropy_sum"] = entropy_sum.detach()
    num_tokens = mask.sum().to(torch.int)
    metrics["tokens"] = num_tokens.float()
    return loss, num_tokens, metrics
