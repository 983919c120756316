"""Rollouts: sampling rationales from the policy itself with Megatron-Core's inference machinery.

The policy's own GPTModel stage runs generation at its training TP/PP layout: Megatron-Core's ``GPTInferenceWrapper``
does the pipeline-parallel send/receive and tensor-parallel logit gathering, and a ``StaticInferenceContext`` holds the
KV cache. No second copy of the weights exists and nothing is synchronised. On top of that sits a small sampling
loop written for GRPO, which is what Megatron-Core's generic text-generation controller does not give cheaply:

* one left-padded prefill for the whole batch (prompts of different lengths do not decode token by token; RoPE
  scores depend on relative positions only, so the left shift does not change the attention), of each distinct
  prompt once: the ``--rollout-n`` rows of a group share the prompt's KV cache;
* a temperature per row, so the T=1.0 main rollouts and the T=0.5 query/negative rationales share one batch;
* sampling noise from a generator per row seeded by ``(seed, step, sample id, rollout index)``: the tokens of a row do
  not depend on batch composition, data-parallel size or resume point;
* the sampling log-probability of every token (for the train/inference mismatch metric) and the truncation flag.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.inference.communication_utils import broadcast_from_last_pipeline_stage
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig

from .checkpointing import unwrap
from .platform import current_device


@dataclass
class RolloutRequest:
    prompt: list[int]
    temperature: float
    seed: int  # per-row sampling seed (derive it with :func:`row_seed`)


@dataclass
class Rollout:
    response: list[int]  # generated tokens, ending with EOS unless truncated
    log_probs: list[float]  # sampling log-probabilities (at the row's temperature) of the response tokens
    truncated: bool  # hit the maximum response length without EOS


def row_seed(seed: int, step: int, sample_id: int, rollout_index: int) -> int:
    """A 63-bit seed from the run seed and the row's identity (SplitMix64 finaliser of a mixed key)."""
    value = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + sample_id * 0x94D049BB133111EB
             + rollout_index * 0xD6E8FEB86659FD93) & 0xFFFFFFFFFFFFFFFF
    value ^= value >> 30
    value = (value * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value ^= value >> 27
    value = (value * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (value ^ (value >> 31)) >> 1


@contextlib.contextmanager
def config_overrides(config, **values):
    """Set TransformerConfig fields for the duration (Megatron's modules read these at forward time)."""
    saved = {name: getattr(config, name) for name in values}
    for name, value in values.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


@contextlib.contextmanager
def sequence_parallel_disabled(model):
    """Decoding one token at a time cannot be split along the sequence: switch sequence parallelism off in every
    module for the duration (the weights are the same; only the activation layout changes)."""
    stage = unwrap(model)
    changed = []
    for module in [stage, *stage.modules()]:
        for attribute in ("sequence_parallel", "reduce_scatter_embeddings"):
            if getattr(module, attribute, None) is True:
                setattr(module, attribute, False)
                changed.append((module, attribute))
    try:
        with config_overrides(stage.config, sequence_parallel=False):
            yield
    finally:
        for module, attribute in changed:
            setattr(module, attribute, True)


class RolloutEngine:
    def __init__(self, model, *, eos_token_ids: list[int], pad_token_id: int):
        self.model = model
        self.stage = unwrap(model)
        self.arch = self.stage.arch
        self.eos_token_ids = torch.tensor(sorted(set(eos_token_ids)))
        self.pad_token_id = pad_token_id

    @torch.no_grad()
    def generate(self, requests: list[RolloutRequest], max_new_tokens: int) -> list[Rollout]:
        """Sample one response per request (collective over the TP and PP groups of this rank)."""
        batch = len(requests)
        prompt_lengths = torch.tensor([len(r.prompt) for r in requests])
        prompt_width = int(prompt_lengths.max())
        total = prompt_width + max_new_tokens
        tokens = torch.full((batch, total), self.pad_token_id, dtype=torch.long)
        for row, request in enumerate(requests):
            tokens[row, prompt_width - len(request.prompt): prompt_width] = torch.tensor(request.prompt)
        # Megatron masks are True where attention is forbidden: causal, plus the left padding of each row.
        is_pad = torch.arange(total).unsqueeze(0) < (prompt_width - prompt_lengths).unsqueeze(1)
        causal_forbidden = torch.ones(total, total, dtype=torch.bool).triu(1)
        attention_mask = (causal_forbidden.unsqueeze(0) | is_pad.unsqueeze(1)).unsqueeze(1)
        # A row's padding must still attend somewhere (softmax over nothing is NaN): let pads see themselves.
        attention_mask &= ~torch.eye(total, dtype=torch.bool)
        device = current_device()
        inference_input = {"tokens": tokens.to(device), "position_ids": torch.arange(total).expand(batch, -1),
                           "attention_mask": attention_mask.to(device)}

        temperatures = torch.tensor([r.temperature for r in requests], dtype=torch.float32).unsqueeze(1)
        generators = [torch.Generator().manual_seed(r.seed) for r in requests]
        finished = torch.zeros(batch, dtype=torch.bool)
        lengths = torch.zeros(batch, dtype=torch.long)
        log_probs = torch.zeros(batch, max_new_tokens)

        # GRPO repeats each prompt --rollout-n times: prefill every distinct prompt once, then copy its KV cache (and
        # last logits) to the rows that share it.
        distinct: dict[tuple[int, ...], int] = {}
        first_rows = []
        for row, request in enumerate(requests):
            if tuple(request.prompt) not in distinct:
                distinct[tuple(request.prompt)] = len(first_rows)
                first_rows.append(row)
        source = torch.tensor([distinct[tuple(r.prompt)] for r in requests])
        prefill_input = {name: value[torch.tensor(first_rows)] for name, value in inference_input.items()}

        wrapper = self._wrapper(batch, total)
        with sequence_parallel_disabled(self.model):
            wrapper.prep_model_for_inference()
            logits = wrapper.run_one_forward_step(wrapper.get_batch_for_context_window(prefill_input, 0, prompt_width))
            with torch.inference_mode():  # the cache was allocated in the wrapper's inference mode
                for key_memory, value_memory in wrapper.inference_context.key_value_memory_dict.values():
                    key_memory[:, :batch] = key_memory[:, source]
                    value_memory[:, :batch] = value_memory[:, source]
            logits = None if logits is None else logits[source.to(logits.device)]
            # Decoding runs one token per row: a compiled SwiGLU's per-call guard and dispatch cost (~0.2 ms on CPU)
            # exceeds the work; the eager activation is the same arithmetic.
            with config_overrides(self.stage.config, bias_activation_fusion=False):
                for position in range(prompt_width, total):
                    if position > prompt_width:
                        window = wrapper.get_batch_for_context_window(inference_input, position - 1, position)
                        logits = wrapper.run_one_forward_step(window)
                    sampled = torch.empty(batch, 2)
                    if parallel_state.is_pipeline_last_stage():
                        next_logits = logits[:, -1, : self.arch.vocab_size].float().cpu()
                        token, token_log_prob = self._sample(next_logits, temperatures, generators)
                        sampled = torch.stack([token.float(), token_log_prob], dim=1)
                    sampled = broadcast_from_last_pipeline_stage([batch, 2], torch.float32, sampled.to(device))
                    token = sampled[:, 0].long().cpu()
                    step = position - prompt_width
                    token = torch.where(finished, torch.full_like(token, self.pad_token_id), token)
                    tokens[:, position] = token
                    inference_input["tokens"][:, position] = token.to(device)
                    log_probs[:, step] = sampled[:, 1].cpu()
                    lengths += (~finished).long()
                    finished |= torch.isin(token, self.eos_token_ids)
                    if bool(finished.all()):
                        break
        self.stage.train()
        return [
            Rollout(response=tokens[row, prompt_width: prompt_width + int(lengths[row])].tolist(),
                    log_probs=log_probs[row, : int(lengths[row])].tolist(),
                    truncated=not bool(finished[row]))
            for row in range(batch)
        ]

    def _wrapper(self, batch: int, total: int) -> GPTInferenceWrapper:
        config = InferenceWrapperConfig(
            hidden_size=self.arch.hidden_size,
            params_dtype=self.stage.config.params_dtype,
            inference_batch_times_seqlen_threshold=-1,  # whole batch in one PP pass: rollouts are latency bound
            padded_vocab_size=self.arch.padded_vocab_size,
            inference_max_requests=batch,
            inference_max_seq_length=total,
        )
        return GPTInferenceWrapper(self.stage, config, StaticInferenceContext(batch, total))

    @staticmethod
    def _sample(logits: torch.Tensor, temperatures: torch.Tensor, generators: list[torch.Generator]):
        """Gumbel-max sampling at each row's temperature, noise drawn from the row's own generator."""
        scaled_log_probs = torch.log_softmax(logits / temperatures, dim=-1)
        uniform = torch.stack([torch.rand(logits.shape[1], generator=g) for g in generators])
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
        token = torch.argmax(scaled_log_probs + gumbel, dim=-1)
        return token, scaled_log_probs.gather(1, token.unsqueeze(1)).squeeze(1)
