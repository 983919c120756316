"""Reading and writing Hugging Face model folders (config.json, safetensors shards, tokenizer, generation config)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import architecture_from_hf_dir, hf_config_from_architecture
from .config import ModelArchitecture
from .state_dict import hf_to_mcore, load_global_state_into_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "added_tokens.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def load_hf_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder, single-file or sharded safetensors."""
    hf_dir = Path(hf_dir)
    index = hf_dir / SAFETENSORS_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(path.name for path in hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {hf_dir} (PyTorch .bin checkpoints are not supported)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = hf_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {index.name} but missing")
        state.update(load_file(str(path)))
    return state


def load_hf_model(hf_dir: str | Path) -> tuple[ModelArchitecture, dict[str, torch.Tensor]]:
    return architecture_from_hf_dir(hf_dir), load_hf_state_dict(hf_dir)


def load_hf_weights(model: torch.nn.Module, source: str | Path | dict[str, torch.Tensor],
                    arch: ModelArchitecture) -> None:
    """Load Hugging Face weights (a folder, or a state dict with HF names) into this rank's stage of a Megatron model
    at any TP/PP layout and either layer spec: HF → Megatron names, fused QKV and gate/up, this rank's shards, cast to
    the parameters' dtype. Training, conversion, benchmarks and tests all load HF weights through here."""
    state = source if isinstance(source, dict) else load_hf_state_dict(source)
    load_global_state_into_model(model, hf_to_mcore(state, arch))


def save_hf_model(save_dir: str | Path, arch: ModelArchitecture, state: dict[str, torch.Tensor], *,
                  tokenizer_dir: str | Path | None = None, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write an HF folder that ``AutoModelForCausalLM.from_pretrained`` loads (shards above ``max_shard_bytes``)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name in sorted(state):
        size = state[name].numel() * state[name].element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = state[name].contiguous()
        shard_bytes += size
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(save_dir / "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(save_dir / file_name), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, file_name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        (save_dir / SAFETENSORS_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = hf_config_from_architecture(arch)
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (save_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id, "do_sample": True}
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "generation_config.json").is_file():
        generation = json.loads((Path(tokenizer_dir) / "generation_config.json").read_text())
    (save_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer_dir is not None:
        copied = [name for name in TOKENIZER_FILES if (Path(tokenizer_dir) / name).is_file()]
        if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
            raise FileNotFoundError(f"no tokenizer files in {tokenizer_dir}")
        for name in copied:
            shutil.copy2(Path(tokenizer_dir) / name, save_dir / name)


def eos_token_ids(hf_dir: str | Path, tokenizer, arch: ModelArchitecture) -> list[int]:
    """End-of-response ids: the generation config's (chat models end turns with it), the config's and the
    tokenizer's."""
    ids: set[int] = set()
    generation_config = Path(hf_dir) / "generation_config.json"
    sources = [arch.eos_token_id, tokenizer.eos_token_id]
    if generation_config.is_file():
        sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    if not ids:
        raise ValueError(f"no EOS token id in {hf_dir} (config, generation_config or tokenizer)")
    return sorted(ids)
