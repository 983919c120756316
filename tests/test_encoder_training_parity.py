"""The inference-time encoder embeds exactly like training: for the same tokens, GraceEncoder's pooled embedding
(HF transformers forward) equals the pooled embedding of the Megatron one-pass forward (fp32, ≤ 1e-5 absolute)."""
import pytest
import torch

from megatron_grace.data.prompts import PromptBuilder
from megatron_grace.eval.encoder import GraceEncoder
from megatron_grace.grpo.experience import SequenceBatch, one_pass_forward
from megatron_grace.models import architecture_from_hf_dir
from megatron_grace.models.builder import build_gpt_model, make_transformer_config
from megatron_grace.models.hf_io import load_hf_weights
from megatron_grace.platform import ParallelLayout, destroy_distributed, initialize_distributed
from megatron_grace.rollout import Rollout
from megatron_grace.testing import save_tiny_hf_model


# 49152: the tokenizer's vocabulary; 49229: padded for TP (padded rows excluded from the log-probs).
@pytest.mark.parametrize("vocab_size", [49152, 49229])
def test_encoder_pooling_equals_training_pooling(tmp_path, smollm2_tokenizer_dir, vocab_size):
    hf_dir = save_tiny_hf_model("qwen3", tmp_path / "tiny", smollm2_tokenizer_dir, vocab_size=vocab_size)
    encoder = GraceEncoder.from_pretrained(hf_dir, device="cpu", dtype=torch.float32)
    builder = PromptBuilder(encoder.tokenizer)
    prompts = [builder.build(text) for text in ("a short text", "a somewhat longer text about graphs and trees")]
    rollouts = [Rollout([100, 200, 300, 2], [0.0] * 4, False), Rollout([7, 8], [0.0] * 2, True)]

    expected = encoder.pool_token_ids([p.input_ids + r.response for p, r in zip(prompts, rollouts)],
                                      [p.pool_start for p in prompts])
    initialize_distributed(ParallelLayout())
    try:
        arch = architecture_from_hf_dir(hf_dir)
        model = build_gpt_model(arch, make_transformer_config(arch))
        load_hf_weights(model, hf_dir, arch)
        batch = SequenceBatch.build(prompts, rollouts, pad_token_id=encoder.pad_token_id)
        pooled = one_pass_forward(model, batch, micro_batch_size=2).embeddings
    finally:
        destroy_distributed()
    assert pooled.shape == expected.shape == (2, arch.hidden_size)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)
