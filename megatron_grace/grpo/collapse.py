"""Rationale collapse: the signals of one GRPO step and the alarm over a window of steps.

A policy can raise GRACE's reward by writing rationales that make *every* text look alike: in the supervised ``code``
variant the negative and cross-group terms are constant within a group and cancel in the advantage, so what is left
rewards a higher cos(query, positive) however it is reached (``results/quality_smollm2_cpu``: over 64 steps the
positive and negative similarities and the cross-group cosine all rose to 0.94-0.95 and the rationales stopped being
about the text). The signals, from what the step already has (pooled embeddings, rationale tokens), on the device:

* ``margin_mean``: cos(query, positive) - cos(query, negative) per main rollout (the mean over negatives); in
  unsupervised mode, or without negatives, the anchor against the other groups' texts (:func:`margin_description`);
  falls when texts become indistinguishable;
* ``embedding_spread``: mean cosine between pooled main embeddings of different groups (different texts); rises;
* ``embedding_effective_rank``: exp of the entropy of the batch's normalised singular values (Roy & Vetterli);
* ``distinct_2``: distinct token bigrams over all bigrams of the step's main rationales;
* ``near_identical_share``: the share of main rationales whose bigram profile (hashed counts) has cosine at least
  ``NEAR_IDENTICAL_COSINE`` with a rationale of another group: text-independent boilerplate.

Everything is computed on the data-parallel-gathered batch, so the values do not depend on the layout.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F

from .reward import all_gather_data_parallel

COLLAPSE_SIGNALS = ("margin_mean", "embedding_spread", "embedding_effective_rank", "distinct_2",
                    "near_identical_share")
NEAR_IDENTICAL_COSINE = 0.9
# Hashed bigram profile width: wide enough that unrelated rationales of up to 2,048 tokens rarely share buckets.
BIGRAM_BUCKETS = 4096
# The alarm compares the mean of the last WINDOW steps with the run's first WINDOW steps: per-step margins of a
# 4-64-group batch are noisy (the CPU study's step-to-step spread is larger than the whole drift over 8 steps).
SPREAD_RISE = 0.03  # the collapse study's cross-group cosine rose 0.09 in 64 steps; the healthy run's moved 0.02


def response_tokens(rollouts, width: int, device) -> torch.Tensor:
    """The rollouts' response tokens as [rows, width] int64, padded with -1."""
    tokens = torch.full((len(rollouts), width), -1, dtype=torch.long)
    for row, rollout in enumerate(rollouts):
        tokens[row, : len(rollout.response)] = torch.tensor(rollout.response[:width], dtype=torch.long)
    return tokens.to(device)


def _bigrams(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bigram ids (a * 2^32 + b) of [rows, width] padded tokens and a mask of the valid ones."""
    first, second = tokens[:, :-1], tokens[:, 1:]
    return first * (1 << 32) + second, (first >= 0) & (second >= 0)


def effective_rank(embeddings: torch.Tensor) -> float:
    singular = torch.linalg.svdvals(F.normalize(embeddings.double(), dim=-1))
    p = singular / singular.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))


def collapse_signals(main: torch.Tensor, query: torch.Tensor, negatives: torch.Tensor | None, tokens: torch.Tensor,
                     group_size: int, *, mode: str) -> dict[str, float]:
    """The step's collapse signals from the whole (data-parallel-gathered) batch: ``main`` [G·K, H] pooled main
    rollouts (group-major), ``query`` [G, H] the query (supervised) or anchor rows, ``negatives`` [G, M, H] or None,
    ``tokens`` [G·K, W] the main rationales' tokens padded with -1."""
    groups = query.shape[0]
    main_n, query_n = F.normalize(main.float(), dim=-1), F.normalize(query.float(), dim=-1)
    group_of = torch.arange(groups, device=main.device).repeat_interleave(group_size)
    other_group = group_of[:, None] != group_of[None, :]  # [G·K, G·K]
    query_main = query_n @ main_n.T  # [G, G·K]
    own = query_main[group_of, torch.arange(main.shape[0], device=main.device)]  # cos(q_g, m_{g,k})
    if against_negatives(mode, 0 if negatives is None else negatives.shape[1]):
        against = torch.einsum("gh,gmh->gm", query_n, F.normalize(negatives.float(), dim=-1)).mean(-1)[group_of]
    else:  # the anchor against the other groups' texts
        other = (group_of[None, :] != torch.arange(groups, device=main.device)[:, None]).float()  # [G, G·K]
        against = ((query_main * other).sum(-1) / other.sum(-1).clamp_min(1))[group_of]
    cross = main_n @ main_n.T
    pairs = other_group.float()
    signals = {"margin_mean": float((own - against).mean()),
               "embedding_spread": float((cross * pairs).sum() / pairs.sum().clamp_min(1)),
               "embedding_effective_rank": effective_rank(main)}

    bigram_ids, valid = _bigrams(tokens)
    signals["distinct_2"] = float(torch.unique(bigram_ids[valid]).numel() / max(int(valid.sum()), 1))
    buckets = torch.remainder(bigram_ids * 2654435761, BIGRAM_BUCKETS)
    profile = torch.zeros(tokens.shape[0], BIGRAM_BUCKETS, device=tokens.device)
    profile.scatter_add_(1, torch.where(valid, buckets, 0), valid.float())
    profile = F.normalize(profile, dim=-1)
    similar = ((profile @ profile.T) >= NEAR_IDENTICAL_COSINE) & other_group & (profile.norm(dim=-1) > 0)[:, None]
    signals["near_identical_share"] = float(similar.any(-1).float().mean())
    return signals


def step_collapse_signals(embeddings, main_rollouts, width: int, group_size: int, *, mode: str) -> dict:
    """:func:`collapse_signals` of a step from its :class:`~.reward.GlobalEmbeddings` and this rank's main rollouts,
    whose tokens are gathered over data-parallel ranks (B·W integers)."""
    tokens = all_gather_data_parallel(response_tokens(main_rollouts, width, embeddings.main.device))
    return collapse_signals(embeddings.main, embeddings.query, embeddings.negatives, tokens, group_size, mode=mode)


def against_negatives(mode: str, num_negatives: int) -> bool:
    """Whether ``margin_mean`` subtracts the hard negatives' similarity (supervised rows that have them) rather than
    the other groups' texts; :func:`collapse_signals` computes and :func:`margin_description` names the same margin."""
    return mode == "supervised" and num_negatives > 0


def margin_description(mode: str, num_negatives: int) -> str:
    """What ``margin_mean`` compares in a run of this ``--train-mode`` and data (see :func:`collapse_signals`)."""
    if against_negatives(mode, num_negatives):
        return "cos(query, positive) - cos(query, negative)"
    return "cos(anchor, own rollouts) - cos(anchor, other groups' texts)"


def collapse_remedies(reward_variant: str, kl_coef: float, lr: float) -> str:
    """What the warning suggests, from the run's own settings: never the variant or KL weight it already uses (the
    collapse study's per-rollout run without a KL term collapsed for a while; with KL 0.04 it did not)."""
    remedies = []
    if reward_variant != "per-rollout":
        remedies.append("--reward-variant per-rollout (its negative and cross-group terms score each rationale)")
    remedies.append("--kl-coef 0.04 (a KL term to the initial policy)" if kl_coef == 0
                    else f"a larger --kl-coef than {kl_coef:g}")
    remedies.append(f"a lower --lr than {lr:g}")
    return "Try " + ", ".join(remedies[:-1]) + " or " + remedies[-1]


class CollapseAlarm:
    """Trips when, over the last ``window`` steps, the mean margin has fallen below the run's first ``window`` steps'
    and the mean cross-group cosine (``embedding_spread``) has risen by ``SPREAD_RISE`` or more: different texts
    becoming alike while the margin that separates positives from negatives shrinks. Warns (again every ``window``
    steps while tripped, naming the ``margin`` (:func:`margin_description`) and the ``remedies``
    (:func:`collapse_remedies`)) and, with ``--stop-on-collapse``, calls ``stop``."""

    def __init__(self, window: int, *, margin: str, remedies: str, stop=None, log=print):
        self.window, self.margin, self.remedies, self.stop, self.log = window, margin, remedies, stop, log
        self.baseline: list[tuple[float, float]] = []
        self.recent: deque[tuple[float, float]] = deque(maxlen=window)
        self.warned_at: int | None = None

    def update(self, step: int, metrics: dict) -> bool:
        point = (metrics["margin_mean"], metrics["embedding_spread"])
        if len(self.baseline) < self.window:
            self.baseline.append(point)
            return False
        self.recent.append(point)
        if len(self.recent) < self.window:
            return False
        base_margin, base_spread = (sum(values) / self.window for values in zip(*self.baseline))
        margin, spread = (sum(values) / self.window for values in zip(*self.recent))
        if not (margin < base_margin and spread >= base_spread + SPREAD_RISE):
            return False
        if self.warned_at is None or step - self.warned_at >= self.window:
            self.warned_at = step
            self.log(f"WARNING: rationale collapse at step {step}: over the last {self.window} steps the margin "
                     f"{self.margin} is {margin:.4f} (first {self.window} steps: {base_margin:.4f}) and "
                     f"texts of different groups have cosine {spread:.3f} (was {base_spread:.3f}): the rationales "
                     f"make every text look alike. {self.remedies}"
                     f"{'; stopping (--stop-on-collapse)' if self.stop else '; --stop-on-collapse stops the run'}")
        if self.stop is not None:
            self.stop()
        return True

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "recent": list(self.recent), "warned_at": self.warned_at}

    def load_state_dict(self, state: dict) -> None:
        self.baseline = [tuple(point) for point in state["baseline"]]
        self.recent = deque((tuple(point) for point in state["recent"]), maxlen=self.window)
        self.warned_at = state["warned_at"]
