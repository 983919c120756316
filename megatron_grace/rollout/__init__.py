"""Rollouts from the policy itself: the engine (``engine.py``), our decode step on a static KV cache
(``decode_step.py``) and its CUDA graphs per row bucket (``cuda_graphs.py``)."""
from .engine import (Rollout, RolloutEngine, RolloutRequest, attention_honours_padding_mask, decode_overrides,
                     release_inference_caches, sample_and_record, sequence_parallel_disabled)

__all__ = ["Rollout", "RolloutEngine", "RolloutRequest", "attention_honours_padding_mask", "decode_overrides",
           "release_inference_caches", "sample_and_record", "sequence_parallel_disabled"]
