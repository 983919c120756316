"""grace_rewards: hand-computed values for every mode and variant, and the Triton kernel (interpreter on CPU) and
torch path against a float64 reference."""
import os
from pathlib import Path

if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run in the interpreter

import math

import pytest
import torch

from megatron_grace.kernels import grace_rewards, grace_rewards_reference
from megatron_grace.kernels.grace_rewards import REWARD_TERMS, grace_rewards_triton
from megatron_grace.kernels._triton import use_triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
needs_triton = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1 set before triton is imported")


def torch_path(main, query, negative=None, **kwargs):
    """What the dispatcher runs off CUDA without the interpreter: the reference on fp32 upcasts."""
    return grace_rewards_reference(main.float(), query.float(), None if negative is None else negative.float(),
                                   **kwargs)


# The spec's settings (docs/algorithm.md): supervised, code variant, tau 0.1, lambda1 = lambda2 = 0.2.
PAPER_SETTINGS = dict(mode="supervised", variant="code", temperature=0.1, clustering_weight=0.2, cross_group_weight=0.2)

IMPLEMENTATIONS = [pytest.param(grace_rewards_triton, id="triton", marks=needs_triton),
                   pytest.param(torch_path, id="torch")]

# ----------------------------------------------------------------------------------------------------------------
# Hand-computed example: G = 2 groups, K = 2 rollouts, 2-D vectors (deliberately not unit length) at angles
# whose cosines are obvious. r = cos 45 deg.
#   group 0: m00 = (2, 0) at 0 deg,  m01 = (1, 1) at 45 deg;   query q0 = (1, 0) at 0 deg
#   group 1: m10 = (0, 3) at 90 deg, m11 = (-1, 0) at 180 deg; query q1 = (0, 0.5) at 90 deg
#   one negative per group: n0 = (-1, 0) at 180 deg, n1 = (1, 0) at 0 deg
#   paper variant, two negatives per group: n0 = {180 deg, (1, 1) at 45 deg}, n1 = {0 deg, (0, -2) at 270 deg}
# Shared terms (tau = 0.1, lambda1 = lambda2 = 0.2, so total = 10 * (...) with weights 2):
#   pos   = cos(q_g, m_gk)            = [1, r, 1, 0]
#   clust = cos(m_g0, m_g1)           = [r, r, 0, 0]
#   supervised cross = -max_l cos(q_g, m_{other group, l}):
#     g0: -max(cos(0, 90), cos(0, 180)) = -max(0, -1) = 0;   g1: -max(cos(90, 0), cos(90, 45)) = -r
# ----------------------------------------------------------------------------------------------------------------
R = math.sqrt(0.5)
MAIN = [[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [-1.0, 0.0]]
QUERY = [[1.0, 0.0], [0.0, 0.5]]
ONE_NEGATIVE = [[-1.0, 0.0], [1.0, 0.0]]
TWO_NEGATIVES = [[[-1.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, -2.0]]]
POS = [1, R, 1, 0]
CLUST = [R, R, 0, 0]
SUPERVISED_CROSS = [0, 0, -R, -R]
HAND_CASES = {
    # neg = -cos(q_g, n_g): g0 -cos(0, 180) = 1, g1 -cos(90, 0) = 0; total = 10 (pos + neg) + 2 clust + 2 cross.
    ("supervised", "code"): dict(
        negative=ONE_NEGATIVE, pos=POS, neg=[1, 1, 0, 0], clust=CLUST, cross=SUPERVISED_CROSS,
        total=[20 + 2 * R, 10 + 12 * R, 10 - 2 * R, -2 * R]),
    # neg = -sum_m cos(q_g, n_gm): g0 -(-1 + r) = 1 - r, g1 -(0 + cos(90, 270)) = 1.
    ("supervised", "paper"): dict(
        negative=TWO_NEGATIVES, pos=POS, neg=[1 - R, 1 - R, 1, 1], clust=CLUST, cross=SUPERVISED_CROSS,
        total=[20 - 8 * R, 10 + 2 * R, 20 - 2 * R, 10 - 2 * R]),
    # cross = cos(m_gk, anchor of the other group): cos(0, 90) = 0, cos(45, 90) = r, cos(90, 0) = 0,
    # cos(180, 0) = -1; total = 10 pos + 2 clust - 2 cross.
    ("unsupervised", "code"): dict(
        negative=None, pos=POS, neg=[0, 0, 0, 0], clust=CLUST, cross=[0, R, 0, -1],
        total=[10 + 2 * R, 10 * R, 10, 2]),
    # The supervised cross term with the anchors as queries; total = 10 pos + 2 clust + 2 cross.
    ("unsupervised", "paper"): dict(
        negative=None, pos=POS, neg=[0, 0, 0, 0], clust=CLUST, cross=SUPERVISED_CROSS,
        total=[10 + 2 * R, 12 * R, 10 - 2 * R, -2 * R]),
    # neg = -mean_m cos(m_gk, n_gm): m00 (0) vs {180, 45}: -(-1 + r)/2; m01 (45) vs {180, 45}: -(-r + 1)/2;
    # m10 (90) vs {0, 270}: -(0 - 1)/2; m11 (180) vs {0, 270}: -(-1 + 0)/2.
    # cross = -cos(m_gk, q of the other group): -cos(0, 90) = 0, -cos(45, 90) = -r, -cos(90, 0) = 0, -cos(180, 0) = 1.
    # total = 10 (pos + neg) + 2 clust + 2 cross.
    ("supervised", "per-rollout"): dict(
        negative=TWO_NEGATIVES, pos=POS, neg=[(1 - R) / 2, (R - 1) / 2, 0.5, 0.5], clust=CLUST, cross=[0, -R, 0, 1],
        total=[15 - 3 * R, 15 * R - 5, 15, 7]),
    # No negatives, and the code variant's cross term is already per rollout: the unsupervised code values.
    ("unsupervised", "per-rollout"): dict(
        negative=None, pos=POS, neg=[0, 0, 0, 0], clust=CLUST, cross=[0, R, 0, -1],
        total=[10 + 2 * R, 10 * R, 10, 2]),
}


def as_tensor(values):
    return None if values is None else torch.tensor(values, device=DEVICE)


@pytest.mark.parametrize("rewards", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode,variant", list(HAND_CASES), ids=[f"{m}-{v}" for m, v in HAND_CASES])
def test_hand_computed_example(rewards, mode, variant):
    case = HAND_CASES[(mode, variant)]
    terms = rewards(as_tensor(MAIN), as_tensor(QUERY), as_tensor(case["negative"]), group_size=2, mode=mode,
                    variant=variant, temperature=0.1, clustering_weight=0.2, cross_group_weight=0.2)
    for name in REWARD_TERMS:
        assert terms[name].dtype == torch.float32 and terms[name].shape == (4,)
        torch.testing.assert_close(terms[name], as_tensor(case[name]).float(), atol=1e-5, rtol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Random inputs against float64.
# ----------------------------------------------------------------------------------------------------------------
def random_inputs(num_groups, group_size, num_negatives, hidden_size, dtype, seed=0):
    """Embeddings correlated within a group (a shared group direction plus noise), like real rollouts."""
    generator = torch.Generator().manual_seed(seed)
    group_direction = torch.randn(num_groups, 1, hidden_size, generator=generator)
    main = group_direction + 0.7 * torch.randn(num_groups, group_size, hidden_size, generator=generator)
    query = group_direction[:, 0] + 0.7 * torch.randn(num_groups, hidden_size, generator=generator)
    negative = None
    if num_negatives:
        negative = 0.5 * group_direction + torch.randn(num_groups, num_negatives, hidden_size, generator=generator)
        negative = negative[:, 0] if num_negatives == 1 else negative

    def place(tensor):
        return None if tensor is None else (3.0 * tensor).to(dtype).to(DEVICE)  # norms far from 1

    return place(main.flatten(0, 1)), place(query), place(negative)


# (G, K, H): G = 1, K = 1, H below and above the block, and group sizes that are not powers of two.
SHAPES = [(1, 4, 19), (4, 1, 33), (3, 5, 37), (5, 3, 600)]
MODES = [("supervised", "code", 1), ("supervised", "paper", 3), ("supervised", "per-rollout", 1),
         ("supervised", "per-rollout", 3), ("unsupervised", "code", 0), ("unsupervised", "paper", 0),
         ("unsupervised", "per-rollout", 0)]


@pytest.mark.parametrize("rewards", IMPLEMENTATIONS)
@pytest.mark.parametrize("num_groups,group_size,hidden_size", SHAPES)
@pytest.mark.parametrize("mode,variant,num_negatives", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_float64_reference(rewards, num_groups, group_size, hidden_size, mode, variant, num_negatives,
                                   dtype):
    main, query, negative = random_inputs(num_groups, group_size, num_negatives, hidden_size, dtype)
    options = dict(group_size=group_size, mode=mode, variant=variant, temperature=0.1, clustering_weight=0.2,
                   cross_group_weight=0.2)
    terms = rewards(main, query, negative, **options)
    exact = grace_rewards_reference(main.double(), query.double(), None if negative is None else negative.double(),
                                    **options)
    eager = grace_rewards_reference(main, query, negative, **options)
    for name in REWARD_TERMS:
        result = terms[name]
        assert result.dtype == torch.float32 and result.shape == (num_groups * group_size,)
        assert torch.isfinite(result).all()
        error = (result.double() - exact[name]).abs().max().item()
        eager_error = (eager[name].double() - exact[name]).abs().max().item()
        assert error <= 2 * eager_error + 1e-5, f"{name}: error {error:.3g} vs torch eager {eager_error:.3g}"
    if group_size == 1:
        assert not terms["clust"].any()
    if num_groups == 1:
        assert not terms["cross"].any()
    if mode == "unsupervised":
        assert not terms["neg"].any()


def test_dispatcher_picks_triton_under_interpreter_or_cuda_else_torch():
    main, query, negative = random_inputs(3, 4, 1, 21, torch.bfloat16)
    expected_path = grace_rewards_triton if use_triton(main) else torch_path
    assert use_triton(main) == (main.is_cuda or INTERPRETED)
    result = grace_rewards(main, query, negative, group_size=4, **PAPER_SETTINGS)
    expected = expected_path(main, query, negative, group_size=4, **PAPER_SETTINGS)
    assert all(torch.equal(result[name], expected[name]) for name in REWARD_TERMS)


@pytest.mark.parametrize("mode,variant,negative_shape,message", [
    ("supervised", "code", None, "needs the negative"),
    ("supervised", "code", (2, 3, 8), "code variant takes one negative"),
    ("unsupervised", "code", (2, 8), "no negative stream"),
    ("supervised", "paper", (3, 8), "negative must be"),
    ("semi", "code", (2, 8), "mode must be"),
    ("supervised", "mixed", (2, 8), "variant must be"),
])
def test_invalid_arguments_raise(mode, variant, negative_shape, message):
    main, query = torch.randn(6, 8), torch.randn(2, 8)
    negative = None if negative_shape is None else torch.randn(negative_shape)
    with pytest.raises(ValueError, match=message):
        grace_rewards(main, query, negative, group_size=3, mode=mode, variant=variant, temperature=0.1,
                      clustering_weight=0.2, cross_group_weight=0.2)


def test_rows_must_be_groups_times_group_size():
    with pytest.raises(ValueError, match=r"expected G\*K = 2\*4"):
        grace_rewards(torch.randn(6, 8), torch.randn(2, 8), torch.randn(2, 8), group_size=4, **PAPER_SETTINGS)


# ----------------------------------------------------------------------------------------------------------------
# Each term's share of the advantage variance (megatron_grace.grpo.reward.advantage_variance_sums).
# ----------------------------------------------------------------------------------------------------------------
def shares_by_hand(terms, truncated, group_size, weights, penalty):
    """cov(centred contribution, advantage) / var(advantage) with explicit loops in float64; a truncated row's
    replacement by the penalty is the ``length`` contribution."""
    rows = len(truncated)
    contributions = {name: [weights[name] * float(terms[name][i]) for i in range(rows)] for name in weights}
    contributions["length"] = [penalty - sum(contributions[name][i] for name in weights) if truncated[i] else 0.0
                               for i in range(rows)]
    centred = {}
    for name, values in contributions.items():
        centred[name] = []
        for start in range(0, rows, group_size):
            group = values[start: start + group_size]
            centred[name] += [v - sum(group) / group_size for v in group]
    advantage = [sum(centred[name][i] for name in centred) for i in range(rows)]
    variance = sum(a * a for a in advantage)
    return {name: sum(c * a for c, a in zip(values, advantage)) / variance for name, values in centred.items()}


@pytest.mark.parametrize("variant", ["code", "per-rollout"])
def test_advantage_shares_add_up_and_show_the_cancellation(variant):
    from megatron_grace.kernels.grace_rewards import term_weights
    from megatron_grace.config import ObjectiveConfig
    from megatron_grace.grpo.reward import ADVANTAGE_SHARE_TERMS, advantage_variance_sums

    num_groups, group_size = 3, 4
    main, query, negative = random_inputs(num_groups, group_size, 3, 16, torch.float64)
    if variant == "code":
        negative = negative[:, 0]
    terms = torch_path(main, query, negative, group_size=group_size, **{**PAPER_SETTINGS, "variant": variant})
    # On the terms' device: the check below mixes it with them (a CPU mask against CUDA terms failed on the GPU).
    truncated = torch.tensor([False, True, False, False, False, False, True, False, False, False, False, False],
                             device=DEVICE)
    objective = ObjectiveConfig(reward_variant=variant, length_penalty=-1.0)
    sums = advantage_variance_sums(terms, truncated, group_size, objective, mode="supervised")
    shares = {name: sums[f"advantage_cov_{name}_sum"] / sums["advantage_var_sum"] for name in ADVANTAGE_SHARE_TERMS}
    weights = term_weights("supervised", variant, 0.1, 0.2, 0.2)
    expected = shares_by_hand(terms, truncated.tolist(), group_size, weights, -1.0)
    assert shares == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert sum(shares.values()) == pytest.approx(1.0, rel=1e-12)
    if variant == "code":  # constant within a group: cancelled by the group-mean baseline, truncation or not
        assert abs(shares["neg"]) < 1e-12 and abs(shares["cross"]) < 1e-12
    else:
        assert abs(shares["neg"]) > 1e-3 and abs(shares["cross"]) > 1e-3
    # The contributions add up to the reward the advantage is computed from.
    rewards = torch.where(truncated, -1.0, terms["total"].double())
    centred = rewards.view(-1, group_size) - rewards.view(-1, group_size).mean(dim=1, keepdim=True)
    assert float((centred ** 2).sum()) == pytest.approx(sums["advantage_var_sum"], rel=1e-6)
