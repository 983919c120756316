"""The output head of our GPTModel: batch-first logits without a transposed copy, and per-token log-probs without
materialising the logits at all.

Megatron-Core's ``GPTModel._postprocess`` computes sequence-first logits [S, B, V] and then either returns
``logits.transpose(0, 1).contiguous()`` (a full copy of the largest tensor of the forward: 0.8 GB at 16 × 256 tokens
with a 49k vocabulary) or runs the vocabulary-parallel cross-entropy over them, which makes about eight passes over
[S, B, V] in float32 (max, subtract, exp, sum, and the softmax it keeps for backward). :class:`GraceGPTModel` keeps
Megatron's path for everything it does not need to change (inference contexts, multi-token prediction) and replaces
those two:

* logits: the output layer runs on [B, S, H] hidden states (a copy 85× smaller than the logits) and returns [B, S, V/TP]
  directly;
* ``labels=``: :class:`LinearCrossEntropy` computes ``-log p(label)`` chunk by chunk of tokens (output-layer GEMM,
  log-sum-exp and target logit on a block that stays small), combines the vocabulary shards across the TP group with
  two all-reduces of one float per token, and recomputes each chunk's logits in backward instead of storing them.
  Padded vocabulary rows (see :func:`~megatron_grace.models.builder.mask_padded_vocab`) are excluded, so the loss path
  also serves models whose vocabulary was padded for TP.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

# Elements of one chunk of logits (float32): 2^22 × 4 B = 16 MB, e.g. 85 tokens of a 49k vocabulary.
CHUNK_LOGIT_ELEMENTS = 1 << 22


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, valid_columns: int) -> torch.Tensor:
    """Logits [n, V/TP] of one chunk of tokens in float32 (or float64), this shard's padded vocabulary columns at -inf."""
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))
    if valid_columns < logits.shape[1]:
        logits[:, max(valid_columns, 0):] = float("-inf")
    return logits


class LinearCrossEntropy(torch.autograd.Function):
    """``-log softmax(hidden @ weight.T)[label]`` per token, the vocabulary split over the TP group.

    hidden [N, H] (the full sequence on every TP rank), weight [V/TP, H] (this rank's shard), labels [N] (global ids).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_size: int, tp_group):
        shard = weight.shape[0]
        vocab_start = parallel_state.get_tensor_model_parallel_rank() * shard
        valid_columns = vocab_size - vocab_start
        local_labels = labels - vocab_start
        on_this_shard = (local_labels >= 0) & (local_labels < min(shard, valid_columns))
        local_labels = torch.where(on_this_shard, local_labels, 0)

        tokens = hidden.shape[0]
        chunk = max(1, CHUNK_LOGIT_ELEMENTS // shard)
        accumulate = torch.promote_types(hidden.dtype, torch.float32)
        log_sum_exp = torch.empty(tokens, dtype=accumulate, device=hidden.device)
        label_logit = torch.empty(tokens, dtype=accumulate, device=hidden.device)
        for start in range(0, tokens, chunk):
            rows = slice(start, start + chunk)
            logits = _chunk_logits(hidden[rows], weight, valid_columns)
            log_sum_exp[rows] = torch.logsumexp(logits, dim=1)
            label_logit[rows] = logits.gather(1, local_labels[rows].unsqueeze(1)).squeeze(1)
        label_logit.masked_fill_(~on_this_shard, 0.0)

        if dist.get_world_size(tp_group) > 1:
            # log Σ_r exp(lse_r) = M + log Σ_r exp(lse_r - M) with M = max_r lse_r; the label lives on one shard.
            shard_max = log_sum_exp.clone()
            dist.all_reduce(shard_max, op=dist.ReduceOp.MAX, group=tp_group)
            summed = torch.exp(log_sum_exp - shard_max)
            dist.all_reduce(summed, group=tp_group)
            log_sum_exp = shard_max + torch.log(summed)
            dist.all_reduce(label_logit, group=tp_group)

        ctx.save_for_backward(hidden, weight, local_labels, on_this_shard, log_sum_exp)
        ctx.valid_columns, ctx.chunk = valid_columns, chunk
        return log_sum_exp - label_logit

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local_labels, on_this_shard, log_sum_exp = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=log_sum_exp.dtype, device=weight.device)
        grad_loss = grad_loss.to(log_sum_exp.dtype)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            # d(lse - z_label)/dz = softmax(z) - onehot(label), scaled by the incoming gradient of each token.
            grad_logits = torch.exp(_chunk_logits(hidden[rows], weight, ctx.valid_columns)
                                    - log_sum_exp[rows].unsqueeze(1))
            row_ids = torch.arange(grad_logits.shape[0], device=grad_logits.device)
            grad_logits[row_ids, local_labels[rows]] -= on_this_shard[rows].to(grad_logits.dtype)
            grad_logits *= grad_loss[rows].unsqueeze(1)
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[rows] = grad_logits @ weight
            if grad_weight.dtype == hidden.dtype:
                grad_weight.addmm_(grad_logits.t(), hidden[rows])
            else:  # low-precision GEMM per chunk (as Megatron's own wgrad), summed over chunks in float32
                grad_weight += grad_logits.t() @ hidden[rows]
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


class GraceGPTModel(GPTModel):
    """Megatron-Core's GPTModel with the output head described in the module docstring. Same parameters, same
    checkpoints. ``arch`` (the :class:`~megatron_grace.models.config.ModelArchitecture`, set by the builder) gives the
    real vocabulary size; ``self.vocab_size`` is Megatron's padded one."""

    def _postprocess(self, hidden_states, labels=None, inference_context=None, **kwargs):
        uses_megatron_path = (
            not self.post_process
            or self.mtp_process
            or (inference_context is not None and not self.training)
        )
        if uses_megatron_path:
            return super()._postprocess(hidden_states=hidden_states, labels=labels,
                                        inference_context=inference_context, **kwargs)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights \
            else self.output_layer.weight
        if labels is None:
            if self.output_layer.sequence_parallel:  # the layer gathers the sequence dimension itself
                return super()._postprocess(hidden_states=hidden_states, labels=labels,
                                            inference_context=inference_context, **kwargs)
            logits, _ = self.output_layer(hidden_states.transpose(0, 1).contiguous(), weight=weight,
                                          runtime_gather_output=kwargs.get("runtime_gather_output"))
            return logits  # [B, S, V/TP]
        tp_group = parallel_state.get_tensor_model_parallel_group()
        if self.output_layer.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True)
        elif dist.get_world_size(tp_group) > 1:
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states)  # all-reduces dgrad in backward
        seq, batch, hidden_size = hidden_states.shape
        # Batch-first token order, so the [B, S] result needs no transposed copy.
        hidden_bsh = hidden_states.transpose(0, 1).reshape(batch * seq, hidden_size)
        loss = LinearCrossEntropy.apply(hidden_bsh, weight, labels.reshape(-1), self.arch.vocab_size, tp_group)
        return loss.view(batch, seq)
