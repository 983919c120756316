"""Small helpers used across the package: one copy each."""
from __future__ import annotations

import hashlib
import socket
from pathlib import Path


def unwrap(model):
    """The module under Megatron DDP / Float16Module wrappers (each keeps it as ``.module``)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def hash_file_into(digest, path: str | Path) -> None:
    """Stream a file's bytes into a hashlib digest (4 MiB at a time: weight files are large)."""
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    hash_file_into(digest, path)
    return digest.hexdigest()


def global_rank() -> int:
    """This process's rank in the default process group (0 before it starts)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a rendezvous or a child world of one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
