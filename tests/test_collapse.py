"""Rationale collapse (``megatron_grace/grpo/collapse.py``): the step's signals against float64 formulas written out
here, the alarm on constructed collapsing and healthy runs, and why the demo uses the per-rollout variant: a
text-independent rationale gets the lower advantage there, the higher one in the code variant (constructed batch)."""
import math

import numpy as np
import pytest
import torch

from megatron_grace.config import CheckpointConfig
from megatron_grace.grpo.collapse import (NEAR_IDENTICAL_COSINE, SPREAD_RISE, CollapseAlarm, collapse_remedies,
                                          collapse_signals, effective_rank, margin_description, response_tokens)
from megatron_grace.grpo.losses import group_advantages
from megatron_grace.kernels.grace_rewards import grace_rewards_reference
from megatron_grace.planned_exit import ExitReason, PlannedExit
from megatron_grace.rollout import Rollout

REMEDIES = collapse_remedies("code", 0.04, 2e-5)
MARGIN = margin_description("supervised", 1)


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def reference_margin_and_spread(main, query, negatives, group_size, mode):
    """Loops over rows in float64: the mean margin and the mean cosine between main rows of different groups."""
    main, query = main.double().numpy(), query.double().numpy()
    margins, cross = [], []
    for row, vector in enumerate(main):
        group = row // group_size
        if mode == "supervised":
            against = np.mean([cosine(query[group], negative) for negative in negatives[group].double().numpy()])
        else:
            against = np.mean([cosine(query[group], other) for index, other in enumerate(main)
                               if index // group_size != group])
        margins.append(cosine(query[group], vector) - against)
        cross += [cosine(vector, other) for index, other in enumerate(main) if index // group_size != group]
    return np.mean(margins), np.mean(cross)


@pytest.mark.parametrize("mode", ["supervised", "unsupervised"])
def test_margin_and_spread_match_the_formulas(mode):
    generator = torch.Generator().manual_seed(0)
    groups, group_size, hidden = 3, 4, 16
    main = torch.randn(groups * group_size, hidden, generator=generator)
    query = torch.randn(groups, hidden, generator=generator)
    negatives = torch.randn(groups, 2, hidden, generator=generator) if mode == "supervised" else None
    tokens = torch.full((groups * group_size, 4), -1)
    signals = collapse_signals(main, query, negatives, tokens, group_size, mode=mode)
    margin, spread = reference_margin_and_spread(main, query, negatives, group_size, mode)
    assert signals["margin_mean"] == pytest.approx(margin, abs=1e-6)
    assert signals["embedding_spread"] == pytest.approx(spread, abs=1e-6)


def test_effective_rank_counts_directions():
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0, rel=1e-9)
    assert effective_rank(torch.ones(6, 8) * torch.arange(1, 7)[:, None]) == pytest.approx(1.0, rel=1e-6)
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert effective_rank(two) == pytest.approx(2.0, rel=1e-9)


def test_distinct_bigrams_and_near_identical_rationales_by_hand():
    boilerplate = list(range(100, 140))  # the same 40-token rationale for texts of two different groups
    rollouts = [Rollout(boilerplate, [], False), Rollout([1, 2, 3], [], False),  # group 0
                Rollout(boilerplate, [], False), Rollout([1, 2, 4, 5], [], True)]  # group 1
    tokens = response_tokens(rollouts, 48, "cpu")
    assert tokens.shape == (4, 48) and tokens[1, 3:].eq(-1).all() and tokens[0, :40].tolist() == boilerplate
    embeddings = torch.eye(4)
    signals = collapse_signals(embeddings, torch.eye(4)[:2], None, tokens, 2, mode="unsupervised")
    # bigrams: 39 + 39 of the boilerplate (39 distinct), (1,2),(2,3) and (1,2),(2,4),(4,5): 43 distinct of 83
    assert signals["distinct_2"] == pytest.approx(43 / 83)
    # rows 0 and 2 are the same text-independent rationale in different groups; rows 1 and 3 share (1, 2) only
    assert signals["near_identical_share"] == pytest.approx(0.5)
    shared = 1 / math.sqrt(2 * 3)  # the bigram profiles of rows 1 and 3: one common bigram of 2 and 3
    assert shared < NEAR_IDENTICAL_COSINE
    same_group = collapse_signals(embeddings, torch.eye(4)[:1], None, tokens, 4, mode="unsupervised")
    assert same_group["near_identical_share"] == 0.0  # identical rationales of one text are not a collapse


def drifting_batch(step: int, collapse: bool, generator) -> dict:
    """Signals of a constructed batch at ``step``: 8 texts x 4 rollouts; collapsing, every embedding moves towards one
    shared direction (queries, positives and negatives alike); healthy, they stay on their text with fresh noise."""
    groups, group_size, hidden = 8, 4, 64
    texts = torch.randn(groups, hidden, generator=generator)
    shared = torch.ones(hidden)
    weight = min(step / 30, 1.0) * 3.0 if collapse else 0.0

    def noisy(base):
        return base + 0.3 * torch.randn(base.shape, generator=generator) + weight * shared

    main = noisy(texts.repeat_interleave(group_size, 0))
    query = noisy(texts)
    negatives = noisy(torch.randn(groups, 1, hidden, generator=generator))
    return collapse_signals(main, query, negatives, torch.full((groups * group_size, 2), -1), group_size,
                            mode="supervised")


@pytest.mark.parametrize("collapse", [True, False])
def test_alarm_trips_on_collapsing_embeddings_only(collapse):
    generator = torch.Generator().manual_seed(1)
    stops, lines = [], []
    alarm = CollapseAlarm(8, margin=MARGIN, remedies=REMEDIES, stop=lambda: stops.append(True), log=lines.append)
    tripped = [step for step in range(1, 41) if alarm.update(step, drifting_batch(step, collapse, generator))]
    if collapse:
        assert tripped and tripped[0] <= 24 and stops, tripped
        assert lines[0].startswith("WARNING: rationale collapse at step") and lines[0].endswith(
            f"look alike. {REMEDIES}; stopping (--stop-on-collapse)")
        assert "the margin cos(query, positive) - cos(query, negative) is" in lines[0]
        assert len(lines) <= len(tripped) // 8 + 1  # warned again only every window
    else:
        assert not tripped and not stops and not lines


def test_remedies_never_suggest_what_the_run_already_uses():
    assert collapse_remedies("code", 0.04, 2e-5) == (
        "Try --reward-variant per-rollout (its negative and cross-group terms score each rationale), "
        "a larger --kl-coef than 0.04 or a lower --lr than 2e-05")
    assert collapse_remedies("per-rollout", 0.0, 1e-6) == (
        "Try --kl-coef 0.04 (a KL term to the initial policy) or a lower --lr than 1e-06")


def test_margin_is_named_for_what_it_compares():
    """Without negatives (unsupervised mode, or supervised rows without one) the margin is the anchor's similarity to
    its own group against the other groups' texts (collapse_signals), and the warning must not call it q, pos, neg."""
    assert margin_description("supervised", 1) == "cos(query, positive) - cos(query, negative)"
    for mode, num_negatives in (("unsupervised", 0), ("supervised", 0)):
        assert margin_description(mode, num_negatives) == "cos(anchor, own rollouts) - cos(anchor, other groups' texts)"


def test_alarm_rule_and_state_round_trip():
    alarm = CollapseAlarm(2, margin=MARGIN, remedies=REMEDIES)
    for step, point in enumerate([(0.02, 0.80), (0.02, 0.80), (0.01, 0.80 + SPREAD_RISE / 2)], start=1):
        assert not alarm.update(step, {"margin_mean": point[0], "embedding_spread": point[1]})
    restored = CollapseAlarm(2, margin=MARGIN, remedies=REMEDIES, log=lambda line: None)
    restored.load_state_dict(alarm.state_dict())
    # margin fell, spread rose by the full SPREAD_RISE: trips (a rising spread alone, or a falling margin alone, not)
    assert restored.update(4, {"margin_mean": 0.01, "embedding_spread": 0.80 + 1.5 * SPREAD_RISE})
    alone = CollapseAlarm(1, margin=MARGIN, remedies=REMEDIES, log=lambda line: None)
    alone.update(1, {"margin_mean": 0.02, "embedding_spread": 0.8})
    assert not alone.update(2, {"margin_mean": 0.03, "embedding_spread": 0.9})
    assert not alone.update(3, {"margin_mean": 0.00, "embedding_spread": 0.8})


def test_stop_on_collapse_is_a_planned_exit(tmp_path):
    planned = PlannedExit(CheckpointConfig(save=str(tmp_path), stop_on_collapse=True), started=0.0, first_iteration=0)
    alarm = CollapseAlarm(1, margin=MARGIN, remedies=REMEDIES, stop=planned.request_on_collapse, log=lambda line: None)
    alarm.update(1, {"margin_mean": 0.05, "embedding_spread": 0.5})
    assert planned._local_request(1) is ExitReason.NONE
    alarm.update(2, {"margin_mean": 0.0, "embedding_spread": 0.9})
    assert planned._local_request(2) is ExitReason.COLLAPSE
    assert planned.describe(ExitReason.COLLAPSE) == "the rationale collapse alarm (--stop-on-collapse)"


def test_per_rollout_variant_ranks_a_text_independent_rationale_below_a_text_specific_one():
    """Three texts; each query (with its rationale) already leans towards a shared direction c. Rollout 0 of each
    group is about its text (e_g + 0.3c), rollout 1 is the shared boilerplate (c), closer to the query than rollout 0
    but just as close to the negative and to the other groups' queries."""
    groups, hidden = 3, 7
    basis, shared = torch.eye(hidden, dtype=torch.float64), torch.eye(hidden, dtype=torch.float64)[6]
    query = torch.stack([basis[g] + 2 * shared for g in range(groups)])
    negative = torch.stack([basis[3 + g] + 2 * shared for g in range(groups)])
    main = torch.stack([row for g in range(groups) for row in (basis[g] + 0.3 * shared, shared)])
    advantages = {}
    for variant in ("per-rollout", "code"):
        rewards = grace_rewards_reference(main, query, negative[:, None] if variant == "per-rollout" else negative,
                                          group_size=2, mode="supervised", variant=variant, temperature=0.1,
                                          clustering_weight=0.2, cross_group_weight=0.2)
        advantages[variant] = group_advantages(rewards["total"], 2).view(groups, 2)
    specific, boilerplate = advantages["per-rollout"].unbind(-1)
    assert (specific > boilerplate).all(), advantages["per-rollout"]
    # The failure the alarm watches for: in the code variant the boilerplate wins (its higher cos(q, pos) is all
    # that reaches the advantage; the negative and cross-group terms are the same for both rollouts of a group).
    specific, boilerplate = advantages["code"].unbind(-1)
    assert (boilerplate > specific).all(), advantages["code"]
