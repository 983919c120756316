"""``megatron_grace.kernels``: the Triton ops, one file per op (Liger-Kernel style), each with its torch reference.

The op sources live in the repository's top-level ``kernels/`` folder; a wheel installs them as
``megatron_grace/kernels/`` (``setup.py``'s ``package_dir``). This module is the package's ``__init__``: its
``__path__`` names whichever of the two folders exists, so ``megatron_grace.kernels.sample_tokens`` is the same file in
a checkout, an editable install and a wheel. The top-level folder has no ``__init__.py`` on purpose: with the
repository root on ``sys.path`` (``python -m ...`` from the checkout), a regular package ``kernels`` there would hide
the ``kernels`` package on PyPI, which transformers imports.
"""
from pathlib import Path

_installed = Path(__file__).resolve().parent / "kernels"
__path__ = [str(_installed if _installed.is_dir() else Path(__file__).resolve().parent.parent / "kernels")]

# Absolute imports: this file is a module whose __path__ makes it a package, so "." would mean megatron_grace.
from megatron_grace.kernels.grace_rewards import grace_rewards, grace_rewards_reference  # noqa: E402
from megatron_grace.kernels.masked_mean_pool import (all_reduce_masked_mean, masked_mean_pool,  # noqa: E402
                                                     masked_mean_pool_reference, masked_sum_pool_partial)
from megatron_grace.kernels.sample_tokens import sample_tokens, sample_tokens_reference  # noqa: E402

__all__ = ["all_reduce_masked_mean", "grace_rewards", "grace_rewards_reference", "masked_mean_pool",
           "masked_mean_pool_reference", "masked_sum_pool_partial", "sample_tokens", "sample_tokens_reference"]
