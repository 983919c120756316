"""Crash-safe Megatron checkpoints: ``dist_checkpointing`` model/optimizer state plus GRACE run state.

Layout (Megatron-LM conventions)::

    SAVE/latest_checkpointed_iteration.txt     written last, atomically: the newest *complete* checkpoint
    SAVE/iter_0000020/                          one checkpoint (renamed into place only once complete)
        *.distcp, metadata.json, common.pt      dist_checkpointing: model (+ optimizer), reshardable to any TP/PP
        grace_checkpoint.json                   architecture, iteration, data position, run config
        tokenizer/                              tokenizer files, so an export needs no source folder
        manifest.json                           sha256 of every file above, written before the rename

No RNG state is saved because none is needed for an exact resume: rollout sampling noise is a pure function of
(seed, step, sample, rollout, position, token) and GRACE training runs without dropout (tests/test_train.py resumes
bit-identically). A baseline that trains with dropout must add it.

A checkpoint is written into ``iter_XXXXXXX.tmp`` and renamed when every rank has finished, so a crash mid-save leaves
only a ``.tmp`` folder that no loader reads. Loading verifies the manifest first and names the bad file.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from .. import fault_injection
from ..config import CheckpointConfig
from ..models.config import ModelArchitecture
from ..utils import sha256_file, unwrap

LATEST_FILE = "latest_checkpointed_iteration.txt"
META_FILE = "grace_checkpoint.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
# Optimizer state in canonical per-parameter form, so a run resumes with its optimizer at another TP/PP/DP layout.
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    pass


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}
    _atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True))


def verify_manifest(directory: Path) -> None:
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST_FILE}; the checkpoint is incomplete")
    manifest = json.loads(manifest_path.read_text())
    for name, entry in manifest.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file missing: {path}")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"checkpoint file {path} has {path.stat().st_size} bytes, manifest says "
                                  f"{entry['bytes']} (truncated?)")
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {path} does not match its sha256 in {MANIFEST_FILE} (corrupted)")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_latest_iteration(load_dir: str | Path) -> int | None:
    latest = Path(load_dir) / LATEST_FILE
    if not latest.is_file():
        return None
    text = latest.read_text().strip()
    if text == "release":
        return 0
    if not text.isdigit():
        raise CheckpointError(f"{latest} holds {text!r}, not an iteration number")
    return int(text)


def complete_iterations(load_dir: str | Path) -> list[int]:
    """Iterations with a finished checkpoint folder (has a manifest), newest first."""
    found = []
    for path in Path(load_dir).glob("iter_*"):
        suffix = path.name[len("iter_"):]
        if suffix.isdigit() and (path / MANIFEST_FILE).is_file():
            found.append(int(suffix))
    return sorted(found, reverse=True)


def model_sharded_state_dict(model) -> dict:
    return {"model": unwrap(model).sharded_state_dict()}


def save_checkpoint(save_dir: str | Path, iteration: int, model, optimizer=None, *, arch: ModelArchitecture,
                    run_state: dict | None = None, tokenizer_dir: str | Path | None = None) -> Path:
    """Save on every rank (collective). Returns the final checkpoint folder.

    A write error (disk full, permissions) removes the partial folder and raises :class:`CheckpointError` saying
    which checkpoint stays the latest: the previous one is never touched before the new one is complete."""
    save_dir = Path(save_dir)
    final_dir = iteration_dir(save_dir, iteration)
    tmp_dir = final_dir.with_name(final_dir.name + ".tmp")
    try:
        _write_checkpoint(save_dir, iteration, final_dir, tmp_dir, model, optimizer, arch=arch, run_state=run_state,
                          tokenizer_dir=tokenizer_dir)
    except OSError as error:
        if _rank() == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        previous = read_latest_iteration(save_dir)
        kept = (f"iteration {previous} stays the latest checkpoint" if previous is not None
                else "there is no earlier checkpoint")
        raise CheckpointError(f"saving {final_dir} failed on rank {_rank()}: {error}; {kept}") from error
    return final_dir


def _write_checkpoint(save_dir: Path, iteration: int, final_dir: Path, tmp_dir: Path, model, optimizer, *,
                      arch: ModelArchitecture, run_state, tokenizer_dir) -> None:
    from megatron.core import dist_checkpointing

    if _rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)  # leftover of an earlier crash mid-save
        tmp_dir.mkdir(parents=True)
    _barrier()
    sharded = model_sharded_state_dict(model)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], metadata=OPTIMIZER_SHARDING)
    dist_checkpointing.save(sharded, str(tmp_dir))
    fault_injection.save_point(iteration)
    _barrier()
    if _rank() == 0:
        meta = {"format_version": FORMAT_VERSION, "iteration": iteration, "architecture": arch.to_dict(),
                "has_optimizer": optimizer is not None, "run_state": run_state or {},
                "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        (tmp_dir / META_FILE).write_text(json.dumps(meta, indent=2))
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp_dir / "tokenizer",
                            ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.gguf"))
        write_manifest(tmp_dir)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        _atomic_write_text(save_dir / LATEST_FILE, str(iteration))
    _barrier()


def read_checkpoint_meta(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: not a megatron-grace checkpoint")
    return json.loads(path.read_text())


def resolve_checkpoint(load_dir: str | Path, *, fallback_to_previous: bool = False,
                       log=print) -> Path | None:
    """The checkpoint folder to resume from: the latest one, verified; None when the directory holds none.

    With ``fallback_to_previous`` a corrupt latest checkpoint is reported and the newest older complete one is used.
    """
    load_dir = Path(load_dir)
    if (load_dir / META_FILE).is_file():  # pointed at one checkpoint folder directly
        verify_manifest(load_dir)
        return load_dir
    latest = read_latest_iteration(load_dir) if load_dir.is_dir() else None
    if latest is None:
        return None
    candidates = [latest] + [i for i in complete_iterations(load_dir) if i < latest]
    for number, iteration in enumerate(candidates):
        directory = iteration_dir(load_dir, iteration)
        try:
            verify_manifest(directory)
            return directory
        except CheckpointError as error:
            if not fallback_to_previous or number == len(candidates) - 1:
                if fallback_to_previous:
                    raise CheckpointError(f"{error}; no older complete checkpoint in {load_dir}") from error
                raise CheckpointError(f"{error} (rerun with --fallback-to-previous-checkpoint to resume from an "
                                      f"older one)") from error
            log(f"WARNING: {error}; falling back to the previous checkpoint")
    return None


def checkpoint_to_resume(checkpoint: CheckpointConfig, start_from: str, *, log=print) -> Path | None:
    """The checkpoint ``--load`` resumes from (None: start from ``start_from``, the HF model, with a warning)."""
    if not checkpoint.load:
        return None
    found = resolve_checkpoint(checkpoint.load, log=log,
                               fallback_to_previous=checkpoint.fallback_to_previous_checkpoint)
    if found is None:
        log(f"WARNING: --load {checkpoint.load} holds no checkpoint; starting from {start_from} (expected on the "
            f"first launch)")
    return found


def check_architecture(meta: dict, arch: ModelArchitecture, checkpoint_dir: Path) -> None:
    saved = meta["architecture"]
    differing = {key: (saved.get(key), value) for key, value in arch.to_dict().items()
                 if key not in ("torch_dtype", "bos_token_id", "eos_token_id") and saved.get(key) != value}
    if differing:
        details = ", ".join(f"{key}: checkpoint {old!r} vs model {new!r}" for key, (old, new) in differing.items())
        raise CheckpointError(f"checkpoint {checkpoint_dir} is for a different model ({details})")


def load_checkpoint(checkpoint_dir: str | Path, model, optimizer=None, *, arch: ModelArchitecture) -> dict:
    """Load model (and optimizer) state at this run's TP/PP layout. Returns the checkpoint's metadata."""
    from megatron.core import dist_checkpointing

    checkpoint_dir = Path(checkpoint_dir)
    meta = read_checkpoint_meta(checkpoint_dir)
    check_architecture(meta, arch, checkpoint_dir)
    sharded = model_sharded_state_dict(model)
    if optimizer is not None:
        if not meta["has_optimizer"]:
            raise CheckpointError(f"{checkpoint_dir} holds no optimizer state (pass --no-load-optim to load weights)")
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], is_loading=True,
                                                            metadata=OPTIMIZER_SHARDING)
    state = dist_checkpointing.load(sharded, str(checkpoint_dir))
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return meta
