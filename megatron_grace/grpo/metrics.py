"""A GRPO step's metrics and sample rationales (the logger itself and the shared throughput numbers live in
:mod:`megatron_grace.metrics`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ObjectiveConfig
from ..metrics import reduce_metrics, std_of_sums, throughput_metrics
from .collapse import COLLAPSE_SIGNALS
from .experience import Experience, SequenceBatch, logprob_mismatch_sum
from .reward import ADVANTAGE_SHARE_TERMS, advantage_variance_sums
from .rows import GrpoRows


@dataclass
class StepOutcome:
    """What one GRPO step produced on this rank: its rows, rollouts, the one-pass forward's experience, rewards and
    advantages of the main rows and the batch's collapse signals (None off the last pipeline stage), the update's
    sums and grad norm, and the seconds of each phase."""

    rows: GrpoRows
    rollouts: list
    batch: SequenceBatch
    experience: Experience
    rewards: dict[str, torch.Tensor] | None
    advantages: torch.Tensor | None
    collapse: dict[str, float] | None
    update: dict
    timings: dict[str, float]


def grpo_step_metrics(step: int, outcome: "StepOutcome", objective: ObjectiveConfig, *, mode: str,
                      micro_batch_size: int, with_lengths: bool, lr: float) -> dict:
    """A GRPO step's metrics (``metrics.jsonl``) from what the step produced (:class:`StepOutcome`), reduced over
    data-parallel ranks from the last pipeline stage's values; returned on every rank. ``with_lengths``: also every
    main row's response length (for the report's histogram)."""
    batch, rollouts, rows, experience = outcome.batch, outcome.rollouts, outcome.rows, outcome.experience
    rewards, advantages, update, timings = outcome.rewards, outcome.advantages, outcome.update, outcome.timings
    is_last_stage = rewards is not None
    main_lengths = batch.response_lengths[rows.main].float()
    main_rollouts = rollouts[rows.main]
    sums = {"main_rows": float(rows.num_main), "groups": float(rows.groups),
            "response_length_sum": float(main_lengths.sum()),
            "query_response_length_sum": float(batch.response_lengths[rows.query].sum()),
            "truncated": float(sum(r.truncated for r in main_rollouts)),
            "rollout_tokens": float(batch.response_lengths.sum())}
    sums["forward_tokens"], sums["forward_real_tokens"] = map(float, batch.token_counts(micro_batch_size))
    maxima = {"response_length_max": float(main_lengths.max())}
    if is_last_stage:
        for term, values in rewards.items():
            sums[f"reward_{term}_sum"] = float(values.sum())
            sums[f"reward_{term}_sq_sum"] = float((values.double() ** 2).sum())
        sums["advantage_sum"] = float(advantages.sum())
        sums["advantage_sq_sum"] = float((advantages.double() ** 2).sum())
        maxima["advantage_abs_max"] = float(advantages.abs().max())
        maxima.update(outcome.collapse)  # of the whole gathered batch: the same on every data-parallel rank
        sums.update(advantage_variance_sums(rewards, torch.tensor([r.truncated for r in main_rollouts]),
                                            rows.rollout_n, objective, mode=mode))
        sums["logprob_mismatch_sum"] = float(logprob_mismatch_sum(
            main_rollouts, experience.old_log_probs[rows.main], batch.response_target_mask()[rows.main]))
        sums.update({key: value for key, value in update.items() if key != "grad_norm"})
    lengths = {"response_lengths": main_lengths.long().tolist()} if with_lengths else {}
    metrics = reduce_metrics(sums, maxima, is_contributing=is_last_stage, concatenated=lengths)
    tokens = max(metrics.get("tokens", 0.0), 1.0)
    main_total = max(metrics["main_rows"], 1.0)
    result = {
        "step": step,
        "reward_mean": metrics.get("reward_total_sum", float("nan")) / main_total,
        "reward_std": std_of_sums(metrics.get("reward_total_sum"), metrics.get("reward_total_sq_sum"), main_total),
        "loss": metrics.get("policy_loss_sum", float("nan")) / tokens,
        "response_length_mean": metrics["response_length_sum"] / main_total,
        "response_length_max": metrics["response_length_max"],
        "query_response_length_mean": metrics["query_response_length_sum"] / max(metrics["groups"], 1.0),
        "truncation_rate": metrics["truncated"] / main_total,
        "advantage_mean": metrics.get("advantage_sum", float("nan")) / main_total,
        "advantage_std": std_of_sums(metrics.get("advantage_sum"), metrics.get("advantage_sq_sum"), main_total),
        "advantage_abs_max": metrics.get("advantage_abs_max", float("nan")),
        "clip_fraction": metrics.get("clipped", float("nan")) / tokens,
        "dual_clip_fraction": metrics.get("dual_clipped", float("nan")) / tokens,
        "logprob_mismatch": metrics.get("logprob_mismatch_sum", float("nan")) / tokens,
        "grad_norm": update["grad_norm"],
        "lr": lr,
    }
    for term in ("pos", "neg", "clust", "cross"):
        result[f"reward_{term}_mean"] = metrics.get(f"reward_{term}_sum", float("nan")) / main_total
    for key in COLLAPSE_SIGNALS:
        result[key] = metrics.get(key, float("nan"))
    variance = metrics.get("advantage_var_sum", 0.0)
    for term in ADVANTAGE_SHARE_TERMS:  # NaN when no group had any spread
        result[f"advantage_share_{term}"] = (metrics.get(f"advantage_cov_{term}_sum", float("nan")) / variance
                                             if variance > 0 else float("nan"))
    if objective.kl_coef > 0:
        result["kl"] = metrics.get("kl_sum", float("nan")) / tokens
    if objective.entropy_coef > 0:
        result["entropy"] = metrics.get("entropy_sum", float("nan")) / tokens
    result["rollout_tokens_per_s"] = metrics["rollout_tokens"] / max(timings["rollout"], 1e-9)
    result.update(throughput_metrics(timings, metrics, update_tokens=tokens))
    if "response_lengths" in metrics:
        result["response_lengths"] = metrics["response_lengths"]
    return result


def rationale_samples(step: int, example, rollouts, rewards, tokenizer) -> list[dict]:
    """``samples.jsonl`` records of one group: each main rationale, decoded, with its text and reward."""
    return [{"step": step, "sample_id": example.sample_id, "rollout": index, "text": example.row.main,
             "rationale": tokenizer.decode(rollout.response, skip_special_tokens=False),
             "response_length": len(rollout.response), "reward": reward, "truncated": rollout.truncated}
            for index, (rollout, reward) in enumerate(zip(rollouts, rewards))]
