"""megatron-grace: GRACE embedder training on Megatron-Core.

Two folders outside ``megatron_grace/`` install into it (``package_dir``): the Triton ops of the top-level ``kernels/``
(one file per op, Liger-Kernel style) as ``megatron_grace/kernels/``, imported as ``megatron_grace.kernels``
(``megatron_grace/kernels.py`` is its ``__init__``; a top-level ``kernels`` module would clash with the ``kernels``
package on PyPI), and the bundled sample data of ``examples/data`` as ``megatron_grace/sample_data/`` (package data:
the default ``--train-data`` and the local suite's held-out list), so a wheel finds its defaults.
"""
from setuptools import find_packages, setup

CONSOLE_SCRIPTS = [
    "grace-train = megatron_grace.train:main",
    "grace-convert = megatron_grace.cli.convert_hf:main",
    "grace-eval = megatron_grace.cli.eval_mteb:main",
    "grace-report = megatron_grace.cli.report:main",
    "grace-explain = megatron_grace.cli.explain:main",
    "grace-plot = megatron_grace.cli.plot_metrics:main",
    "grace-prepare-data = megatron_grace.cli.prepare_data:main",
]

setup(
    name="megatron-grace",
    version="0.1.0",
    description="GRACE (generative representation learning via contrastive policy optimisation) on Megatron-Core",
    python_requires=">=3.10",
    # Every package folder under megatron_grace/ (a new one is found without editing this), plus the two mapped ones.
    packages=find_packages(include=["megatron_grace", "megatron_grace.*"]) + ["megatron_grace.kernels",
                                                                             "megatron_grace.sample_data"],
    package_dir={"megatron_grace.kernels": "kernels", "megatron_grace.sample_data": "examples/data"},
    package_data={"megatron_grace.sample_data": ["*.jsonl", "*.txt", "README.md", "LICENSE.WordNet"]},
    # The same code as python -m megatron_grace.train and tools/*.py (megatron_grace/cli/__init__.py lists them).
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        # megatron-core uses these without declaring them: psutil (dist_checkpointing's forked writer hangs without
        # it) and tqdm (static inference engine).
        "psutil",
        "tqdm",
        "triton",
        "numpy",
        "transformers>=4.45",
        "safetensors",
        "tokenizers",
        "sentencepiece",
        # gguf + accelerate: dequantising the embedded default model (SmolLM2 GGUF) through transformers.
        "gguf",
        "accelerate",
        "datasets",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest"],
        # tools/eval_mteb.py and the MTEB tests; written against the 2.x API (2.26.24 tested).
        "eval": ["mteb>=2,<3"],
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    },
)
