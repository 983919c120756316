"""Model families: HF config ↔ :class:`ModelArchitecture`, state-dict adapters, and the Megatron-Core builder."""
from __future__ import annotations

import json
from pathlib import Path

from . import llama, qwen2, qwen3
from .config import ModelArchitecture, UnsupportedModelError

_FAMILIES = {module.__name__.rsplit(".", 1)[-1]: module for module in (llama, qwen2, qwen3)}
_BY_HF_ARCHITECTURE = {name: module for module in _FAMILIES.values() for name in module.HF_ARCHITECTURES}


def architecture_from_hf_config(hf_config: dict) -> ModelArchitecture:
    names = hf_config.get("architectures") or []
    family = _BY_HF_ARCHITECTURE.get(names[0]) if names else None
    if family is None:
        raise UnsupportedModelError(
            f"unknown architecture {names or hf_config.get('model_type')!r}; supported: {sorted(_BY_HF_ARCHITECTURE)}"
        )
    return family.architecture_from_hf(hf_config)


def architecture_from_hf_dir(hf_dir: str | Path) -> ModelArchitecture:
    config_path = Path(hf_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a Hugging Face model folder")
    return architecture_from_hf_config(json.loads(config_path.read_text()))


def hf_config_from_architecture(arch: ModelArchitecture) -> dict:
    return _FAMILIES[arch.family].hf_config_from_architecture(arch)


__all__ = ["ModelArchitecture", "UnsupportedModelError", "architecture_from_hf_config", "architecture_from_hf_dir",
           "hf_config_from_architecture"]
