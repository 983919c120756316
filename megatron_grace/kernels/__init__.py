from .grace_rewards import grace_rewards, grace_rewards_reference
from .masked_mean_pool import (all_reduce_masked_mean, masked_mean_pool, masked_mean_pool_reference,
                               masked_sum_pool_partial)
from .sample_tokens import sample_tokens, sample_tokens_reference

__all__ = ["all_reduce_masked_mean", "grace_rewards", "grace_rewards_reference", "masked_mean_pool",
           "masked_mean_pool_reference", "masked_sum_pool_partial", "sample_tokens", "sample_tokens_reference"]
