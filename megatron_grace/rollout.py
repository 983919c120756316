"""Rollouts: sampling rationales from the policy itself with Megatron-Core's inference machinery.

The policy's own GPTModel stage runs generation at its training TP/PP layout: Megatron-Core's ``GPTInferenceWrapper``
does the pipeline-parallel send/receive and tensor-parallel logit gathering, and a ``StaticInferenceContext`` holds the
KV cache. No second copy of the weights exists and nothing is synchronised. On top of that sits a small sampling
loop written for GRPO, which is what Megatron-Core's generic text-generation controller does not give cheaply:

* one prefill for the whole batch, of each distinct prompt once: the ``--rollout-n`` rows of a group share the
  prompt's KV cache. Where the attention applies masks (our SDPA core attention), prompts are left-padded and the
  prefill covers them whole (RoPE scores depend on relative positions only, so the shift does not change the
  attention). Where it ignores them (Transformer Engine's causal/no-mask attention), no pad ever precedes a real
  token: the prefill covers the shortest prompt and longer prompts are fed token by token while the others sample
  (Megatron's own static engine does the same), so a row gives the same tokens alone as in any batch on every spec;
* a temperature per row, so the T=1.0 main rollouts and the T=0.5 query/negative rationales share one batch;
* counter-based sampling noise (:func:`~megatron_grace.kernels.sample_tokens`), a pure function of the row's seed
  ``(seed, step, sample id, rollout index)``, the token's index in the response and the vocabulary id: the tokens of a
  row do not depend on batch composition, layout, data-parallel size or resume point;
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
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from .checkpointing import unwrap
from .kernels import sample_tokens
from .models import rope
from .platform import current_device, has_cuda


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


def decode_overrides() -> dict:
    """TransformerConfig fields set while decoding. On CPU, Megatron's compiled SwiGLU costs more per call (guards,
    dispatch) than the work of one token per row, so decoding takes its eager path (the same arithmetic); on CUDA the
    fused kernel stays."""
    return {} if has_cuda() else {"bias_activation_fusion": False}


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


def attention_honours_padding_mask(stage) -> bool:
    """Whether every layer's core attention applies the boolean mask it is given.

    Our :class:`~megatron_grace.models.layers.SDPAttention` does. Transformer Engine's ``DotProductAttention`` uses the
    mask only for the padding/arbitrary mask types, and the GPT spec runs it as causal (prefill) and no-mask (decode),
    so a left-padded row would attend to its pads there and be sampled from another distribution than the one the
    one-pass forward scores. Unknown modules are assumed to drop the mask.
    """
    return all(getattr(layer.self_attention.core_attention, "honours_attention_mask", False)
               for layer in stage.decoder.layers)


def release_inference_caches() -> None:
    """Megatron's ``RotaryEmbedding.forward`` is an ``lru_cache`` keyed on the sequence length: frequencies computed
    during a rollout are inference-mode tensors, and an update batch of the same width would get them back, which
    Transformer Engine's fused RoPE cannot save for backward. Clear it after every rollout (as Megatron-RL does)."""
    RotaryEmbedding.forward.cache_clear()
    rope.clear_cache()


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
        try:
            return self._generate(requests, max_new_tokens)
        finally:
            release_inference_caches()
            self.stage.train()

    def _generate(self, requests: list[RolloutRequest], max_new_tokens: int) -> list[Rollout]:
        batch = len(requests)
        prompt_lengths = torch.tensor([len(r.prompt) for r in requests])
        if attention_honours_padding_mask(self.stage):
            # Left padding: every prompt ends at the same column, one prefill covers all of them, and the attention
            # mask hides the pads.
            prompt_starts = int(prompt_lengths.max()) - prompt_lengths
            prefill_end = int(prompt_lengths.max())
        else:
            # No pad before a real token (for attention that ignores masks): prompts start at column 0, the prefill
            # covers the shortest prompt, and longer prompts are fed token by token from there on, exactly where
            # the others already sample (a causal attention then only ever sees real tokens).
            prompt_starts = torch.zeros_like(prompt_lengths)
            prefill_end = int(prompt_lengths.min())
        response_starts = prompt_starts + prompt_lengths
        total = int(response_starts.max()) + max_new_tokens
        tokens = torch.full((batch, total), self.pad_token_id, dtype=torch.long)
        for row, request in enumerate(requests):
            start = int(prompt_starts[row])
            tokens[row, start: start + len(request.prompt)] = torch.tensor(request.prompt)
        attention_mask = None
        if bool((prompt_starts > 0).any()):
            # Megatron masks are True where attention is forbidden: causal, plus the left padding of each row.
            is_pad = torch.arange(total).unsqueeze(0) < prompt_starts.unsqueeze(1)
            attention_mask = (torch.ones(total, total, dtype=torch.bool).triu(1).unsqueeze(0)
                              | is_pad.unsqueeze(1)).unsqueeze(1)
            # A row's padding must still attend somewhere (softmax over nothing is NaN): let pads see themselves.
            attention_mask &= ~torch.eye(total, dtype=torch.bool)
        device = current_device()
        inference_input = {"tokens": tokens.to(device), "position_ids": torch.arange(total).expand(batch, -1),
                           "attention_mask": None if attention_mask is None else attention_mask.to(device)}

        temperatures = torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=device)
        row_seeds = torch.tensor([r.seed for r in requests], dtype=torch.int64, device=device)
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
        prefill_input = {name: None if value is None else value[torch.tensor(first_rows)]
                         for name, value in inference_input.items()}

        wrapper = self._wrapper(batch, total)
        with sequence_parallel_disabled(self.model), config_overrides(self.stage.config, **decode_overrides()):
            wrapper.prep_model_for_inference()
            logits = wrapper.run_one_forward_step(wrapper.get_batch_for_context_window(prefill_input, 0, prefill_end))
            with torch.inference_mode():  # the cache was allocated in the wrapper's inference mode
                for key_memory, value_memory in wrapper.inference_context.key_value_memory_dict.values():
                    key_memory[:, :batch] = key_memory[:, source]
                    value_memory[:, :batch] = value_memory[:, source]
            logits = None if logits is None else logits[source.to(logits.device)]
            for position in range(prefill_end, total):
                if position > prefill_end:
                    window = wrapper.get_batch_for_context_window(inference_input, position - 1, position)
                    logits = wrapper.run_one_forward_step(window)
                step = position - response_starts  # index of this column's token in each row's response
                sampling = (step >= 0) & ~finished
                sampled = torch.empty(batch, 2, device=device)
                if parallel_state.is_pipeline_last_stage():
                    token, token_log_prob = sample_tokens(logits[:, -1], temperatures, row_seeds,
                                                          step.clamp(min=0).to(device),
                                                          vocab_size=self.arch.vocab_size)
                    sampled = torch.stack([token.float(), token_log_prob], dim=1)
                sampled = broadcast_from_last_pipeline_stage([batch, 2], torch.float32, sampled).cpu()
                token = sampled[:, 0].long()
                # Rows still inside their prompt keep its token; finished rows emit padding.
                token = torch.where(step < 0, tokens[:, position],
                                    torch.where(sampling, token, torch.full_like(token, self.pad_token_id)))
                tokens[:, position] = token
                inference_input["tokens"][:, position] = token.to(device)
                log_probs[sampling, step[sampling]] = sampled[sampling, 1]
                lengths += sampling.long()
                finished |= sampling & torch.isin(token, self.eos_token_ids)
                if bool((finished | (step >= max_new_tokens - 1)).all()):
                    break
        return [
            Rollout(response=tokens[row, int(response_starts[row]): int(response_starts[row]) + int(lengths[row])
                                    ].tolist(),
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
