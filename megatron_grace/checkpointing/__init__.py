"""Checkpoints: Megatron-Core ``dist_checkpointing`` checkpoints of a run (``dist_checkpoint.py``: crash-safe save,
verified load, resume) and their conversion to and from Hugging Face folders (``hf_conversion.py``: the
``tools/convert_hf.py`` library and ``--export-hf``)."""
from .dist_checkpoint import (
    LATEST_FILE,
    CheckpointError,
    checkpoint_to_resume,
    complete_iterations,
    iteration_dir,
    load_checkpoint,
    read_checkpoint_meta,
    read_latest_iteration,
    resolve_checkpoint,
    save_checkpoint,
    verify_manifest,
)
from .hf_conversion import OutputNotEmptyError, export_to_hf, hf_to_mcore_checkpoint, mcore_checkpoint_to_hf

__all__ = [
    "LATEST_FILE",
    "CheckpointError",
    "checkpoint_to_resume",
    "OutputNotEmptyError",
    "complete_iterations",
    "export_to_hf",
    "hf_to_mcore_checkpoint",
    "iteration_dir",
    "load_checkpoint",
    "mcore_checkpoint_to_hf",
    "read_checkpoint_meta",
    "read_latest_iteration",
    "resolve_checkpoint",
    "save_checkpoint",
    "verify_manifest",
]
