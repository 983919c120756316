"""tools/convert_hf.py: HF → Megatron → HF round trips bit-identically for every family, and bad input gets a clear
error naming the file, tensor or flag."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_grace.testing import FAMILIES, save_tiny_hf_model
from tools.convert_hf import main as convert


def _convert_expecting_error(argv) -> str:
    with pytest.raises(SystemExit) as raised:
        convert(argv)
    return str(raised.value.code)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_identical(family, tmp_path, smollm2_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = save_tiny_hf_model(family, tmp_path / "hf", smollm2_tokenizer_dir, dtype=torch.bfloat16)
    convert(["hf-to-mcore", "--hf-path", str(source), "--save", str(tmp_path / "mcore")])
    convert(["mcore-to-hf", "--load", str(tmp_path / "mcore"), "--save", str(tmp_path / "back")])
    original, exported = load_file(source / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    # Tied models may store no lm_head; the export never writes one for them.
    assert set(exported) == set(original) - ({"lm_head.weight"} if family != "qwen3" else set())
    for name, tensor in exported.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor.view(torch.int16),
                                                              original[name].view(torch.int16)), name
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "back" / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert type(model).__name__ == json.loads((source / "config.json").read_text())["architectures"][0]
    assert AutoTokenizer.from_pretrained(tmp_path / "back").apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)


def test_sharded_export_loads(tmp_path, smollm2_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    source = save_tiny_hf_model("qwen3", tmp_path / "hf", smollm2_tokenizer_dir)
    convert(["hf-to-mcore", "--hf-path", str(source), "--save", str(tmp_path / "mcore")])
    convert(["mcore-to-hf", "--load", str(tmp_path / "mcore"), "--save", str(tmp_path / "back"),
             "--max-shard-size-gb", "0.005"])
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "back").glob("model-*.safetensors"))) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    original = load_file(source / "model.safetensors")
    for name, tensor in original.items():
        assert torch.equal(reloaded[name], tensor), name


def test_clear_errors(tmp_path, smollm2_tokenizer_dir):
    source = save_tiny_hf_model("llama", tmp_path / "hf", smollm2_tokenizer_dir)

    message = _convert_expecting_error(["hf-to-mcore", "--hf-path", str(tmp_path / "nowhere"),
                                        "--save", str(tmp_path / "m0")])
    assert "config.json" in message and "nowhere" in message

    config = json.loads((source / "config.json").read_text())
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    assert "unknown architecture" in _convert_expecting_error(
        ["hf-to-mcore", "--hf-path", str(unknown), "--save", str(tmp_path / "m1")])

    weights = load_file(source / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"] = weights["model.layers.1.mlp.down_proj.weight"][:, :-1].contiguous()
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    message = _convert_expecting_error(["hf-to-mcore", "--hf-path", str(source), "--save", str(tmp_path / "m2")])
    assert "model.layers.1.mlp.down_proj.weight" in message and "shape" in message

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    message = _convert_expecting_error(["hf-to-mcore", "--hf-path", str(source), "--save", str(occupied)])
    assert "--overwrite" in message and (occupied / "keep.txt").is_file()

    assert "no checkpoint" in _convert_expecting_error(
        ["mcore-to-hf", "--load", str(tmp_path / "empty"), "--save", str(tmp_path / "h")])
