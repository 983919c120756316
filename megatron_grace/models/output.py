"""The output head of our GPTModel: batch-first logits without a transposed copy, and per-token log-probs that
materialise the logits only when backward needs them.

Megatron-Core's ``GPTModel._postprocess`` computes sequence-first logits [S, B, V] and then either returns
``logits.transpose(0, 1).contiguous()`` (a full copy of the largest tensor of the forward: 0.8 GB at 16 × 256 tokens
with a 49k vocabulary) or runs the vocabulary-parallel cross-entropy over them, which makes about eight passes over
[S, B, V] in float32 (max, subtract, exp, sum, and the softmax it keeps for backward). :class:`GraceGPTModel` keeps
Megatron's path for everything it does not need to change (multi-token prediction, non-last stages) and replaces
those two, plus the decoding head:

* logits: the output layer runs on [B, S, H] hidden states (a copy 85× smaller than the logits) and returns
  [B, S, V/TP] directly;
* ``labels=`` (with an optional ``loss_mask=`` [B, S] of the positions to compute; others return 0):
  :class:`LinearCrossEntropy` computes ``-log p(label)`` chunk by chunk of tokens (output-layer GEMM,
  log-sum-exp and target logit on a block that stays small) and combines the vocabulary shards across the TP group
  with all-reduces of one float per token. Without gradients (the no-grad pass over a whole rollout batch) only one
  chunk of logits exists at a time; with gradients the float32 logits are kept and turned into their gradient in
  place in backward.
  Padded vocabulary rows (see :func:`~megatron_grace.models.builder.mask_padded_vocab`) are excluded, so the loss path
  also serves models whose vocabulary was padded for TP;
* decoding (an inference context): the last position's logits of this rank's vocabulary shard, [B, 1, V/TP]; the
  rollout samples vocabulary-parallel (:func:`~megatron_grace.kernels.sample_tokens`), so the vocabulary is gathered
  only for callers that pass ``runtime_gather_output=True``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

# Elements of one chunk of float32 logits, per device. CPU: sized to the cache (2^23 × 4 B = 32 MB, 170 tokens of a 49k
# vocabulary; the measurement is in docs/performance.md). CUDA: sized for GEMM efficiency and memory (1 GB, ~1700 tokens
# of a 152k vocabulary per chunk).
CHUNK_LOGIT_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 28}


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, valid_columns: int, out: torch.Tensor) -> torch.Tensor:
    """Logits [n, V/TP] of one chunk of tokens into ``out`` (float32 or float64), this shard's padded vocabulary
    columns at -inf."""
    if hidden.dtype == out.dtype:
        logits = torch.matmul(hidden, weight.t(), out=out)
    else:
        logits = out.copy_(hidden @ weight.t())
    if valid_columns < logits.shape[1]:
        logits[:, max(valid_columns, 0):] = float("-inf")
    return logits


# The per-chunk element-wise work is compiled into one pass over the chunk (dynamic shapes: the last chunk is shorter).
@torch.compile(dynamic=True)
def _log_sum_exp_and_label_logit(logits: torch.Tensor, labels: torch.Tensor):
    return torch.logsumexp(logits, dim=1), logits.gather(1, labels.unsqueeze(1)).squeeze(1)


@torch.compile(dynamic=True)
def _grad_logits(logits, log_sum_exp, labels, on_this_shard, grad_loss):
    """d(lse - z_label)/dz = softmax(z) - onehot(label), times each token's incoming gradient."""
    columns = torch.arange(logits.shape[1], device=logits.device)
    onehot = (columns.unsqueeze(0) == labels.unsqueeze(1)) & on_this_shard.unsqueeze(1)
    return (torch.exp(logits - log_sum_exp.unsqueeze(1)) - onehot.to(logits.dtype)) * grad_loss.unsqueeze(1)


class LinearCrossEntropy(torch.autograd.Function):
    """``-log softmax(hidden @ weight.T)[label]`` per token, the vocabulary split over the TP group.

    hidden [N, H] (the full sequence on every TP rank), weight [V/TP, H] (this rank's shard), labels [N] (global ids).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_size: int, tp_group, for_backward: bool):
        shard = weight.shape[0]
        vocab_start = parallel_state.get_tensor_model_parallel_rank() * shard
        valid_columns = vocab_size - vocab_start
        local_labels = labels - vocab_start
        on_this_shard = (local_labels >= 0) & (local_labels < min(shard, valid_columns))
        local_labels = torch.where(on_this_shard, local_labels, 0)

        tokens = hidden.shape[0]
        chunk = max(1, CHUNK_LOGIT_ELEMENTS[hidden.device.type] // shard)
        accumulate = torch.promote_types(hidden.dtype, torch.float32)
        log_sum_exp = torch.empty(tokens, dtype=accumulate, device=hidden.device)
        label_logit = torch.empty(tokens, dtype=accumulate, device=hidden.device)
        # With gradients, keep the float32 logits for backward (as Megatron's cross-entropy keeps its softmax):
        # recomputing them would cost one more output-layer GEMM. Without, only one chunk exists at a time.
        logits = torch.empty(tokens if for_backward else min(chunk, tokens), shard, dtype=accumulate,
                             device=hidden.device)
        for start in range(0, tokens, chunk):
            rows = slice(start, start + chunk)
            chunk_logits = _chunk_logits(hidden[rows], weight, valid_columns,
                                         out=logits[rows] if for_backward else logits[: hidden[rows].shape[0]])
            log_sum_exp[rows], label_logit[rows] = _log_sum_exp_and_label_logit(chunk_logits, local_labels[rows])
        label_logit.masked_fill_(~on_this_shard, 0.0)

        if dist.get_world_size(tp_group) > 1:
            # log Σ_r exp(lse_r) = M + log Σ_r exp(lse_r - M) with M = max_r lse_r; the label lives on one shard.
            shard_max = log_sum_exp.clone()
            dist.all_reduce(shard_max, op=dist.ReduceOp.MAX, group=tp_group)
            summed = torch.exp(log_sum_exp - shard_max)
            dist.all_reduce(summed, group=tp_group)
            log_sum_exp = shard_max + torch.log(summed)
            dist.all_reduce(label_logit, group=tp_group)

        ctx.save_for_backward(hidden, weight, local_labels, on_this_shard, log_sum_exp,
                              logits if for_backward else None)
        ctx.chunk = chunk
        return log_sum_exp - label_logit

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local_labels, on_this_shard, log_sum_exp, grad_logits = ctx.saved_tensors
        # The kept logits become their own gradient in place, chunk by chunk; then the two GEMMs of a linear layer.
        grad_loss = grad_loss.to(log_sum_exp.dtype)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            grad_logits[rows] = _grad_logits(grad_logits[rows], log_sum_exp[rows], local_labels[rows],
                                             on_this_shard[rows], grad_loss[rows])
        grad_logits = grad_logits.to(hidden.dtype)
        return grad_logits @ weight, grad_logits.t() @ hidden, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, vocab_size: int, tp_group) -> torch.Tensor:
    """:class:`LinearCrossEntropy`, keeping logits for backward only when autograd will need them (inside
    ``Function.forward`` grad mode is always off, and ``needs_input_grad`` ignores ``torch.no_grad``)."""
    for_backward = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(hidden, weight, labels, vocab_size, tp_group, for_backward)


class GraceGPTModel(GPTModel):
    """Megatron-Core's GPTModel with the output head described in the module docstring. Same parameters, same
    checkpoints. ``arch`` (the :class:`~megatron_grace.models.config.ModelArchitecture`, set by the builder) gives the
    real vocabulary size; ``self.vocab_size`` is Megatron's padded one.

    ``row_temperatures`` ([B], set by :func:`~megatron_grace.schedule.run_microbatches` around a forward): the
    per-token log-probs of the ``labels=`` path are taken under softmax(logits / T_row), the distribution each row was
    sampled from, so PPO's ratio and the rollout's log-probs refer to the same policy at any sampling temperature (as
    verl and TRL do). The output layer has no bias, so dividing its input by T divides the logits by T."""

    row_temperatures: torch.Tensor | None = None

    def _output_weight(self):
        return self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights \
            else self.output_layer.weight

    def _next_token_logits(self, hidden_states, gather_vocabulary: bool | None) -> torch.Tensor:
        """Decoding: logits of the last position only, [B, 1, V/TP] (this rank's vocabulary shard; the rollout samples
        vocabulary-parallel) unless the caller asks for the gathered vocabulary as Megatron's own engines do."""
        logits, _ = self.output_layer(hidden_states[-1:], weight=self._output_weight(),
                                      runtime_gather_output=gather_vocabulary)
        return logits.transpose(0, 1)

    def _postprocess(self, hidden_states, labels=None, inference_context=None, **kwargs):
        if inference_context is not None and not self.training:
            if self.post_process and not self.mtp_process:
                return self._next_token_logits(hidden_states, kwargs.get("runtime_gather_output"))
            # Megatron's path asserts a gathered vocabulary while decoding (a stage before the last has no logits).
            kwargs["runtime_gather_output"] = True
        uses_megatron_path = (
            not self.post_process
            or self.mtp_process
            # Sequence-parallel logits: the output layer gathers the sequence dimension itself.
            or (labels is None and self.output_layer.sequence_parallel)
        )
        if uses_megatron_path:
            return super()._postprocess(hidden_states=hidden_states, labels=labels,
                                        inference_context=inference_context, **kwargs)
        weight = self._output_weight()
        if labels is None:
            logits, _ = self.output_layer(hidden_states.transpose(0, 1).contiguous(), weight=weight,
                                          runtime_gather_output=kwargs.get("runtime_gather_output"))
            return logits  # [B, S, V/TP]
        tp_group = parallel_state.get_tensor_model_parallel_group()
        if self.output_layer.sequence_parallel:  # reduce-scatters the input gradient in backward
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True)
        seq, batch, hidden_size = hidden_states.shape
        # Batch-first token order, so the [B, S] result needs no transposed copy.
        hidden_bsh = hidden_states.transpose(0, 1).reshape(batch * seq, hidden_size)
        if self.row_temperatures is not None:
            hidden_bsh = hidden_bsh / self.row_temperatures.to(hidden_bsh.dtype).repeat_interleave(seq)[:, None]
        labels = labels.reshape(-1)
        loss_mask = kwargs.get("loss_mask")
        if loss_mask is not None:
            # Only these positions are computed (GRACE needs the response tokens' log-probs, not the prompt's); the
            # rest of the [B, S] result is 0. Every TP rank holds the same mask, so the shards stay aligned.
            positions = loss_mask.reshape(-1).nonzero().squeeze(1)
            hidden_bsh, labels = hidden_bsh[positions], labels[positions]
        if not self.output_layer.sequence_parallel and dist.get_world_size(tp_group) > 1:
            # All-reduces the input gradient in backward. Applied to a contiguous [tokens, H] tensor: Megatron's
            # _reduce all-reduces ``grad.contiguous()`` and returns ``grad``, losing the sum for a strided gradient.
            hidden_bsh = copy_to_tensor_model_parallel_region(hidden_bsh)
        loss = linear_cross_entropy(hidden_bsh, weight, labels, self.arch.vocab_size, tp_group)
        if loss_mask is not None:
            loss = loss.new_zeros(batch * seq).index_copy(0, positions, loss)
        return loss.view(batch, seq)
