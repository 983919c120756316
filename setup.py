"""megatron-grace: GRACE embedder training on Megatron-Core.

The Triton kernels live in ``megatron_grace/kernels/`` (one file per op, Liger-Kernel style): the import path is the
file path.
"""
from setuptools import setup

CONSOLE_SCRIPTS = [
    "grace-train = megatron_grace.train:main",
    "grace-convert = megatron_grace.cli.convert_hf:main",
    "grace-eval = megatron_grace.cli.eval_mteb:main",
    "grace-report = megatron_grace.cli.report:main",
    "grace-explain = megatron_grace.cli.explain:main",
    "grace-plot = megatron_grace.cli.plot_metrics:main",
]

setup(
    name="megatron-grace",
    version="0.1.0",
    description="GRACE (generative representation learning via contrastive policy optimisation) on Megatron-Core",
    python_requires=">=3.10",
    packages=["megatron_grace", "megatron_grace.models", "megatron_grace.data", "megatron_grace.cli",
              "megatron_grace.eval", "megatron_grace.kernels"],
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
