"""The real default model (SmolLM2-135M-Instruct, 30 layers) gives the same logits in Megatron-Core as in HF
transformers: fp32 (the folder's bf16 weights upcast for both), TP1PP1, a few chat prompts of different lengths.
The tiny-model tests cover the other layouts; this one catches what only a full-size model shows (30 layers of
accumulated rounding, 9 heads in 3 KV groups, rope theta 1e5, the real vocabulary with tied embeddings)."""
import pytest
import torch

PROMPTS = ["What is the capital of France?",
           "Write one sentence about the ocean.",
           "Define the word 'ephemeral' and use it in an example sentence about summer evenings by the lake."]
# Measured: 0.0 here (the CPU kernels happen to round identically); the margin is for other BLAS builds and GPUs.
TOLERANCE = 1e-4


@pytest.mark.slow
def test_megatron_logits_match_hf_for_the_default_model(record_property):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_grace.default_model import default_model_dir
    from megatron_grace.models.builder import build_gpt_model, make_transformer_config
    from megatron_grace.models.hf_io import load_hf_model, load_hf_weights
    from megatron_grace.platform import ParallelLayout, destroy_distributed, initialize_distributed

    folder = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    initialize_distributed(ParallelLayout())
    try:
        arch, hf_state = load_hf_model(folder)
        model = build_gpt_model(arch, make_transformer_config(arch, params_dtype=torch.float32)).eval()
        load_hf_weights(model, hf_state, arch)
        max_abs_diff = 0.0
        for prompt in PROMPTS:
            tokens = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)["input_ids"]
            positions = torch.arange(tokens.shape[1]).unsqueeze(0)
            with torch.no_grad():
                expected = hf_model(input_ids=tokens).logits
                actual = model(tokens, positions, attention_mask=None)[..., : arch.vocab_size]
            assert torch.equal(actual.argmax(-1), expected.argmax(-1)), prompt
            max_abs_diff = max(max_abs_diff, (actual - expected).abs().max().item())
    finally:
        destroy_distributed()
    record_property("logits_max_abs_diff", max_abs_diff)
    print(f"SmolLM2-135M fp32 logits max abs diff vs HF: {max_abs_diff:.2e}")
    assert max_abs_diff <= TOLERANCE
