"""Reading, validating and tokenising GRACE training files.

Two formats:

* ``supervised``: jsonl, one object per line, ``{"query": str, "positive": str, "negative": str | [str, ...]}``.
  ``negative`` may be a list (the paper variant: M negatives per query) or absent (no negative stream). Every kept row
  of a file has the same number of negatives, because a rollout batch carries one negative stream per negative slot;
  a row whose count differs from the first valid row's is a bad row. Other keys are ignored.
* ``unsupervised``: plain text, one text per line; the text is both the main prompt and the query (anchor) prompt.

Streams (see ``docs/algorithm.md``): main = positive (supervised) or x (unsupervised) is what the policy is trained on;
query = query or the anchor x; negatives = the hard negatives.

Bad rows (invalid UTF-8, invalid JSON, not an object, missing / empty / non-string fields, blank lines, a differing
negative count) are dropped and recorded in :class:`DataReport` with their line numbers; with ``strict=True`` the first
one raises :class:`DataError` naming file and line. Texts lose surrounding whitespace; whitespace-only counts as empty.
Main prompts longer than ``max_prompt_length`` templated tokens are skipped and recorded too (an error under
``strict``); query and negative prompts are truncated keeping the chat template's tail, and counted.

``sample_id`` is the row's 0-based line index in the file: stable whatever else is filtered, so checkpoints, logs and
the evaluation hold-out refer to rows unambiguously.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from megatron_grace.config import DataConfig
from megatron_grace.data.prompts import Prompt, PromptBuilder, PromptError

MODES = ("supervised", "unsupervised")
SUPERVISED_TEXT_FIELDS = ("query", "positive")
NEGATIVE_FIELD = "negative"
_PROGRESS_EVERY = 10_000
_LINES_SHOWN = 10


class DataError(ValueError):
    """A training file that cannot be used: empty, nothing usable left, or a bad row under ``strict``."""


@dataclass
class DataReport:
    """What happened to every line of one file.

    ``skipped`` maps a reason to the 1-based line numbers of the rows dropped for it; ``truncated`` maps a stream
    ("query", "negative") to the line numbers whose prompt was cut to fit.
    """

    path: str
    lines: int = 0
    kept: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)
    truncated: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, reason: str, line: int) -> None:
        self.skipped.setdefault(reason, []).append(line)

    def note_truncated(self, stream: str, line: int) -> None:
        self.truncated.setdefault(stream, []).append(line)

    @property
    def num_skipped(self) -> int:
        return sum(len(lines) for lines in self.skipped.values())

    def summary(self) -> str:
        name = Path(self.path).name
        out = [f"{name}: {self.lines} lines read, {self.kept} examples kept, {self.num_skipped} skipped"]
        for reason, lines in sorted(self.skipped.items(), key=lambda item: -len(item[1])):
            out.append(f"  skipped {len(lines)} x {reason}: {_format_lines(lines)}")
        for stream, lines in sorted(self.truncated.items()):
            out.append(f"  truncated {len(lines)} {stream} prompt(s) to fit: {_format_lines(lines)}")
        return "\n".join(out)


def _format_lines(lines: list[int]) -> str:
    shown = ", ".join(str(line) for line in lines[:_LINES_SHOWN])
    more = f", ... ({len(lines) - _LINES_SHOWN} more)" if len(lines) > _LINES_SHOWN else ""
    return f"line{'s' if len(lines) > 1 else ''} {shown}{more}"


@dataclass(frozen=True)
class TextRow:
    """One valid row before tokenisation."""

    sample_id: int
    main: str
    query: str
    negatives: tuple[str, ...] = ()

    @property
    def line(self) -> int:
        return self.sample_id + 1


@dataclass(frozen=True)
class GraceExample:
    """One training example: the tokenised prompts of its streams, and the texts they came from."""

    sample_id: int
    main: Prompt
    query: Prompt
    negatives: tuple[Prompt, ...]
    row: TextRow


class GraceDataset(Sequence[GraceExample]):
    """The kept examples of one file, in file order, with the report of what was dropped."""

    def __init__(self, path: Path, mode: str, examples: list[GraceExample], report: DataReport, num_negatives: int):
        self.path = path
        self.mode = mode
        self.examples = examples
        self.report = report
        self.num_negatives = num_negatives

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]

    def sample_ids(self) -> list[int]:
        return [example.sample_id for example in self.examples]


class _RowProblem(Exception):
    """Internal: why one row is bad. ``reason`` is the report's key; ``detail`` only goes into strict-mode errors."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason


def _clean_text(value, name: str) -> str:
    if not isinstance(value, str):
        raise _RowProblem(f"field '{name}' is not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates arrive through JSON escapes such as "\ud800"
        raise _RowProblem(f"field '{name}' is not valid Unicode (lone surrogate)") from None
    text = value.strip()
    if not text:
        raise _RowProblem(f"empty field '{name}'")
    return text


def _supervised_row(sample_id: int, line: str) -> TextRow:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as error:
        raise _RowProblem("invalid JSON", str(error)) from None
    if not isinstance(obj, dict):
        raise _RowProblem("row is not a JSON object")
    texts = {}
    for name in SUPERVISED_TEXT_FIELDS:
        if name not in obj:
            raise _RowProblem(f"missing field '{name}'")
        texts[name] = _clean_text(obj[name], name)
    negative = obj.get(NEGATIVE_FIELD)
    if negative is None:
        negatives = ()
    elif isinstance(negative, list):
        if not negative:
            raise _RowProblem(f"field '{NEGATIVE_FIELD}' is an empty list")
        negatives = tuple(_clean_text(item, NEGATIVE_FIELD) for item in negative)
    else:
        negatives = (_clean_text(negative, NEGATIVE_FIELD),)
    return TextRow(sample_id, main=texts["positive"], query=texts["query"], negatives=negatives)


def _unsupervised_row(sample_id: int, line: str) -> TextRow:
    text = _clean_text(line, "text")
    return TextRow(sample_id, main=text, query=text)


def read_rows(path: str | Path, mode: str, *, strict: bool = False) -> tuple[list[TextRow], DataReport]:
    """Validate every line of ``path``; return the valid rows and the report of the bad ones."""
    if mode not in MODES:
        raise ValueError(f"unknown data mode {mode!r}; expected one of {MODES}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training data file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"training data file {path} is empty")
    parse_row = _supervised_row if mode == "supervised" else _unsupervised_row
    report = DataReport(str(path))
    rows: list[TextRow] = []
    with open(path, "rb") as handle:
        for sample_id, raw in enumerate(handle):
            line_number = sample_id + 1
            report.lines = line_number
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    bad_byte = raw[error.start:error.start + 1]
                    raise _RowProblem("invalid UTF-8", f"byte {error.start} of the line is {bad_byte!r}") from None
                line = line.rstrip("\r\n")
                if sample_id == 0:
                    line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
                if not line.strip():
                    raise _RowProblem("blank line")
                row = parse_row(sample_id, line)
                if rows and len(row.negatives) != len(rows[0].negatives):
                    raise _RowProblem(
                        f"{len(row.negatives)} negative(s) where the first valid row has {len(rows[0].negatives)}",
                        f"first valid row: line {rows[0].line}",
                    )
            except _RowProblem as problem:
                if strict:
                    raise DataError(f"{path}:{line_number}: {problem} [strict mode]") from None
                report.skip(problem.reason, line_number)
                continue
            rows.append(row)
    if not rows:
        raise DataError(f"no usable rows in {path}\n{report.summary()}")
    return rows, report


def build_examples(
    rows: list[TextRow],
    builder: PromptBuilder,
    report: DataReport,
    *,
    max_prompt_length: int,
    strict: bool = False,
    verbose: bool = False,
) -> list[GraceExample]:
    """Tokenise rows as GRACE prompts; over-length main prompts are skipped (``strict``: an error) and reported."""
    examples = []
    started = time.perf_counter()
    for done, row in enumerate(rows, 1):
        try:
            main = builder.build(row.main, max_prompt_length)
        except PromptError as error:
            if strict:
                raise DataError(f"{report.path}:{row.line}: main prompt: {error} [strict mode]") from error
            report.skip(f"main prompt over {max_prompt_length} tokens", row.line)
            continue
        query = main if row.query == row.main else builder.build(row.query, max_prompt_length, truncate=True)
        negatives = tuple(builder.build(text, max_prompt_length, truncate=True) for text in row.negatives)
        if query.truncated:
            report.note_truncated("query", row.line)
        if any(negative.truncated for negative in negatives):
            report.note_truncated("negative", row.line)
        examples.append(GraceExample(row.sample_id, main, query, negatives, row))
        if verbose and done % _PROGRESS_EVERY == 0:
            rate = done / (time.perf_counter() - started)
            print(f"[data] tokenised {done}/{len(rows)} rows of {Path(report.path).name} ({rate:.0f} rows/s)",
                  file=sys.stderr, flush=True)
    report.kept = len(examples)
    return examples


def load_grace_dataset(
    path: str | Path,
    tokenizer,
    *,
    mode: str = "supervised",
    max_prompt_length: int = DataConfig.max_prompt_length,
    strict: bool = False,
    verbose: bool = True,
) -> GraceDataset:
    """Read, validate and tokenise a training file.

    ``tokenizer`` is a fast HF tokenizer with a chat template, or a ready :class:`PromptBuilder`. With ``verbose``,
    progress (files over 10k rows) and the report summary go to stderr; pass ``verbose=False`` on all but one rank.
    """
    rows, report = read_rows(path, mode, strict=strict)
    builder = tokenizer if isinstance(tokenizer, PromptBuilder) else PromptBuilder(tokenizer)
    examples = build_examples(rows, builder, report, max_prompt_length=max_prompt_length, strict=strict,
                              verbose=verbose)
    if verbose:
        print(f"[data] {report.summary()}", file=sys.stderr, flush=True)
    if not examples:
        raise DataError(f"every row of {path} was dropped\n{report.summary()}")
    return GraceDataset(Path(path), mode, examples, report, num_negatives=len(rows[0].negatives))
