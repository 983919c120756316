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

from .data.prompts import Prompt
from .kernels import all_reduce_masked_mean, masked_mean_pool, masked_sum_pool_partial
from .platform import current_device
from .rollout import Rollout
from .schedule import run_microbatches


@dataclass
class SequenceBatch:
    """Right-padded prompt ⊕ response rows of this data-parallel rank."""

    tokens: torch.Tensor  # [N, S] long
    prompt_lengths: torch.Tensor  # [N]
    response_lengths: torch.Tensor  # [N]
    pool_starts: torch.Tensor  # [N]: L_sys, first pooled token

    @classmethod
    def build(cls, prompts: list[Prompt], rollouts: list[Rollout], *, pad_token_id: int,
              length_multiple: int = 1) -> "SequenceBatch":
        lengths = [len(p.input_ids) + len(r.response) for p, r in zip(prompts, rollouts)]
        width = -(-max(lengths) // length_multiple) * length_multiple
        tokens = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        for row, (prompt, rollout) in enumerate(zip(prompts, rollouts)):
            tokens[row, : lengths[row]] = torch.tensor(prompt.input_ids + rollout.response)
        return cls(tokens, torch.tensor([len(p.input_ids) for p in prompts]),
                   torch.tensor([len(r.response) for r in rollouts]), torch.tensor([p.pool_start for p in prompts]))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def pool_mask(self) -> torch.Tensor:
        """[N, S]: user text, template tail and response (with its EOS); not the system prompt, not padding."""
        position = torch.arange(self.tokens.shape[1]).unsqueeze(0)
        end = (self.prompt_lengths + self.response_lengths).unsqueeze(1)
        return (position >= self.pool_starts.unsqueeze(1)) & (position < end)

    def response_target_mask(self) -> torch.Tensor:
        """[N, S-1] over next-token targets tokens[:, 1:]: True where the target is a response token."""
        target_position = torch.arange(1, self.tokens.shape[1]).unsqueeze(0)
        start = self.prompt_lengths.unsqueeze(1)
        return (target_position >= start) & (target_position < start + self.response_lengths.unsqueeze(1))

    def microbatches(self, micro_batch_size: int, **per_row: torch.Tensor) -> list[dict]:
        """Split into equally shaped micro-batches (pipeline schedules need one shape); the last one is filled up with
        copies of the final row, marked ``is_filler`` so their results are dropped and their loss is zero."""
        count = len(self)
        filled = -(-count // micro_batch_size) * micro_batch_size
        index = torch.cat([torch.arange(count), torch.full((filled - count,), count - 1, dtype=torch.long)])
        is_filler = torch.arange(filled) >= count
        rows = dict(tokens=self.tokens, pool_mask=self.pool_mask(), response_mask=self.response_target_mask(),
                    **per_row)
        positions = torch.arange(self.tokens.shape[1]).expand(micro_batch_size, -1)
        batches = []
        for start in range(0, filled, micro_batch_size):
            chosen = index[start: start + micro_batch_size]
            batch = {name: tensor[chosen].to(current_device()) for name, tensor in rows.items()}
            batch["is_filler"] = is_filler[start: start + micro_batch_size].to(current_device())
            batch["position_ids"] = positions.to(current_device())
            batches.append(batch)
        return batches


def pool_hidden(hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """Pooled fp32 [B, H] from the last stage's hidden states [S(/TP), B, H] (sequence-sharded under SP)."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1 and hidden.shape[0] != pool_mask.shape[1]:
        shard = hidden.shape[0]
        start = parallel_state.get_tensor_model_parallel_rank() * shard
        sums, counts = masked_sum_pool_partial(hidden, pool_mask[:, start: start + shard], seq_first=True)
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
def one_pass_forward(model, batch: SequenceBatch, micro_batch_size: int) -> Experience:
    def collect(micro, output):
        log_probs = output.log_probs * micro["response_mask"]
        pooled = pool_hidden(output.hidden, micro["pool_mask"])
        keep = ~micro["is_filler"]
        return log_probs.new_zeros(()), torch.tensor(1), {"log_probs": log_probs[keep], "pooled": pooled[keep]}

    model.eval()
    outputs = run_microbatches(model, batch.microbatches(micro_batch_size), collect, forward_only=True)
    model.train()
    if not parallel_state.is_pipeline_last_stage():
        return Experience(None, None)
    return Experience(torch.cat([o["log_probs"] for o in outputs]), torch.cat([o["pooled"] for o in outputs]))
