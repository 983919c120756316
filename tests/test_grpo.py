"""GRPO objective pieces and sequence masks against values computed by hand."""
import math

import pytest
import torch

from megatron_grace.data.prompts import Prompt
from megatron_grace.grpo.experience import SequenceBatch
from megatron_grace.grpo.losses import (apply_length_penalty, group_advantages, low_var_kl,
                                 ppo_clipped_token_losses, vocab_parallel_entropy)
from megatron_grace.rollout import Rollout
from megatron_grace.kernels.sample_tokens import row_seed


def test_length_penalty_replaces_the_reward():
    rewards = torch.tensor([1.5, 2.0, -0.3])
    penalised = apply_length_penalty(rewards, torch.tensor([False, True, False]), -1.0)
    assert penalised.tolist() == [1.5, -1.0, pytest.approx(-0.3)]


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    assert group_advantages(rewards, 3).tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    # Unbiased std of (1, 2, 3) is 1; the constant group has std 0 and stays exactly 0 (no NaN).
    normalised = group_advantages(rewards, 3, norm_by_std=True, eps=1e-6)
    assert normalised.tolist() == pytest.approx([-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), 0.0, 0.0, 0.0])
    all_truncated = torch.full((8,), -1.0)
    assert group_advantages(all_truncated, 4, norm_by_std=True).tolist() == [0.0] * 8


def test_ppo_clipped_loss_with_dual_clip_by_hand():
    ratios = torch.tensor([1.5, 0.5, 1.5, 5.0, 0.5])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0])
    losses, clipped, dual = ppo_clipped_token_losses(torch.log(ratios), torch.zeros(5), advantages,
                                                     clip_low=0.2, clip_high=0.2, dual_clip_c=3.0)
    # A>0: max(-1.5, -1.2) = -1.2 (clipped); max(-0.5, -0.8) = -0.5.
    # A<0: max(1.5, 1.2) = 1.5; max(5, 1.2) = 5 capped at c·|A| = 3 (dual clip); max(0.5, 0.8) = 0.8 (clipped).
    assert losses.tolist() == pytest.approx([-1.2, -0.5, 1.5, 3.0, 0.8], abs=1e-6)
    assert clipped.tolist() == [True, False, False, False, True]  # as verl counts it: clipped term above unclipped
    assert dual.tolist() == [False, False, False, True, False]


def test_low_var_kl_by_hand():
    kl = low_var_kl(torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3])))
    # exp(log 0.5) - log 0.5 - 1 = 0.5 + 0.693147 - 1; equal distributions give 0.
    assert kl.tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0], abs=1e-6)


def test_vocab_parallel_entropy_matches_torch_at_tp1():
    from megatron_grace.platform import ParallelLayout, destroy_distributed, initialize_distributed

    initialize_distributed(ParallelLayout())
    try:
        logits = torch.randn(2, 3, 11, dtype=torch.float64)
        padded = torch.cat([logits, torch.full((2, 3, 5), float("-inf"), dtype=torch.float64)], dim=-1)
        expected = torch.distributions.Categorical(logits=logits).entropy()
        torch.testing.assert_close(vocab_parallel_entropy(padded).double(), expected, rtol=1e-5, atol=1e-5)
    finally:
        destroy_distributed()


def test_sequence_masks_by_hand():
    # Row 0: 4 prompt tokens (L_sys = 2) + 3 response tokens; row 1: 3 prompt tokens (L_sys = 1) + 1 token.
    prompts = [Prompt([10, 11, 12, 13], 2), Prompt([20, 21, 22], 1)]
    rollouts = [Rollout([30, 31, 2], [-1.0, -1.0, -1.0], False), Rollout([40], [-1.0], True)]
    batch = SequenceBatch.build(prompts, rollouts, pad_token_id=0, length_multiple=4)
    assert batch.tokens.tolist() == [[10, 11, 12, 13, 30, 31, 2, 0], [20, 21, 22, 40, 0, 0, 0, 0]]
    assert batch.pool_mask().int().tolist() == [[0, 0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0, 0]]
    # Targets are tokens[:, 1:]: the response tokens sit at target positions 3..5 and 2.
    assert batch.response_target_mask().int().tolist() == [[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0, 0]]
    micro = batch.microbatches(3)
    assert len(micro) == 1 and micro[0]["is_filler"].tolist() == [False, False, True]


def test_row_seeds_are_distinct_and_stable():
    seeds = {row_seed(1234, step, sample, k) for step in range(3) for sample in range(50) for k in range(10)}
    assert len(seeds) == 1500
    assert row_seed(1234, 0, 7, 3) == row_seed(1234, 0, 7, 3) < 2**63
