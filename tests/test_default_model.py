"""The embedded default model: build-once cache semantics, the tokenizer fast path and (slow) the full folder."""
import json

import pytest

from megatron_grace import default_model
from megatron_grace.default_model import COMPLETE_MARKER


def test_materialise_builds_once_and_marks_complete(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        (out / "weights.bin").write_text("w")

    target = tmp_path / "model"
    assert default_model._materialise(target, build) == target
    assert default_model._materialise(target, build) == target
    assert len(calls) == 1
    assert (target / "weights.bin").read_text() == "w"
    assert json.loads((target / COMPLETE_MARKER).read_text())["gguf_sha256"] == default_model.GGUF_SHA256


def test_materialise_rebuilds_a_half_written_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("left over by a killed run")
    default_model._materialise(target, lambda out: (out / "weights.bin").write_text("w"))
    assert sorted(p.name for p in target.iterdir()) == sorted([COMPLETE_MARKER, "weights.bin"])


def test_failed_build_leaves_nothing_behind(tmp_path):
    def build(out):
        (out / "partial.bin").write_text("p")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        default_model._materialise(tmp_path / "model", build)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_tokenizer_folder(smollm2_tokenizer_dir, smollm2_tokenizer):
    assert (smollm2_tokenizer_dir / COMPLETE_MARKER).is_file()
    assert smollm2_tokenizer.is_fast
    assert (smollm2_tokenizer.eos_token, smollm2_tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert smollm2_tokenizer.model_max_length == 8192
    # Upstream SmolLM2 ids for these words; no BOS is added (SmolLM2 adds none).
    assert smollm2_tokenizer("Hello world")["input_ids"] == [19556, 905]
    rendered = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_default_model_folder_loads_and_answers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model.default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.rms_norm_eps == 1e-5
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])
