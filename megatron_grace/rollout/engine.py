"""Rollouts: sampling rationales from the policy itself.

The policy's own GPTModel stage runs generation at its training TP/PP layout. The prefill goes through Megatron-Core's
``GPTInferenceWrapper`` (pipeline send/receive, without its tensor-parallel logit gathering: sampling is
vocabulary-parallel) and a ``StaticInferenceContext``; decoding runs our step on a static KV cache
(:mod:`.decode_step`, one CUDA graph per row bucket on GPUs: :mod:`.cuda_graphs`), or, under pipeline parallelism,
Megatron's wrapper again. No second copy of the weights exists and nothing is synchronised. The loop is written for
GRPO, which is what Megatron-Core's generic text-generation controller does not give cheaply:

* one prefill for the whole batch, of each distinct prompt once: the ``--rollout-n`` rows of a group share the
  prompt's KV cache. Where the attention applies masks (our SDPA core attention), prompts are left-padded and the
  prefill covers them whole (RoPE scores depend on relative positions only, so the shift does not change the
  attention). Where it ignores them (Transformer Engine's causal/no-mask attention), no pad ever precedes a real
  token: the prefill covers the shortest prompt and longer prompts are fed token by token while the others sample
  (Megatron's own static engine does the same), so a row gives the same tokens alone as in any batch on every spec;
* a temperature per row, so the T=1.0 main rollouts and the T=0.5 query/negative rationales share one batch;
* counter-based sampling noise (:func:`~megatron_grace.kernels.sample_tokens`), a pure function of the row's seed
  ``(seed, step, sample id, rollout index)``, the token's index in the response and the vocabulary id: the tokens of a
  row do not depend on batch composition, layout, data-parallel size, resume point, sync interval or compaction;
* a decode loop without per-token host reads, whose finished rows leave the batch (:class:`RolloutEngine`);
* the sampling log-probability of every token (for the train/inference mismatch metric) and the truncation flag.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.inference.communication_utils import broadcast_from_last_pipeline_stage
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from ..config import RolloutConfig
from ..kernels import sample_tokens
from ..models import rope
from ..models.builder import config_overrides
from ..platform import current_device, has_cuda
from ..utils import unwrap
from .cuda_graphs import BucketGraphs, capture_cuda_graph
from .decode_step import KVCache, decode_step, stage_weights, unsupported_reason


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


class VocabParallelInferenceWrapper(GPTInferenceWrapper):
    """Megatron's GPT inference wrapper (pipeline send/receive, KV cache) without the vocabulary all-gather: the
    last stage returns this rank's shard of the last position's logits, [rows, 1, V/TP], and sampling combines the
    shards (:func:`~megatron_grace.kernels.sample_tokens` with the TP group)."""

    def _forward(self, inference_input):
        return self.model(inference_input["tokens"], inference_input["position_ids"],
                          inference_input["attention_mask"], inference_context=self.inference_context,
                          runtime_gather_output=False)


@dataclass
class DecodeStats:
    """What the last :meth:`RolloutEngine.generate` call did (benchmarks and tests read it)."""

    positions: int = 0  # decode forward passes after the prefill
    forward_rows: list[int] = field(default_factory=list)  # rows in each decode forward (a bucket's, when graphed)
    host_reads: int = 0  # finished checks (one device-to-host read each)
    decode_step: str = ""  # "ours" or "megatron"
    graphed_buckets: list[int] = field(default_factory=list)  # row buckets replayed from a CUDA graph
    kv_cache_bytes: int = 0


@dataclass
class RolloutResults:
    """Per request, on the device, written by index so that compaction never moves them; one extra scratch row
    takes the writes of a bucket's padding rows."""

    responses: torch.Tensor  # [requests + 1, max_new_tokens]
    log_probs: torch.Tensor
    lengths: torch.Tensor  # [requests + 1]

    @classmethod
    def allocate(cls, requests: int, max_new_tokens: int, device) -> "RolloutResults":
        return cls(torch.zeros(requests + 1, max_new_tokens, dtype=torch.long, device=device),
                   torch.zeros(requests + 1, max_new_tokens, dtype=torch.float32, device=device),
                   torch.zeros(requests + 1, dtype=torch.long, device=device))


@dataclass(frozen=True)
class SamplingSetup:
    """What the sampler needs besides the rows: the vocabulary shard, the stop tokens and the response budget."""

    vocab_size: int
    vocab_start: int
    tp_group: object
    eos_ids: torch.Tensor
    pad_token_id: int
    max_new_tokens: int


def draw(live: dict, logits: torch.Tensor, column: torch.Tensor, setup: SamplingSetup, sampler=sample_tokens):
    """Each live row's sampled token for ``column`` and its log-probability (rows still in their prompt draw at
    response index 0; :func:`sample_and_record` keeps their prompt token)."""
    step = (column - live["response_starts"]).clamp(min=0)
    return sampler(logits, live["temperatures"], live["row_seeds"], step, vocab_size=setup.vocab_size,
                   vocab_start=setup.vocab_start, group=setup.tp_group)


def sample_and_record(live: dict, logits: torch.Tensor | None, column: torch.Tensor, results: RolloutResults,
                      setup: SamplingSetup, *, sampler=sample_tokens, sampled: torch.Tensor | None = None):
    """The sampler inside the step, with device ops of static shapes only: :func:`draw` each live row's token for
    ``column`` (or take ``sampled`` [rows, 2], tokens and log-probs another pipeline stage drew), keep prompt
    tokens for rows still inside their prompt, emit padding for done rows, record tokens, log-probs and lengths of
    the sampling rows, and mark rows done at EOS or at the length cap. Returns the column's tokens [rows]."""
    step = column - live["response_starts"]  # index of this column's token in each row's response
    sampling = (step >= 0) & ~live["done"]
    if sampled is None:
        token, log_prob = draw(live, logits, column, setup, sampler)
    else:
        token, log_prob = sampled[:, 0].long(), sampled[:, 1]
    prompt_token = live["tokens"].gather(1, column.clamp(max=live["tokens"].shape[1] - 1).unsqueeze(1)).squeeze(1)
    token = torch.where(step < 0, prompt_token, torch.where(sampling, token, setup.pad_token_id))
    # Non-sampling rows write back what is there, so every write has a static shape and no host read selects rows.
    index = (live["rows"], step.clamp(0, setup.max_new_tokens - 1))
    results.responses[index] = torch.where(sampling, token, results.responses[index])
    results.log_probs[index] = torch.where(sampling, log_prob.float(), results.log_probs[index])
    results.lengths[live["rows"]] = torch.where(sampling, step + 1, results.lengths[live["rows"]])
    finished = (token.unsqueeze(1) == setup.eos_ids).any(dim=1) | (step >= setup.max_new_tokens - 1)
    live["done"] |= sampling & finished
    return token


def row_buckets(rows: int) -> list[int]:
    """Row counts a decode step runs at: powers of two below ``rows``, and ``rows`` itself."""
    return sorted({1 << k for k in range(max(rows - 1, 1).bit_length()) if 1 << k < rows} | {rows})


class RolloutEngine:
    """Samples rollouts from the policy stage it is given (see the module docstring).

    The decode loop keeps every per-row tensor on the device: tokens are sampled vocabulary-parallel where the logits
    are, written into device buffers, and the host learns which rows finished only every ``sync_interval`` tokens
    (one read of [rows] flags). Rows that finish in between emit padding until then; those tokens are cut. At each
    such check, with ``compact_finished_rows``, finished rows leave the batch: the KV cache, tokens, seeds and
    positions of the live rows move to the front and decoding continues on fewer rows. Sampling noise is a function
    of the row's seed and response index only, so compaction and the interval never change a token.

    ``--rollout-decode-step ours`` (the default where it applies: one pipeline stage) decodes with
    :func:`~megatron_grace.rollout.decode_step.decode_step` on a static KV cache, in row buckets (powers of two), each
    a CUDA graph on GPUs with ``--rollout-cuda-graphs``; ``megatron`` (and any pipeline-parallel layout) decodes through
    Megatron-Core's inference wrapper. The prefill runs on the Megatron forward either way.
    """

    def __init__(self, model, rollout: RolloutConfig, *, eos_token_ids: list[int], pad_token_id: int,
                 compact_finished_rows: bool = True):
        """``rollout``: the flags' group (sync interval, decode step, CUDA graphs); ``compact_finished_rows`` off
        only in tests that compare against a loop that keeps every row."""
        sync_interval, decode_step = rollout.rollout_sync_interval, rollout.rollout_decode_step
        if sync_interval < 1:
            raise ValueError(f"--rollout-sync-interval must be >= 1, got {sync_interval}")
        if decode_step not in ("ours", "megatron"):
            raise ValueError(f"--rollout-decode-step must be 'ours' or 'megatron', got {decode_step!r}")
        self.model = model
        self.stage = unwrap(model)
        self.arch = self.stage.arch
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.pad_token_id = pad_token_id
        self.sync_interval = sync_interval
        self.compact_finished_rows = compact_finished_rows
        self.decode_step = decode_step
        self.cuda_graphs = rollout.rollout_cuda_graphs
        self.sampler = sample_tokens
        # CUDA graphs where the policy is on a GPU; tests put an emulation here to run the bucket logic on CPU.
        self.graph_capture = capture_cuda_graph if has_cuda() else None
        self.stats = DecodeStats()
        self._reported_cache_bytes = 0
        if decode_step == "ours" and (reason := unsupported_reason(model)) is not None:
            warnings.warn(f"rollouts decode through Megatron-Core: our decode step does not cover {reason}")
            self.decode_step = "megatron"

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
        device = current_device()
        # Host-side layout in Python integers (the loop below reads nothing back but the finished flags).
        prompt_lengths = [len(r.prompt) for r in requests]
        if attention_honours_padding_mask(self.stage):
            # Left padding: every prompt ends at the same column, one prefill covers all of them, and the attention
            # mask hides the pads.
            prefill_end = max(prompt_lengths)
            prompt_starts = [prefill_end - length for length in prompt_lengths]
        else:
            # No pad before a real token (for attention that ignores masks): prompts start at column 0, the prefill
            # covers the shortest prompt, and longer prompts are fed token by token from there on, exactly where
            # the others already sample (a causal attention then only ever sees real tokens).
            prefill_end = min(prompt_lengths)
            prompt_starts = [0] * batch
        response_starts = [start + length for start, length in zip(prompt_starts, prompt_lengths)]
        total = max(response_starts) + max_new_tokens
        tokens = torch.full((batch, total), self.pad_token_id, dtype=torch.long)
        for row, request in enumerate(requests):
            tokens[row, prompt_starts[row]: response_starts[row]] = torch.tensor(request.prompt)
        attention_mask = None
        if any(start > 0 for start in prompt_starts):
            # Megatron masks are True where attention is forbidden: causal, plus the left padding of each row.
            is_pad = torch.arange(total).unsqueeze(0) < torch.tensor(prompt_starts).unsqueeze(1)
            attention_mask = (torch.ones(total, total, dtype=torch.bool).triu(1).unsqueeze(0)
                              | is_pad.unsqueeze(1)).unsqueeze(1)
            # A row's padding must still attend somewhere (softmax over nothing is NaN): let pads see themselves.
            attention_mask &= ~torch.eye(total, dtype=torch.bool)

        # Per live row, on the device (rows leave these tensors when compacted away): the wrapper's inputs, sampling
        # settings, where the prompt and the response start, whether the row is done, and which request it is.
        live = {"tokens": tokens.to(device), "position_ids": torch.arange(total, device=device).expand(batch, -1),
                "attention_mask": None if attention_mask is None else attention_mask.to(device),
                "temperatures": torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=device),
                "row_seeds": torch.tensor([r.seed for r in requests], dtype=torch.int64, device=device),
                "prompt_starts": torch.tensor(prompt_starts, device=device),
                "response_starts": torch.tensor(response_starts, device=device),
                "done": torch.zeros(batch, dtype=torch.bool, device=device),
                "rows": torch.arange(batch, device=device)}
        results = RolloutResults.allocate(batch, max_new_tokens, device)
        shard = self.arch.padded_vocab_size // parallel_state.get_tensor_model_parallel_world_size()
        setup = SamplingSetup(vocab_size=self.arch.vocab_size,
                              vocab_start=parallel_state.get_tensor_model_parallel_rank() * shard,
                              tp_group=parallel_state.get_tensor_model_parallel_group(),
                              eos_ids=torch.tensor(self.eos_token_ids or [-1], dtype=torch.long, device=device),
                              pad_token_id=self.pad_token_id, max_new_tokens=max_new_tokens)
        self.stats = DecodeStats(decode_step=self.decode_step)

        # GRPO repeats each prompt --rollout-n times: prefill every distinct prompt once, then copy its KV cache (and
        # last logits) to the rows that share it.
        distinct: dict[tuple[int, ...], int] = {}
        first_rows = []
        for row, request in enumerate(requests):
            if tuple(request.prompt) not in distinct:
                distinct[tuple(request.prompt)] = len(first_rows)
                first_rows.append(row)
        source = torch.tensor([distinct[tuple(r.prompt)] for r in requests], device=device)
        prefill_rows = torch.tensor(first_rows, device=device)
        prefill_input = {name: None if live[name] is None else live[name][prefill_rows]
                         for name in ("tokens", "position_ids", "attention_mask")}
        ours = self.decode_step == "ours"
        # Our decode keeps its own cache: Megatron's holds only the distinct prompts' prefill.
        context = StaticInferenceContext(len(first_rows), prefill_end) if ours else StaticInferenceContext(batch, total)
        wrapper = VocabParallelInferenceWrapper(self.stage, self._wrapper_config(batch, total), context)
        with sequence_parallel_disabled(self.model), config_overrides(self.stage.config, **decode_overrides()):
            wrapper.prep_model_for_inference()
            logits = wrapper.run_one_forward_step(wrapper.get_batch_for_context_window(prefill_input, 0, prefill_end))
            logits = None if logits is None else logits[source, -1]
            if ours:
                self._decode_ours(live, results, setup, logits, context, source, prefill_end, total)
            else:
                self._decode_megatron(live, results, setup, logits, wrapper, source, prefill_end, total)

        eos = set(self.eos_token_ids)
        rollouts = []
        for length, response, response_log_probs in zip(results.lengths[:batch].tolist(),
                                                        results.responses[:batch].tolist(),
                                                        results.log_probs[:batch].tolist()):
            # A response shorter than the cap ended with EOS; one of the cap's length did if its last token is EOS.
            rollouts.append(Rollout(response=response[:length], log_probs=response_log_probs[:length],
                                    truncated=response[length - 1] not in eos))
        return rollouts

    # ------------------------------------------------------------------------------------------- Megatron decode
    def _decode_megatron(self, live, results, setup, logits, wrapper, source, prefill_end, total):
        kv_cache = wrapper.inference_context.key_value_memory_dict
        with torch.inference_mode():  # the cache was allocated in the wrapper's inference mode
            for key_memory, value_memory in kv_cache.values():
                key_memory[:, : source.numel()] = key_memory[:, source]
                value_memory[:, : source.numel()] = value_memory[:, source]
        pipeline_parallel = parallel_state.get_pipeline_model_parallel_world_size() > 1
        for position in range(prefill_end, total):
            if position > prefill_end:
                window = wrapper.get_batch_for_context_window(live, position - 1, position)
                logits = wrapper.run_one_forward_step(window)
                logits = None if logits is None else logits[:, -1]
                self.stats.positions += 1
                self.stats.forward_rows.append(live["tokens"].shape[0])
            rows = live["rows"].shape[0]
            column = torch.full((rows,), position, device=live["rows"].device)
            sampled = None
            if pipeline_parallel:  # the last stage samples; ids below 2^24 are exact in float32
                if parallel_state.is_pipeline_last_stage():
                    token, log_prob = draw(live, logits, column, setup, self.sampler)
                    sampled = torch.stack([token.to(torch.float32), log_prob], dim=1)
                sampled = broadcast_from_last_pipeline_stage([rows, 2], torch.float32, sampled)
            token = sample_and_record(live, logits, column, results, setup, sampler=self.sampler, sampled=sampled)
            live["tokens"][:, position] = token
            live_rows = self._live_rows_at_check(live["done"], position, prefill_end, total)
            if live_rows is not None:
                if not live_rows:
                    break
                if self.compact_finished_rows and len(live_rows) < rows:
                    keep = torch.tensor(live_rows, device=live["rows"].device)
                    with torch.inference_mode():
                        for key_memory, value_memory in kv_cache.values():
                            key_memory[:, : keep.numel()] = key_memory[:, keep]
                            value_memory[:, : keep.numel()] = value_memory[:, keep]
                    for name, value in live.items():
                        if value is not None:
                            live[name] = value[keep]

    # ------------------------------------------------------------------------------------------- our decode
    def _decode_ours(self, live, results, setup, logits, context, source, prefill_end, total):
        """Decode with our step on a static KV cache filled from the prefill, in row buckets (CUDA graphs on GPUs)."""
        device = live["rows"].device
        batch = live["rows"].shape[0]
        weights = stage_weights(self.model, total)
        dtype = self.stage.config.params_dtype
        self.stats.kv_cache_bytes = KVCache.bytes_for(weights, batch, total, dtype)
        if self.stats.kv_cache_bytes > self._reported_cache_bytes and torch.distributed.get_rank() == 0:
            print(f"[rollout] KV cache {self.stats.kv_cache_bytes / 2**30:.2f} GiB: {len(weights.layers)} layers × "
                  f"{batch} rows × {total} positions × {weights.groups} KV heads × {weights.head_dim}", flush=True)
            self._reported_cache_bytes = self.stats.kv_cache_bytes
        cache = KVCache.allocate(weights, batch, total, dtype, device)
        for index, layer in enumerate(self.stage.decoder.layers):
            key_memory, value_memory = context.key_value_memory_dict[layer.layer_number]
            cache.keys[index, :, :prefill_end] = key_memory[:prefill_end, source].transpose(0, 1)
            cache.values[index, :, :prefill_end] = value_memory[:prefill_end, source].transpose(0, 1)
        context.key_value_memory_dict.clear()  # Megatron's prefill cache is not needed any more

        # The prefill's logits give column prefill_end; every later column is one decode step.
        live = {name: live[name] for name in ("tokens", "temperatures", "row_seeds", "prompt_starts",
                                              "response_starts", "done", "rows")}
        live["input_tokens"] = sample_and_record(live, logits, torch.full((batch,), prefill_end, device=device),
                                                 results, setup, sampler=self.sampler)
        live["positions"] = torch.full((batch,), prefill_end, device=device)  # the column of input_tokens
        graphs = BucketGraphs(lambda state, key_length: self._our_step(weights, cache, state, results, setup,
                                                                       key_length),
                              capture=self.graph_capture if self.cuda_graphs else None,
                              results=results)
        buckets = row_buckets(batch)
        state = graphs.state(batch, live, batch, filler_row=batch)
        for position in range(prefill_end, total):
            if position > prefill_end:
                graphs.run(state, key_length=position)
                self.stats.positions += 1
                self.stats.forward_rows.append(state["rows"].shape[0])
            live_rows = self._live_rows_at_check(state["done"], position, prefill_end, total)
            if live_rows is not None:
                if not live_rows:
                    break
                if self.compact_finished_rows and len(live_rows) < state["done"].shape[0]:
                    bucket = next(size for size in buckets if size >= len(live_rows))
                    keep = torch.tensor(live_rows, device=device)
                    cache.move_rows(keep, position + 1)
                    state = graphs.state(bucket, {name: value[keep] for name, value in state.items()},
                                         len(live_rows), filler_row=batch)
        self.stats.graphed_buckets = sorted(graphs.graphs)

    def _live_rows_at_check(self, done: torch.Tensor, position: int, prefill_end: int, total: int) -> list[int] | None:
        """At every ``sync_interval``-th decoded column and the last one: the rows not yet done (the loop's one
        device-to-host read); None between checks."""
        decoded = position - prefill_end + 1
        if decoded % self.sync_interval and position != total - 1:
            return None
        self.stats.host_reads += 1
        return [row for row, row_done in enumerate(done.tolist()) if not row_done]

    def _our_step(self, weights, cache, state, results, setup, key_length):
        """One decode column for the rows of ``state``, all on the device: the model step at ``positions``, then
        the sampler and the bookkeeping for the next column. ``state`` is updated in place (a graph replays it)."""
        logits = decode_step(weights, cache, state["input_tokens"], state["positions"], state["prompt_starts"],
                             key_length=key_length)
        column = state["positions"] + 1
        state["input_tokens"].copy_(sample_and_record(state, logits, column, results, setup, sampler=self.sampler))
        state["positions"].copy_(column)

    def _wrapper_config(self, batch: int, total: int) -> InferenceWrapperConfig:
        return InferenceWrapperConfig(
            hidden_size=self.arch.hidden_size,
            params_dtype=self.stage.config.params_dtype,
            inference_batch_times_seqlen_threshold=-1,  # whole batch in one PP pass: rollouts are latency bound
            padded_vocab_size=self.arch.padded_vocab_size,
            inference_max_requests=batch,
            inference_max_seq_length=total,
        )
