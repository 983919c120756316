"""GRACE rewards from pooled embeddings: one fused cosine-similarity pass, with a Triton kernel and its torch reference.

Notation (docs/algorithm.md): G groups of K rollouts; m_{g,k} = main[g*K + k]; q_g = query[g] (the anchor in
unsupervised mode); n_{g,m} = negative[g, m]; cos = cosine similarity; tau = temperature; l1 = clustering_weight;
l2 = cross_group_weight. Each returned term is per rollout (float32 [G*K]) and defined as in the spec:

    pos(g,k)   = cos(q_g, m_{g,k})
    neg(g)     = -sum_m cos(q_g, n_{g,m})             supervised code (exactly one negative) and paper
    neg(g,k)   = -mean_m cos(m_{g,k}, n_{g,m})        supervised per-rollout
    clust(g,k) = mean_{j != k} cos(m_{g,k}, m_{g,j})   0 when K = 1
    cross      = -mean_{g' != g} max_l cos(q_g, m_{g',l})   supervised code and paper, unsupervised paper
               = -mean_{g' != g} cos(m_{g,k}, q_{g'})       supervised per-rollout
               = +mean_{g' != g} cos(m_{g,k}, q_{g'})       unsupervised code (subtracted in the total)
                 0 when G = 1
    total      = (pos + neg + l1 * clust + l2 * cross) / tau,   except unsupervised code: (pos + l1 * clust - l2 * cross) / tau

In supervised code and paper variants neg and cross depend on the group only, so GRPO's group-mean baseline cancels
them: only pos, clust and the length penalty reach the advantage. The per-rollout variant measures both against each
rollout, so they do too. Unsupervised per-rollout is the unsupervised code variant (its cross term already is per
rollout, and there are no negatives).

The length penalty is the caller's (it replaces the total of truncated responses).

Dispatch as masked_mean_pool: Triton on CUDA or under the interpreter, torch reference otherwise.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton import TRITON_INTERPRETED, use_triton
from .masked_mean_pool import NORM_EPS

REWARD_TERMS = ("total", "pos", "neg", "clust", "cross")
MODES = ("supervised", "unsupervised")
VARIANTS = ("code", "paper", "per-rollout")


def _check_inputs(main, query, negative, group_size, mode, variant):
    """Validate shapes and options; returns (G, K, negatives as [G, M, H] or None)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if main.dim() != 2 or query.dim() != 2 or main.shape[1] != query.shape[1]:
        raise ValueError(f"main must be [G*K, H] and query [G, H], got {tuple(main.shape)} and {tuple(query.shape)}")
    num_groups = query.shape[0]
    if group_size < 1 or main.shape[0] != num_groups * group_size:
        raise ValueError(f"main has {main.shape[0]} rows; expected G*K = {num_groups}*{group_size} (group-major)")
    if mode == "unsupervised":
        if negative is not None:
            raise ValueError("unsupervised mode has no negative stream: pass negative=None")
        return num_groups, group_size, None
    if negative is None:
        raise ValueError("supervised mode needs the negative embeddings")
    if negative.dim() == 2:
        negative = negative[:, None, :]
    elif variant == "code":
        raise ValueError(f"the code variant takes one negative per query ([G, H]), got {tuple(negative.shape)}; "
                         f"several negatives per query ([G, M, H]) are the paper variant")
    if negative.dim() != 3 or negative.shape[0] != num_groups or negative.shape[2] != main.shape[1]:
        raise ValueError(f"negative must be [G, H] or [G, M, H] with G = {num_groups}, H = {main.shape[1]}, "
                         f"got {tuple(negative.shape)}")
    return num_groups, group_size, negative


def effective_variant(mode, variant):
    """Unsupervised per-rollout is the unsupervised code variant."""
    return "code" if (mode, variant) == ("unsupervised", "per-rollout") else variant


def _subtracts_cross(mode, variant):
    """Only the unsupervised code variant defines cross as a positive similarity that the total subtracts."""
    return mode == "unsupervised" and variant == "code"


def term_weights(mode, variant, temperature, clustering_weight, cross_group_weight) -> dict[str, float]:
    """total = sum over terms of weight * term (before the length penalty), as the kernel and reference compute it."""
    variant = effective_variant(mode, variant)
    cross_sign = -1.0 if _subtracts_cross(mode, variant) else 1.0
    return {"pos": 1.0 / temperature, "neg": 1.0 / temperature, "clust": clustering_weight / temperature,
            "cross": cross_sign * cross_group_weight / temperature}


# ----------------------------------------------------------------------------------------------------------------
# Torch reference
# ----------------------------------------------------------------------------------------------------------------
def grace_rewards_reference(main, query, negative=None, *, group_size, mode, variant, temperature, clustering_weight,
                            cross_group_weight):
    """Plain torch GRACE rewards, computed in the inputs' dtype (float64 in the tests; the dispatcher upcasts to
    fp32). Arguments and result as :func:`grace_rewards`."""
    variant = effective_variant(mode, variant)
    num_groups, group_size, negative = _check_inputs(main, query, negative, group_size, mode, variant)
    hidden_size = main.shape[1]
    rollouts = F.normalize(main, dim=-1, eps=NORM_EPS).view(num_groups, group_size, hidden_size)
    queries = F.normalize(query, dim=-1, eps=NORM_EPS)
    # cos(q_g, m_{g',l}) for every query against every rollout: pos, and both kinds of cross term.
    query_rollout = torch.einsum("gh,plh->gpl", queries, rollouts)
    # cos(m_{g,k}, m_{g,j}) within each group.
    rollout_rollout = torch.einsum("gkh,gjh->gkj", rollouts, rollouts)
    other_group = ~torch.eye(num_groups, dtype=torch.bool, device=main.device)
    zeros = main.new_zeros(num_groups, group_size)

    pos = query_rollout.diagonal(dim1=0, dim2=1).T
    clust = zeros if group_size == 1 else \
        (rollout_rollout.sum(-1) - rollout_rollout.diagonal(dim1=1, dim2=2)) / (group_size - 1)
    if num_groups == 1:
        cross = zeros
    elif _subtracts_cross(mode, variant) or variant == "per-rollout":
        # [g, k, g'] = cos(m_{g,k}, q_{g'}); a similarity the unsupervised code variant subtracts, a penalty here
        rollout_query = query_rollout.permute(1, 2, 0)
        cross = (rollout_query * other_group[:, None, :]).sum(-1) / (num_groups - 1)
        cross = cross if _subtracts_cross(mode, variant) else -cross
    else:
        best_rollout = query_rollout.amax(dim=-1)  # [g, g'] = max_l cos(q_g, m_{g',l})
        cross = (-(best_rollout * other_group).sum(-1) / (num_groups - 1))[:, None].expand_as(zeros)
    if negative is None:
        neg = zeros
    else:
        negatives = F.normalize(negative, dim=-1, eps=NORM_EPS)
        if variant == "per-rollout":
            neg = -torch.einsum("gkh,gmh->gkm", rollouts, negatives).mean(-1)
        else:
            neg = (-torch.einsum("gh,gmh->g", queries, negatives))[:, None].expand_as(zeros)

    cross_sign = -1.0 if _subtracts_cross(mode, variant) else 1.0
    total = (pos + neg + clustering_weight * clust + cross_sign * cross_group_weight * cross) / temperature
    terms = dict(total=total, pos=pos, neg=neg, clust=clust, cross=cross)
    return {name: terms[name].reshape(-1) for name in REWARD_TERMS}


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _grace_rewards_kernel(main_ptr, query_ptr, negative_ptr,
                          total_ptr, pos_ptr, neg_ptr, clust_ptr, cross_ptr,
                          num_groups, group_size, num_negatives, hidden_size,
                          stride_main, stride_query, stride_negative,
                          clust_scale, cross_scale, negative_scale, stored_cross_sign,
                          inv_temperature, clustering_weight, cross_group_weight, eps,
                          HAS_NEGATIVES: tl.constexpr, NEG_PER_ROLLOUT: tl.constexpr,
                          CROSS_IS_MAX_OVER_GROUPS: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_H: tl.constexpr):
    """One program per group g. Dot products and squared norms accumulate over H in fp32; cosines are formed once
    the full dot products are known, then reduced under masks (same group / other groups / valid rows).
    Rows must be contiguous in H (the wrapper ensures it)."""
    group = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    gs = tl.arange(0, BLOCK_G)
    ms = tl.arange(0, BLOCK_M)
    k_valid = ks < group_size
    g_valid = gs < num_groups
    m_valid = ms < num_negatives
    own_rows = (group * group_size + ks).to(tl.int64)
    query_row = group.to(tl.int64) * stride_query
    negative_rows = (group * num_negatives + ms).to(tl.int64)

    rollout_dot = tl.zeros([BLOCK_K, BLOCK_K], dtype=tl.float32)      # m_{g,k} . m_{g,j}
    rollout_query_dot = tl.zeros([BLOCK_K, BLOCK_G], dtype=tl.float32)  # m_{g,k} . q_{g'}
    query_sq = tl.zeros([BLOCK_G], dtype=tl.float32)
    negative_dot = tl.zeros([BLOCK_M], dtype=tl.float32)                # q_g . n_{g,m}
    rollout_negative_dot = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)  # m_{g,k} . n_{g,m} (per-rollout)
    negative_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for col_start in range(0, hidden_size, BLOCK_H):
        cols = col_start + tl.arange(0, BLOCK_H)
        col_valid = cols < hidden_size
        rollouts = tl.load(main_ptr + own_rows[:, None] * stride_main + cols[None, :],
                           mask=k_valid[:, None] & col_valid[None, :], other=0.0).to(tl.float32)
        queries = tl.load(query_ptr + gs[:, None].to(tl.int64) * stride_query + cols[None, :],
                          mask=g_valid[:, None] & col_valid[None, :], other=0.0).to(tl.float32)
        rollout_dot += tl.sum(rollouts[:, None, :] * rollouts[None, :, :], axis=2)
        rollout_query_dot += tl.sum(rollouts[:, None, :] * queries[None, :, :], axis=2)
        query_sq += tl.sum(queries * queries, axis=1)
        if HAS_NEGATIVES:
            own_query = tl.load(query_ptr + query_row + cols, mask=col_valid, other=0.0).to(tl.float32)
            negatives = tl.load(negative_ptr + negative_rows[:, None] * stride_negative + cols[None, :],
                                mask=m_valid[:, None] & col_valid[None, :], other=0.0).to(tl.float32)
            negative_dot += tl.sum(negatives * own_query[None, :], axis=1)
            negative_sq += tl.sum(negatives * negatives, axis=1)
            if NEG_PER_ROLLOUT:
                rollout_negative_dot += tl.sum(rollouts[:, None, :] * negatives[None, :, :], axis=2)

    # Norms clamped like F.normalize. The rollout norms are the diagonal of the within-group Gram matrix.
    same_rollout = ks[:, None] == ks[None, :]
    rollout_norm = tl.maximum(tl.sqrt(tl.sum(tl.where(same_rollout, rollout_dot, 0.0), axis=1)), eps)
    query_norm = tl.maximum(tl.sqrt(query_sq), eps)
    own_query_norm = tl.sum(tl.where(gs == group, query_norm, 0.0), axis=0)
    rollout_cos = rollout_dot / (rollout_norm[:, None] * rollout_norm[None, :])
    rollout_query_cos = rollout_query_dot / (rollout_norm[:, None] * query_norm[None, :])

    own_group = gs[None, :] == group
    other_group = (gs != group) & g_valid
    pos = tl.sum(tl.where(own_group, rollout_query_cos, 0.0), axis=1)
    clust = tl.sum(tl.where(~same_rollout & k_valid[None, :], rollout_cos, 0.0), axis=1) * clust_scale
    if HAS_NEGATIVES:
        negative_norm = tl.maximum(tl.sqrt(negative_sq), eps)
        if NEG_PER_ROLLOUT:
            rollout_negative_cos = rollout_negative_dot / (rollout_norm[:, None] * negative_norm[None, :])
            neg = -tl.sum(tl.where(m_valid[None, :], rollout_negative_cos, 0.0), axis=1) * negative_scale
        else:
            negative_cos = negative_dot / (negative_norm * own_query_norm)
            neg = tl.zeros([BLOCK_K], dtype=tl.float32) - tl.sum(tl.where(m_valid, negative_cos, 0.0), axis=0)
    else:
        neg = tl.zeros([BLOCK_K], dtype=tl.float32)

    if CROSS_IS_MAX_OVER_GROUPS:
        # -mean_{g' != g} max_l cos(q_g, m_{g',l}): rollout l of every group at a time, running max over l.
        best_cos = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        for rollout in range(0, group_size):
            other_rows = (gs * group_size + rollout).to(tl.int64)
            dot = tl.zeros([BLOCK_G], dtype=tl.float32)
            sq = tl.zeros([BLOCK_G], dtype=tl.float32)
            for col_start in range(0, hidden_size, BLOCK_H):
                cols = col_start + tl.arange(0, BLOCK_H)
                col_valid = cols < hidden_size
                own_query = tl.load(query_ptr + query_row + cols, mask=col_valid, other=0.0).to(tl.float32)
                others = tl.load(main_ptr + other_rows[:, None] * stride_main + cols[None, :],
                                 mask=g_valid[:, None] & col_valid[None, :], other=0.0).to(tl.float32)
                dot += tl.sum(others * own_query[None, :], axis=1)
                sq += tl.sum(others * others, axis=1)
            best_cos = tl.maximum(best_cos, dot / (tl.maximum(tl.sqrt(sq), eps) * own_query_norm))
        cross_group = -tl.sum(tl.where(other_group, best_cos, 0.0), axis=0) * cross_scale
        cross = tl.zeros([BLOCK_K], dtype=tl.float32) + cross_group
        total = (pos + neg + clustering_weight * clust + cross_group_weight * cross) * inv_temperature
    else:
        # mean_{g' != g} cos(m_{g,k}, q_{g'}), which lowers the total in both variants that use it; stored as the
        # similarity (unsupervised code) or as the penalty (per-rollout).
        mean_cross = tl.sum(tl.where(other_group[None, :], rollout_query_cos, 0.0), axis=1) * cross_scale
        cross = stored_cross_sign * mean_cross
        total = (pos + neg + clustering_weight * clust - cross_group_weight * mean_cross) * inv_temperature

    tl.store(total_ptr + own_rows, total, mask=k_valid)
    tl.store(pos_ptr + own_rows, pos, mask=k_valid)
    tl.store(neg_ptr + own_rows, neg, mask=k_valid)
    tl.store(clust_ptr + own_rows, clust, mask=k_valid)
    tl.store(cross_ptr + own_rows, cross, mask=k_valid)


def grace_rewards_triton(main, query, negative=None, *, group_size, mode, variant, temperature, clustering_weight,
                         cross_group_weight):
    """The Triton path of :func:`grace_rewards`, whatever the device (tests call it directly)."""
    variant = effective_variant(mode, variant)
    num_groups, group_size, negative = _check_inputs(main, query, negative, group_size, mode, variant)
    hidden_size = main.shape[1]
    main, query = main.contiguous(), query.contiguous()
    num_negatives = 0 if negative is None else negative.shape[1]
    # A dummy pointer when there are no negatives; the kernel never reads it (HAS_NEGATIVES is False).
    negatives = main if negative is None else negative.reshape(num_groups * num_negatives, hidden_size).contiguous()
    terms = {name: torch.empty(num_groups * group_size, dtype=torch.float32, device=main.device)
             for name in REWARD_TERMS}
    # Block over H: the interpreter pays per loop iteration, a GPU per register (the tiles are 3-D broadcasts).
    block_h = min(triton.next_power_of_2(hidden_size), 512 if TRITON_INTERPRETED else 32)
    _grace_rewards_kernel[(num_groups,)](
        main, query, negatives, terms["total"], terms["pos"], terms["neg"], terms["clust"], terms["cross"],
        num_groups, group_size, num_negatives, hidden_size, main.stride(0), query.stride(0), negatives.stride(0),
        1.0 / (group_size - 1) if group_size > 1 else 0.0, 1.0 / (num_groups - 1) if num_groups > 1 else 0.0,
        1.0 / max(num_negatives, 1), 1.0 if _subtracts_cross(mode, variant) else -1.0,
        1.0 / temperature, clustering_weight, cross_group_weight, NORM_EPS,
        HAS_NEGATIVES=negative is not None, NEG_PER_ROLLOUT=variant == "per-rollout",
        CROSS_IS_MAX_OVER_GROUPS=not (_subtracts_cross(mode, variant) or variant == "per-rollout"),
        BLOCK_K=triton.next_power_of_2(group_size), BLOCK_G=triton.next_power_of_2(num_groups),
        BLOCK_M=triton.next_power_of_2(max(num_negatives, 1)), BLOCK_H=block_h)
    return terms


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def grace_rewards(main, query, negative=None, *, group_size, mode, variant, temperature, clustering_weight,
                  cross_group_weight):
    """GRACE rewards for G groups of K rollouts, all terms from one similarity pass, no host synchronisation.

    Args:
        main: [G*K, H] pooled rollout embeddings, group-major (rows g*K ... g*K+K-1 are group g).
        query: [G, H] query embeddings (supervised) or anchor embeddings (unsupervised).
        negative: [G, H] hard negatives (supervised), or [G, M, H] for the paper and per-rollout variants; None when
            unsupervised.
        group_size: K, rollouts per group.
        mode: "supervised" or "unsupervised". variant: "code", "paper" or "per-rollout" (module docstring).
        temperature, clustering_weight, cross_group_weight: tau, lambda1, lambda2.
    Inputs need not be normalised and may be fp32 / bf16 / fp16.

    Returns:
        dict of float32 [G*K] tensors "total", "pos", "neg", "clust", "cross" (zeros where a term does not apply).
    """
    if use_triton(main):
        return grace_rewards_triton(main, query, negative, group_size=group_size, mode=mode, variant=variant,
                                    temperature=temperature, clustering_weight=clustering_weight,
                                    cross_group_weight=cross_group_weight)
    return grace_rewards_reference(main.float(), query.float(), None if negative is None else negative.float(),
                                   group_size=group_size, mode=mode, variant=variant, temperature=temperature,
                                   clustering_weight=clustering_weight, cross_group_weight=cross_group_weight)
