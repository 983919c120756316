"""megatron-grace: GRACE embedder training on Megatron-Core.

The Triton kernels live in the top-level ``kernels/`` folder of the repository (one file per op, Liger-Kernel
style) and are installed under the import name ``megatron_grace.kernels``.
"""
from setuptools import setup

setup(
    name="megatron-grace",
    version="0.1.0",
    description="GRACE (generative representation learning via contrastive policy optimisation) on Megatron-Core",
    python_requires=">=3.10",
    packages=["megatron_grace", "megatron_grace.models", "megatron_grace.data", "megatron_grace.kernels"],
    package_dir={"megatron_grace.kernels": "kernels"},
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
