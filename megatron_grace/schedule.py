"""Run a model stage over micro-batches with Megatron-Core's pipeline schedules (any PP size, forward-only or
forward+backward), capturing the final-norm hidden states on the last stage for pooling.

``loss_fn(batch, output)`` runs on the last pipeline stage only, once per micro-batch, with a :class:`StageOutput`:
* ``log_probs`` [B, S-1]: log p(tokens[:, t+1] | tokens[:, :t+1]), computed vocabulary-parallel; when the
  micro-batch holds a ``response_mask`` [B, S-1], only those positions are computed and the others are 0 (the output
  layer is the largest GEMM of a small model, and GRACE's prompts are longer than their rationales); when it holds
  ``temperatures`` [B], under softmax(logits / T_row), the distribution the row was sampled from;
* ``hidden``: the decoder's output after the final norm, [S, B, H] (or [S/TP, B, H] under sequence parallel);
* ``logits`` [B, S, V/TP] (padded vocabulary rows masked to -inf), only with ``need_logits=True``.
It returns ``(loss_sum, num_tokens, metrics)``: the schedule scales gradients by the global token count (see
:mod:`megatron_grace.optim`); metrics (any tensors) are returned per micro-batch on the last stage.

Log-probs come from the model's loss path (``labels=``), which :class:`~megatron_grace.models.output.GraceGPTModel`
computes chunk by chunk without materialising the logits (padded vocabulary rows excluded); callers that need the
logits take the logits path instead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from .utils import unwrap
from .models.builder import config_overrides, mask_padded_vocab


@dataclass
class StageOutput:
    log_probs: torch.Tensor
    hidden: torch.Tensor
    logits: torch.Tensor | None = None


def run_microbatches(model, microbatches: list[dict], loss_fn: Callable, *, forward_only: bool,
                     need_logits: bool = False, dropout_seed: int | None = None) -> list[dict]:
    """Each micro-batch holds ``tokens`` [B, S] and ``position_ids`` [B, S]: one B for all, S may differ (then the
    pipeline stages exchange each activation's shape before it, Megatron's ``variable_seq_lengths``).

    ``dropout_seed``: the default generator is re-seeded from (seed, micro-batch index, layer number) before the
    embedding (layer 0) and before every decoder layer, so two runs over the same micro-batches draw the same dropout
    masks whatever the pipeline layout (each stage seeds its own layers by their global number); the generator's
    state is restored afterwards. Hidden dropout draws from the default generator when sequence parallelism is off
    (the only case it is allowed: see :meth:`~megatron_grace.config.GraceConfig.validate`)."""
    if dropout_seed is not None:
        with _replayed_dropout(unwrap(model), dropout_seed) as start_microbatch:
            return _run_microbatches(model, microbatches, loss_fn, forward_only, need_logits, start_microbatch)
    return _run_microbatches(model, microbatches, loss_fn, forward_only, need_logits, lambda: None)


@contextlib.contextmanager
def _replayed_dropout(stage, seed: int):
    from .kernels.sample_tokens import row_seed

    microbatch = [-1]

    def start_microbatch():
        microbatch[0] += 1
        torch.manual_seed(row_seed(seed, microbatch[0], 0, 0))

    def seed_layer(layer, inputs):
        torch.manual_seed(row_seed(seed, microbatch[0], layer.layer_number, 0))

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        handles = [layer.register_forward_pre_hook(seed_layer) for layer in stage.decoder.layers]
        try:
            yield start_microbatch
        finally:
            for handle in handles:
                handle.remove()


def _run_microbatches(model, microbatches, loss_fn, forward_only, need_logits, start_microbatch) -> list[dict]:
    stage = unwrap(model)
    arch = stage.arch
    use_labels = not need_logits
    widths = {micro["tokens"].shape[1] for micro in microbatches}
    seq_length = max(widths)
    micro_batch_size = microbatches[0]["tokens"].shape[0]
    captured: dict[str, torch.Tensor] = {}

    def capture_hidden(module, inputs, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output

    def forward_step(data_iterator, model_chunk):
        batch = next(data_iterator)
        start_microbatch()
        # Position t predicts token t+1; the last position's label is a placeholder, dropped below.
        labels = torch.roll(batch["tokens"], -1, dims=1) if use_labels else None
        loss_mask = None
        if use_labels and "response_mask" in batch:
            loss_mask = torch.nn.functional.pad(batch["response_mask"], (0, 1))  # [B, S-1] → [B, S]
        stage.row_temperatures = batch.get("temperatures") if use_labels else None
        output = model_chunk(batch["tokens"], batch["position_ids"], None, labels=labels, loss_mask=loss_mask)
        stage.row_temperatures = None
        # The schedule calls the loss function on the last pipeline stage only.
        return output, partial(finish, batch)

    def finish(batch, output):
        hidden = captured.pop("hidden")
        if use_labels:  # output: per-token cross-entropy [B, S]
            return loss_fn(batch, StageOutput(log_probs=-output[:, :-1], hidden=hidden))
        logits = mask_padded_vocab(output, arch.vocab_size)
        if "temperatures" in batch:
            logits = logits / batch["temperatures"].to(logits.dtype)[:, None, None]
        log_probs = token_log_probs(logits[:, :-1], batch["tokens"][:, 1:])
        return loss_fn(batch, StageOutput(log_probs=log_probs, hidden=hidden, logits=logits))

    handle = stage.decoder.register_forward_hook(capture_hidden) if parallel_state.is_pipeline_last_stage() else None
    variable_widths = len(widths) > 1 and parallel_state.get_pipeline_model_parallel_world_size() > 1
    try:
        with config_overrides(stage.config, variable_seq_lengths=stage.config.variable_seq_lengths or variable_widths):
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
