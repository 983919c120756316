"""Rollout sequences as padded batches, and the one no-grad forward that turns them into experience.

One forward of the current policy over prompt ⊕ response gives, on the last pipeline stage, both
* the old log-probabilities of the response tokens (PPO's behaviour policy), and
* the pooled embedding of every sequence: masked mean of the final-norm hidden states over the user text, template
  tail and rationale (:mod:`megatron_grace.kernels`). Under sequence parallelism each TP rank pools its own slice of
  the sequence and one all-reduce of [B, H + 1] floats finishes the mean: hidden states are never gathered, never
  leave the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from ..data.prompts import Prompt
from ..kernels import all_reduce_masked_mean, masked_mean_pool, masked_sum_pool_partial
from ..kernels.masked_mean_pool import raise_on_empty_rows
from ..platform import current_device
from ..rollout import Rollout
from ..schedule import run_microbatches


@dataclass
class SequenceBatch:
    """Right-padded prompt ⊕ response rows of this data-parallel rank."""

    tokens: torch.Tensor  # [N, S] long
    prompt_lengths: torch.Tensor  # [N]
    response_lengths: torch.Tensor  # [N]
    pool_starts: torch.Tensor  # [N]: L_sys, first pooled token
    length_multiple: int = 1  # widths are rounded up to it (the TP size under sequence parallelism)

    @classmethod
    def build(cls, prompts: list[Prompt], rollouts: list[Rollout], *, pad_token_id: int,
              length_multiple: int = 1) -> "SequenceBatch":
        lengths = [len(p.input_ids) + len(r.response) for p, r in zip(prompts, rollouts)]
        width = _round_up(max(lengths), length_multiple)
        tokens = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        for row, (prompt, rollout) in enumerate(zip(prompts, rollouts)):
            tokens[row, : lengths[row]] = torch.tensor(prompt.input_ids + rollout.response)
        return cls(tokens, torch.tensor([len(p.input_ids) for p in prompts]),
                   torch.tensor([len(r.response) for r in rollouts]), torch.tensor([p.pool_start for p in prompts]),
                   length_multiple)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows) -> "SequenceBatch":
        """The rows ``rows`` (a slice or index tensor), same width."""
        return SequenceBatch(self.tokens[rows], self.prompt_lengths[rows], self.response_lengths[rows],
                             self.pool_starts[rows], self.length_multiple)

    def sequence_lengths(self) -> torch.Tensor:
        return self.prompt_lengths + self.response_lengths

    def pool_mask(self) -> torch.Tensor:
        """[N, S]: user text, template tail and response (with its EOS); not the system prompt, not padding."""
        position = torch.arange(self.tokens.shape[1]).unsqueeze(0)
        end = self.sequence_lengths().unsqueeze(1)
        return (position >= self.pool_starts.unsqueeze(1)) & (position < end)

    def response_target_mask(self) -> torch.Tensor:
        """[N, S-1] over next-token targets tokens[:, 1:]: True where the target is a response token."""
        target_position = torch.arange(1, self.tokens.shape[1]).unsqueeze(0)
        start = self.prompt_lengths.unsqueeze(1)
        return (target_position >= start) & (target_position < start + self.response_lengths.unsqueeze(1))

    def microbatches(self, micro_batch_size: int, *, length_trimmed: bool = True,
                     row_vectors: dict[str, torch.Tensor] | None = None, **per_row: torch.Tensor) -> list[dict]:
        """Split into micro-batches of ``micro_batch_size`` rows; the last one is filled up with copies of a row,
        marked ``is_filler`` so their results are dropped and their loss is zero. ``rows`` holds each micro-batch
        row's index in this batch.

        ``length_trimmed``: rows are sorted by length (longest first) and each micro-batch is cut to its own widest
        row (rounded up to ``length_multiple``), so short rationales do not pay for the longest one. Widths then
        differ between micro-batches; :func:`~megatron_grace.schedule.run_microbatches` switches Megatron's
        pipeline communication to ``variable_seq_lengths`` (shapes are sent ahead of each tensor). Otherwise every
        micro-batch has the batch's width, in row order. ``per_row`` tensors are [N] or [N, S-1] (targets, trimmed
        with the tokens); ``row_vectors`` are [N, K] tensors that are not (an embedding gradient per row)."""
        rows = dict(tokens=self.tokens, pool_mask=self.pool_mask(), response_mask=self.response_target_mask(),
                    **per_row)
        batches = []
        for chosen, is_filler, width in self._microbatch_rows(micro_batch_size, length_trimmed):
            batch = {name: _trim(tensor[chosen], width, self.tokens.shape[1]).to(current_device())
                     for name, tensor in rows.items()}
            batch.update({name: tensor[chosen].to(current_device()) for name, tensor in (row_vectors or {}).items()})
            batch["rows"] = chosen
            batch["is_filler"] = is_filler.to(current_device())
            batch["position_ids"] = torch.arange(width).expand(micro_batch_size, -1).to(current_device())
            batches.append(batch)
        return batches

    def token_counts(self, micro_batch_size: int, *, length_trimmed: bool = True) -> tuple[int, int]:
        """(tokens a forward over :meth:`microbatches` computes, real tokens among them)."""
        lengths = self.sequence_lengths()
        computed = real = 0
        for chosen, is_filler, width in self._microbatch_rows(micro_batch_size, length_trimmed):
            computed += len(chosen) * width
            real += int(lengths[chosen[~is_filler]].sum())
        return computed, real

    def padding_share(self, micro_batch_size: int, *, length_trimmed: bool = True) -> float:
        """Share of the tokens a forward over :meth:`microbatches` computes that are padding or filler rows."""
        computed, real = self.token_counts(micro_batch_size, length_trimmed=length_trimmed)
        return 1.0 - real / computed

    def _microbatch_rows(self, micro_batch_size: int, length_trimmed: bool):
        """(row indices, filler flags, width) of each micro-batch (see :meth:`microbatches`)."""
        count, lengths = len(self), self.sequence_lengths()
        order = torch.argsort(lengths, descending=True, stable=True) if length_trimmed else torch.arange(count)
        filled = _round_up(count, micro_batch_size)
        order = torch.cat([order, order[-1:].expand(filled - count)])
        is_filler = torch.arange(filled) >= count
        for start in range(0, filled, micro_batch_size):
            chosen = order[start: start + micro_batch_size]
            width = self.tokens.shape[1]
            if length_trimmed:
                width = min(_round_up(max(int(lengths[chosen].max()), 2), self.length_multiple), width)
            yield chosen, is_filler[start: start + micro_batch_size], width


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _trim(rows: torch.Tensor, width: int, full_width: int) -> torch.Tensor:
    """Cut [rows, S] (tokens, pooling mask) to ``width`` and [rows, S-1] (next-token targets) to ``width - 1``;
    [rows] tensors stay."""
    if rows.dim() == 1:
        return rows
    return rows[:, : width if rows.shape[1] == full_width else width - 1]


def pool_hidden(hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """Pooled fp32 [B, H] from the last stage's hidden states [S(/TP), B, H] (sequence-sharded under SP)."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1 and hidden.shape[0] != pool_mask.shape[1]:
        shard = hidden.shape[0]
        start = parallel_state.get_tensor_model_parallel_rank() * shard
        sums, counts = masked_sum_pool_partial(hidden, pool_mask[:, start: start + shard], seq_first=True)
        if torch.is_grad_enabled() and hidden.requires_grad:
            # Training through the pool (contrastive baselines): every TP rank evaluates the same loss on the mean,
            # so the sum's backward is the identity (Megatron's reduce-from-tensor-parallel-region).
            from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

            sums = reduce_from_tensor_model_parallel_region(sums)
            counts = reduce_from_tensor_model_parallel_region(counts)
            raise_on_empty_rows(counts)  # as all_reduce_masked_mean does on the no-grad path
            return sums / counts.clamp_min(1)[:, None]
        return all_reduce_masked_mean(sums, counts, group=parallel_state.get_tensor_model_parallel_group())
    return masked_mean_pool(hidden, pool_mask, seq_first=True)


@dataclass
class Experience:
    """Results of the one-pass forward, present on the last pipeline stage only (None elsewhere)."""

    old_log_probs: torch.Tensor | None  # [N, S-1] (0 outside response targets)
    embeddings: torch.Tensor | None  # [N, H] fp32, not normalised


def logprob_mismatch_sum(rollouts: list[Rollout], old_log_probs: torch.Tensor,
                         target_mask: torch.Tensor) -> torch.Tensor:
    """Σ |sampling log-prob − one-pass forward log-prob| over the response targets of these rows, computed where the
    forward's log-probs live (the batch's masks are host tensors; on a GPU they must move, not the log-probs)."""
    mask = target_mask.to(old_log_probs.device)
    sampled = torch.zeros_like(old_log_probs)
    # Row-major order of the mask's True positions is each row's response, in order.
    sampled[mask] = torch.cat([torch.tensor(r.log_probs, dtype=old_log_probs.dtype) for r in rollouts]
                              ).to(old_log_probs.device)
    return ((sampled - old_log_probs).abs() * mask).sum()


@torch.no_grad()
def one_pass_forward(model, batch: SequenceBatch, micro_batch_size: int, *, length_trimmed: bool = True,
                     dropout_seed: int | None = None, temperatures: torch.Tensor | None = None) -> Experience:
    """Old log-probs and pooled embeddings of every row. The model runs in eval mode (no dropout) unless a
    ``dropout_seed`` is given: then dropout is on with masks drawn from that seed, so that a later forward/backward
    with the same seed and micro-batches replays them (SimCSE's two passes, :mod:`megatron_grace.contrastive`).
    ``temperatures`` [N]: each row's sampling temperature; its log-probs are taken under softmax(logits / T)."""
    def collect(micro, output):
        log_probs = output.log_probs * micro["response_mask"]
        pooled = pool_hidden(output.hidden, micro["pool_mask"])
        keep = ~micro["is_filler"]
        return log_probs.new_zeros(()), torch.tensor(1), {"log_probs": log_probs[keep], "pooled": pooled[keep],
                                                           "rows": micro["rows"][keep.cpu()]}

    model.train(dropout_seed is not None)
    per_row = {} if temperatures is None else {"temperatures": temperatures}
    outputs = run_microbatches(model, batch.microbatches(micro_batch_size, length_trimmed=length_trimmed, **per_row),
                               collect, forward_only=True, dropout_seed=dropout_seed)
    model.train()
    if not parallel_state.is_pipeline_last_stage():
        return Experience(None, None)
    # Back to the batch's row order and width (micro-batches may be sorted and trimmed).
    first = outputs[0]
    old_log_probs = first["log_probs"].new_zeros(len(batch), batch.tokens.shape[1] - 1)
    embeddings = first["pooled"].new_empty(len(batch), first["pooled"].shape[1])
    for output in outputs:
        rows = output["rows"].to(old_log_probs.device)
        old_log_probs[rows, : output["log_probs"].shape[1]] = output["log_probs"]
        embeddings[rows] = output["pooled"]
    return Experience(old_log_probs, embeddings)
