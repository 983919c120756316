"""Run a model stage over micro-batches with Megatron-Core's pipeline schedules (any PP size, forward-only or
forward+backward), capturing the final-norm hidden states on the last stage for pooling.

``loss_fn(batch, logits, hidden)`` runs on the last pipeline stage only, once per micro-batch, with
* ``logits``: [B, S, V/TP] vocabulary-parallel logits (padded vocabulary rows masked to -inf),
* ``hidden``: the decoder's output after the final norm, [S, B, H] (or [S/TP, B, H] under sequence parallel).
It returns ``(loss_sum, num_tokens, metrics)``: the schedule scales gradients by the global token count (see
:mod:`megatron_grace.optim`); metrics (any tensors) are returned per micro-batch on the last stage.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from .checkpointing import unwrap
from .models.builder import mask_padded_vocab


def run_microbatches(model, microbatches: list[dict], loss_fn: Callable, *, forward_only: bool) -> list[dict]:
    """Each micro-batch holds ``tokens`` [B, S] and ``position_ids`` [B, S]; all share one [B, S] shape."""
    stage = unwrap(model)
    vocab_size = stage.arch.vocab_size
    seq_length = microbatches[0]["tokens"].shape[1]
    micro_batch_size = microbatches[0]["tokens"].shape[0]
    captured: dict[str, torch.Tensor] = {}

    def capture_hidden(module, inputs, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output

    def forward_step(data_iterator, model_chunk):
        batch = next(data_iterator)
        output = model_chunk(batch["tokens"], batch["position_ids"], None)
        # The schedule calls the loss function on the last pipeline stage only.
        return output, partial(_finish, batch)

    def _finish(batch, logits):
        return loss_fn(batch, mask_padded_vocab(logits, vocab_size), captured.pop("hidden"))

    handle = stage.decoder.register_forward_hook(capture_hidden) if parallel_state.is_pipeline_last_stage() else None
    try:
        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=[model],
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
    finally:
        if handle is not None:
            handle.remove()
    return results


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from vocabulary-parallel logits [B, S, V/TP] without gathering the vocabulary."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # vocab_parallel_cross_entropy takes [S, B, V/TP] and returns -log p [S, B].
    return -vocab_parallel_cross_entropy(logits.transpose(0, 1).float().contiguous(), targets.t().contiguous()).t()
