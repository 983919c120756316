"""Rollouts on every layer spec (tiny Qwen3, fp32, TP1, one process).

* A row gives the same tokens alone as in a batch of prompts of other lengths, with our SDPA core attention (applies
  the left-padding mask) and with an attention that drops the mask for the causal and no-mask types the way
  Transformer Engine's ``DotProductAttention`` does: there rollouts must never put a pad before a real token.
  Log-probs alone vs batched: ≤ 1e-5 absolute.
* The sampling log-probs of the T=1 rows equal the one-pass forward's (training's ``logprob_mismatch``) to ≤ 1e-4 on
  both specs (measured: ≤ 1e-6).
* Decoding rotates one position of keys per layer and token (they enter the KV cache rotated), not the whole cache.
* Sync-free decode: the host reads device values once per ``sync_interval`` decoded tokens (the finished flags) plus
  three reads of the results, counted with :class:`~megatron_grace.testing.HostReadCounter`.
* Finished-row compaction (EOS forced at chosen response steps): tokens identical with and without compaction and
  at any sync interval; log-probs ≤ 1e-6 (the forward's batch shrinks, so GEMM blocking may change the last bits);
  rows per decode forward fall as rows finish.
* After a rollout, a training forward + backward of the same width works with a RoPE that saves its frequencies for
  backward as TE's fused RoPE does (Megatron's RoPE ``lru_cache`` would hand it the rollout's inference tensors).
"""
import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer.enums import AttnMaskType

from megatron_grace.config import RolloutConfig
from megatron_grace.data.prompts import Prompt
from megatron_grace.grpo.experience import SequenceBatch, one_pass_forward
from megatron_grace.models import architecture_from_hf_config
from megatron_grace.models.builder import build_gpt_model, make_transformer_config
from megatron_grace.models.hf_io import load_hf_weights
from megatron_grace.models.layers import SDPAttention
from megatron_grace.platform import ParallelLayout, destroy_distributed, initialize_distributed
from megatron_grace.rollout import RolloutEngine, RolloutRequest
from megatron_grace.kernels.sample_tokens import row_seed
from megatron_grace.kernels import sample_tokens
from megatron_grace.testing import HostReadCounter, sampler_ending_rows, tiny_hf_model

EOS = 2
MAX_NEW_TOKENS = 12


class MaskDroppingAttention(SDPAttention):
    """Ignores the boolean mask for the causal and no-mask types, as Transformer Engine's attention does."""

    honours_attention_mask = False

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if mask_type in (AttnMaskType.causal, AttnMaskType.no_mask):
            attention_mask = None
        return super().forward(query, key, value, attention_mask, attn_mask_type=mask_type, **kwargs)


@pytest.fixture(scope="module")
def model():
    initialize_distributed(ParallelLayout())
    hf_model = tiny_hf_model("qwen3", eos_token_id=EOS, eos_logit_scale=50.0, vocab_size=512)
    arch = architecture_from_hf_config({**hf_model.config.to_dict(), "architectures": ["Qwen3ForCausalLM"]})
    stage = build_gpt_model(arch, make_transformer_config(arch))
    load_hf_weights(stage, hf_model.state_dict(), arch)
    yield stage
    destroy_distributed()


def with_core_attention(stage, attention_class):
    for layer in stage.decoder.layers:
        attention = layer.self_attention
        attention.core_attention = attention_class(stage.config, layer.layer_number,
                                                   attention.core_attention.attn_mask_type, "self")


def requests() -> list[RolloutRequest]:
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (length,), generator=generator).tolist() for length in (5, 11, 8, 14)]
    rows = [(prompts[0], 1.0), (prompts[0], 1.0), (prompts[1], 1.0), (prompts[2], 0.5), (prompts[3], 1.0)]
    return [RolloutRequest(prompt, temperature, row_seed(1234, 0, sample_id=row, rollout_index=0))
            for row, (prompt, temperature) in enumerate(rows)]


@pytest.fixture(params=["sdpa", "mask-dropping"])
def spec(request, model):
    with_core_attention(model, SDPAttention if request.param == "sdpa" else MaskDroppingAttention)
    yield request.param
    with_core_attention(model, SDPAttention)


def test_rows_sample_the_same_alone_and_in_a_batch(model, spec):
    engine = RolloutEngine(model, RolloutConfig(), eos_token_ids=[EOS], pad_token_id=0)
    batched = engine.generate(requests(), MAX_NEW_TOKENS)
    assert any(r.truncated for r in batched) and any(not r.truncated for r in batched)
    for request, together in zip(requests(), batched):
        alone, = engine.generate([request], MAX_NEW_TOKENS)
        assert alone.response == together.response
        assert alone.truncated == together.truncated
        torch.testing.assert_close(torch.tensor(alone.log_probs), torch.tensor(together.log_probs), rtol=0, atol=1e-5)


def test_sampling_log_probs_equal_the_one_pass_forward(model, spec):
    engine = RolloutEngine(model, RolloutConfig(), eos_token_ids=[EOS], pad_token_id=0)
    rollouts = engine.generate(requests(), MAX_NEW_TOKENS)
    batch = SequenceBatch.build([Prompt(r.prompt, 0) for r in requests()], rollouts, pad_token_id=0)
    old_log_probs = one_pass_forward(model, batch, micro_batch_size=5).old_log_probs
    # The forward scores at T=1, so compare the T=1 rows (training's metric covers the main rows, all at T=1).
    at_t1 = torch.tensor([r.temperature == 1.0 for r in requests()])
    mask = batch.response_target_mask() & at_t1.unsqueeze(1)
    sampled = torch.cat([torch.tensor(r.log_probs) for r, keep in zip(rollouts, at_t1) if keep])
    mismatch = (old_log_probs[mask] - sampled).abs()
    assert mismatch.numel() == sum(len(r.response) for r, keep in zip(rollouts, at_t1) if keep) > 0
    assert float(mismatch.max()) < 1e-4, float(mismatch.max())


class _RotationSavingFrequencies(torch.autograd.Function):
    """A fused RoPE that saves its frequencies for backward, as Transformer Engine's does."""

    @staticmethod
    def forward(ctx, t, freqs):
        ctx.save_for_backward(freqs)
        return rope_utils._apply_rotary_pos_emb_bshd(t, freqs)

    @staticmethod
    def backward(ctx, grad):
        freqs, = ctx.saved_tensors
        return rope_utils._apply_rotary_pos_emb_bshd(grad, -freqs), None  # R(θ)ᵀ = R(-θ)


def test_update_after_rollout_with_a_rope_that_saves_its_frequencies(model, monkeypatch):
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb",
                        lambda t, freqs, **unused: _RotationSavingFrequencies.apply(t, freqs))
    rows = requests()
    RolloutEngine(model, RolloutConfig(), eos_token_ids=[EOS], pad_token_id=0).generate(rows, MAX_NEW_TOKENS)
    width = max(len(r.prompt) for r in rows) + MAX_NEW_TOKENS  # the rollout's sequence length
    tokens = torch.randint(3, 512, (2, width), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(width).expand(2, -1)
    losses = model(tokens, positions, None, labels=torch.roll(tokens, -1, dims=1))
    losses.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)


def test_decode_rotates_only_the_new_keys(model, monkeypatch):
    """Keys enter the KV cache rotated (:class:`~megatron_grace.models.layers.RotatedKeyCacheSelfAttention`): after
    the prefill, each layer rotates one position of queries and one of keys per decoded token, never the cache."""
    rotated_positions = []
    real = rope_utils.fused_apply_rotary_pos_emb

    def counting(t, freqs, **kwargs):
        rotated_positions.append(t.shape[0])
        return real(t, freqs, **kwargs)

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", counting)
    engine = RolloutEngine(model, RolloutConfig(rollout_decode_step="megatron"), eos_token_ids=[EOS], pad_token_id=0,
                           compact_finished_rows=False)  # our decode step rotates each new key itself (no Megatron RoPE)
    rows = requests()
    engine.generate(rows, MAX_NEW_TOKENS)
    layers, prompt_width = len(model.decoder.layers), max(len(r.prompt) for r in rows)
    prefill, decode = rotated_positions[: 2 * layers], rotated_positions[2 * layers:]
    assert prefill == [prompt_width] * (2 * layers)  # queries and keys of the prompt columns
    assert decode == [1] * (2 * layers * engine.stats.positions)


@pytest.mark.parametrize("sync_interval", [1, 4, 100])
def test_host_reads_once_per_sync_interval(model, sync_interval):
    engine = RolloutEngine(model, RolloutConfig(rollout_sync_interval=sync_interval), eos_token_ids=[EOS],
                           pad_token_id=0)
    rows = requests()
    with HostReadCounter() as counter:
        rollouts = engine.generate(rows, MAX_NEW_TOKENS)
    stats = engine.stats
    decoded = stats.positions + 1  # the prefill's logits give the first token
    assert max(len(r.response) for r in rollouts) == MAX_NEW_TOKENS
    assert stats.host_reads == -(-decoded // sync_interval)
    # The finished checks, then lengths, tokens and log-probs once each at the end; nothing per token.
    assert counter.reads == {"tolist": stats.host_reads + 3}, counter.reads


def forcing_eos_at(steps_by_seed: dict[int, int]):
    """A sample_tokens that returns EOS for the row of seed s at response index steps_by_seed[s]."""
    return sampler_ending_rows(sample_tokens, torch.tensor(list(steps_by_seed), dtype=torch.int64),
                               torch.tensor(list(steps_by_seed.values()), dtype=torch.int64), EOS)


@pytest.mark.parametrize("decode", ["ours", "megatron"])
def test_finished_rows_leave_the_batch_without_changing_a_token(model, decode):
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (length,), generator=generator).tolist() for length in (6, 9, 7, 12)]
    rows = [RolloutRequest(prompts[row % 4], 1.0 if row < 6 else 0.5, row_seed(99, 1, sample_id=row, rollout_index=0))
            for row in range(8)]
    forced = forcing_eos_at({r.seed: step for r, step in zip(rows, (0, 2, 3, 5, 7, 9))})
    max_new = 16
    results = {}
    for compact, interval in ((False, 1), (True, 1), (True, 2), (True, 5)):
        engine = RolloutEngine(model, RolloutConfig(rollout_sync_interval=interval, rollout_decode_step=decode),
                               eos_token_ids=[EOS], pad_token_id=0, compact_finished_rows=compact)
        engine.sampler = forced
        results[compact, interval] = (engine.generate(rows, max_new), engine.stats)
    reference, reference_stats = results[False, 1]
    lengths = [len(r.response) for r in reference]
    # The forced EOS ends a row at the latest (the model's own EOS may come first); rows end at several steps.
    assert all(length <= step + 1 for length, step in zip(lengths, (0, 2, 3, 5, 7, 9)))
    assert len(set(lengths)) >= 4, lengths
    assert reference_stats.forward_rows == [8] * reference_stats.positions
    for (compact, interval), (rollouts, stats) in results.items():
        for ours, expected in zip(rollouts, reference):
            assert ours.response == expected.response and ours.truncated == expected.truncated
            torch.testing.assert_close(torch.tensor(ours.log_probs), torch.tensor(expected.log_probs),
                                       rtol=0, atol=1e-6)
        if compact:
            rows_per_forward = stats.forward_rows
            assert rows_per_forward == sorted(rows_per_forward, reverse=True)
            assert rows_per_forward[-1] < 8 and sum(rows_per_forward) < 8 * stats.positions
    # Interval 1 drops each row right after its EOS: the forward rows count the rows still decoding.
    ended_after = [len(r.response) if not r.truncated else max_new for r in reference]
    expected_rows = [sum(end > decoded for end in ended_after) for decoded in range(1, reference_stats.positions + 1)]
    assert results[True, 1][1].forward_rows == expected_rows
