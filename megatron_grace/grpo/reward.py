"""GRACE rewards for this rank's groups, computed on the last pipeline stage.

The cross-group term compares a group with every other group of the *global* batch, so the pooled embeddings
(O(B·H) floats, not hidden states) are all-gathered over the data-parallel group; each rank then evaluates the fused
reward kernel on the global batch and keeps its own rows. Groups are whole on one rank (contiguous data sharding), so
the gathered rows are already group-major.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..config import ObjectiveConfig
from .losses import apply_length_penalty, group_advantages
from ..kernels import grace_rewards
from ..kernels.grace_rewards import REWARD_TERMS, term_weights


# The parts of a reward whose share of the advantage variance is logged (advantage_share_<term>).
ADVANTAGE_SHARE_TERMS = ("pos", "neg", "clust", "cross", "length")


def all_gather_data_parallel(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every data-parallel rank (equal shapes), concatenated along dim 0 in rank order; no gradient."""
    group = parallel_state.get_data_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


@dataclass(frozen=True)
class GlobalEmbeddings:
    """The step's pooled embeddings of the whole batch, gathered once over data-parallel ranks (rank order; groups
    are whole on one rank, so the rows stay group-major) for the rewards and the collapse signals, and which main
    rows are this rank's."""

    main: torch.Tensor  # [G·K, H]
    query: torch.Tensor  # [G, H]: the query rows (supervised) or anchor rows (unsupervised)
    negatives: torch.Tensor | None  # [G, M, H]
    local_rows: slice  # this rank's rows of ``main``

    @classmethod
    def gather(cls, embeddings: torch.Tensor, rows) -> GlobalEmbeddings:
        """From this rank's pooled ``embeddings`` of every row of ``rows`` (a :class:`GrpoRows`)."""
        negatives = rows.negatives_view(embeddings)
        offset = parallel_state.get_data_parallel_rank() * rows.num_main
        return cls(all_gather_data_parallel(embeddings[rows.main]), all_gather_data_parallel(embeddings[rows.query]),
                   None if negatives is None else all_gather_data_parallel(negatives),
                   slice(offset, offset + rows.num_main))


def compute_rewards(embeddings: GlobalEmbeddings, truncated: torch.Tensor, group_size: int,
                    objective: ObjectiveConfig, *, mode: str) -> dict[str, torch.Tensor]:
    """Rewards of this rank's main rollouts (``mode``: ``--train-mode``; the reward flags from ``objective``).

    ``truncated`` [G·K] bool: this rank's main rows. Returns float32 [G·K] tensors: ``total`` (length penalty
    applied) and the raw terms pos/neg/clust/cross.
    """
    negatives = embeddings.negatives
    if negatives is not None and objective.reward_variant == "code":
        negatives = negatives[:, 0]  # exactly one negative per query; paper and per-rollout take all of them
    terms = grace_rewards(embeddings.main, embeddings.query, negatives, group_size=group_size, mode=mode,
                          variant=objective.reward_variant, temperature=objective.reward_temperature,
                          clustering_weight=objective.clustering_weight,
                          cross_group_weight=objective.cross_group_weight)
    local = {name: terms[name][embeddings.local_rows] for name in REWARD_TERMS}
    local["total"] = apply_length_penalty(local["total"], truncated.to(local["total"].device),
                                          objective.length_penalty)
    return local


def advantage_variance_sums(rewards: dict[str, torch.Tensor], truncated: torch.Tensor, group_size: int,
                            objective: ObjectiveConfig, *, mode: str) -> dict[str, float]:
    """How much of the GRPO advantage each reward term carries, as sums to reduce over ranks.

    The reward of a row is written as the sum of contributions: weight · term for every term on every row, plus, for
    a truncated response, ``length`` = penalty − (its weighted terms), the change the length penalty makes when it
    replaces the reward. The advantage (before any std normalisation) is that sum minus its group mean. Term t's
    share is cov(centred contribution_t, advantage) / var(advantage): the shares add up to one, and a term that is
    constant within every group (neg and cross in the code and paper variants) has share exactly 0, whatever the
    truncation. Returns ``advantage_cov_<term>_sum`` per term (and ``length``) and ``advantage_var_sum``."""
    weights = term_weights(mode, objective.reward_variant, objective.reward_temperature,
                           objective.clustering_weight, objective.cross_group_weight)
    truncated = truncated.to(rewards["pos"].device)
    contributions = {name: weight * rewards[name].double() for name, weight in weights.items()}
    contributions["length"] = torch.where(truncated, objective.length_penalty - sum(contributions.values()), 0.0)
    centred = {name: group_advantages(values, group_size) for name, values in contributions.items()}
    advantage = sum(centred.values())
    sums = {f"advantage_cov_{name}_sum": float((values * advantage).sum()) for name, values in centred.items()}
    sums["advantage_var_sum"] = float((advantage ** 2).sum())
    return sums
