"""megatron-grace: GRACE embedder training on Megatron-Core.

Two folders outside this one install with the package (``setup.py``'s ``package_dir``): the Triton ops of the
top-level ``kernels/`` under ``megatron_grace/kernels/`` (imported as ``megatron_grace.kernels``, see ``kernels.py``),
and the bundled sample data of ``examples/data`` as ``megatron_grace/sample_data/`` (the default ``--train-data`` and
the local suite's held-out list), so a wheel finds its defaults; a checkout or an editable install reads the folders
where they are.
"""
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def sample_data_dir() -> Path:
    """The bundled WordNet sample: package data in a wheel, ``examples/data`` in a checkout or an editable install."""
    installed = _PACKAGE_DIR / "sample_data"
    return installed if installed.is_dir() else _PACKAGE_DIR.parent / "examples" / "data"
