"""GRACE training data: prompts (``prompts``), file readers and tokenisation (``dataset``), batch sampling
(``sampler``).

Typical use in a trainer::

    dataset = load_grace_dataset(path, tokenizer, mode="supervised", max_prompt_length=1024, strict=False)
    sampler = GroupSampler(len(dataset), global_batch_size=64, seed=seed)
    sampler.load_state_dict(checkpoint["data"])          # on resume
    for step in ...:
        indices = GroupSampler.shard(sampler.next_batch(), dp_rank, dp_size)
        examples = [dataset[i] for i in indices]          # example.sample_id: the row's 0-based line index
    checkpoint["data"] = sampler.state_dict()
"""
from megatron_grace.data.dataset import (
    DataError,
    DataReport,
    GraceDataset,
    GraceExample,
    TextRow,
    build_examples,
    load_grace_dataset,
    read_rows,
)
from megatron_grace.data.prompts import SYSTEM_PROMPT, Prompt, PromptBuilder, PromptError
from megatron_grace.data.sampler import GroupSampler

__all__ = [
    "DataError",
    "DataReport",
    "GraceDataset",
    "GraceExample",
    "GroupSampler",
    "Prompt",
    "PromptBuilder",
    "PromptError",
    "SYSTEM_PROMPT",
    "TextRow",
    "build_examples",
    "load_grace_dataset",
    "read_rows",
]
