"""Validate a GRACE training file, filter it by templated prompt length and split off a test part.

    python tools/prepare_data.py INPUT --mode supervised|unsupervised --output-dir DIR
        [--tokenizer PATH | --hf-model PATH] [--max-prompt-length 1024] [--test-fraction 0.01] [--strict] [--overwrite]

Bad rows (invalid JSON or UTF-8, missing or empty fields, ...) are dropped and listed with line numbers; ``--strict``
stops at the first one instead. With a tokenizer, rows whose main prompt (the positive, or the text itself in
unsupervised mode) rendered with the GRACE chat template is longer than ``--max-prompt-length`` tokens are dropped as
well; without one the length filter is off. The first ``--test-fraction`` of the kept rows (the reference keeps the
first 1%) is written to ``test.*``, the rest to ``train.*`` (``.jsonl`` for supervised, ``.txt`` for unsupervised).
Surrounding whitespace of every text is removed on the way.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megatron_grace.config import DataConfig
from megatron_grace.data import DataError, PromptBuilder, TextRow, build_examples, read_rows


def format_row(row: TextRow, mode: str) -> str:
    if mode == "unsupervised":
        return row.main
    obj = {"query": row.query, "positive": row.main}
    if row.negatives:
        obj["negative"] = row.negatives[0] if len(row.negatives) == 1 else list(row.negatives)
    return json.dumps(obj, ensure_ascii=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="a jsonl file (supervised) or a text file, one text a line")
    parser.add_argument("--mode", choices=("supervised", "unsupervised"), required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--tokenizer", "--hf-model", dest="tokenizer",
                        help="tokenizer or HF model folder for the length filter (the model you will train)")
    parser.add_argument("--max-prompt-length", type=int, default=DataConfig.max_prompt_length,
                        help=f"templated tokens (default {DataConfig.max_prompt_length}, the trainer's)")
    parser.add_argument("--test-fraction", type=float, default=0.01, help="leading fraction kept as test (0.01)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    if not 0.0 <= args.test_fraction < 1.0:
        parser.error(f"--test-fraction must be in [0, 1), got {args.test_fraction}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suffix = ".jsonl" if args.mode == "supervised" else ".txt"
    outputs = {split: args.output_dir / f"{split}{suffix}" for split in ("train", "test")}
    existing = [str(path) for path in outputs.values() if path.exists()]
    if existing and not args.overwrite:
        print(f"error: {', '.join(existing)} already exist(s); pass --overwrite to replace", file=sys.stderr)
        return 2
    try:
        rows, report = read_rows(args.input, args.mode, strict=args.strict)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.tokenizer:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        builder = PromptBuilder(AutoTokenizer.from_pretrained(args.tokenizer))
        kept_ids = {example.sample_id for example in build_examples(
            rows, builder, report, max_prompt_length=args.max_prompt_length, verbose=True)}
        rows = [row for row in rows if row.sample_id in kept_ids]
    else:
        report.kept = len(rows)
        print("length filter: off (no --tokenizer / --hf-model given)", file=sys.stderr)
    num_test = int(len(rows) * args.test_fraction)
    splits = {"test": rows[:num_test], "train": rows[num_test:]}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for split, split_rows in splits.items():
        with open(outputs[split], "w", encoding="utf-8") as handle:
            handle.writelines(format_row(row, args.mode) + "\n" for row in split_rows)
    print(report.summary())
    for split in ("train", "test"):
        print(f"wrote {len(splits[split])} rows to {outputs[split]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
