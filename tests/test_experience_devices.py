"""Experience metrics computed where the training tensors live: on a GPU the one-pass forward's log-probs are CUDA
tensors while the batch's masks are host tensors. The ``meta`` device stands in for CUDA on CPU: torch refuses to mix
it with CPU tensors in one operation, as it refuses CUDA and CPU.

``logprob_mismatch_sum`` against a hand computation on CPU, and on meta-device log-probs without a device error.
"""
import torch

from megatron_grace.grpo.experience import logprob_mismatch_sum
from megatron_grace.rollout import Rollout


def rows():
    rollouts = [Rollout([5, 6, 2], [-0.5, -1.0, -0.25], False), Rollout([7], [-2.0], True)]
    old = torch.tensor([[0.0, -0.75, -1.0, 0.0, 0.0], [0.0, 0.0, -1.5, 0.0, 0.0]])
    target_mask = torch.tensor([[False, True, True, True, False], [False, False, True, False, False]])
    old[0, 3] = -0.5
    return rollouts, old, target_mask


def test_mismatch_is_the_sum_of_absolute_differences_on_response_targets():
    rollouts, old, target_mask = rows()
    expected = abs(-0.5 + 0.75) + abs(-1.0 + 1.0) + abs(-0.25 + 0.5) + abs(-2.0 + 1.5)
    assert float(logprob_mismatch_sum(rollouts, old, target_mask)) == expected


def test_mismatch_is_computed_on_the_log_probs_device():
    rollouts, old, target_mask = rows()
    result = logprob_mismatch_sum(rollouts, old.to("meta"), target_mask)
    assert result.device.type == "meta" and result.shape == ()
