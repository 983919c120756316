"""Shared pytest setup: offline environment, the ``slow`` marker and the SmolLM2 tokenizer fixtures.

Run slow tests with ``pytest --runslow`` or ``RUN_SLOW=1 pytest``.
"""
import os
from pathlib import Path

# Set before anything imports huggingface_hub or triton: both read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is unreachable here; each lookup would stall 20-40 s
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # without a GPU, Triton kernels only run in the interpreter

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; needs --runslow or RUN_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("RUN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow or RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    """SmolLM2-135M-Instruct tokenizer files, extracted once into the shared cache ($MEGATRON_GRACE_CACHE)."""
    from megatron_grace.default_model import default_tokenizer_dir

    return default_tokenizer_dir()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
