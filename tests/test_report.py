"""The run report, the console of a training run, and the log level.

One 2-rank ``torchrun -m megatron_grace.train`` launch of a tiny model (3 steps, samples at steps 1 and 3, HF export)
as users run it, with no warning filter of the test's own: its console must carry no ``Warning`` line and a timed
line per start-up phase, and the ``report.html`` it writes at its end must hold the numbers of its ``metrics.jsonl`` and
``samples.jsonl``. The rest builds reports from hand-written files (partial, resumed, with an evaluation).
"""
import json
import os
import re
import subprocess
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest

from megatron_grace.console import KNOWN_HARMLESS_WARNINGS, configure_console, log_level
from megatron_grace.utils import free_port
from megatron_grace.report import build_report
from megatron_grace.testing import save_tiny_hf_model

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "train_supervised.jsonl"
ROLLOUT_N, GROUPS, TRAIN_ITERS, SAMPLED_STEPS = 4, 4, 3, (1, 3)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smollm2_tokenizer_dir):
    root = tmp_path_factory.mktemp("report")
    model = save_tiny_hf_model("qwen3", root / "tiny", smollm2_tokenizer_dir, eos_logit_scale=70.0)
    run_dir = root / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "MEGATRON_GRACE_LOG_LEVEL")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
               "-m", "megatron_grace.train", "--hf-model", str(model), "--train-data", str(DATA),
               "--global-batch-size", str(GROUPS), "--ppo-mini-batch-size", "2", "--rollout-n", str(ROLLOUT_N),
               "--micro-batch-size", "4", "--max-response-length", "10", "--max-prompt-length", "128",
               "--lr", "2e-5", "--train-iters", str(TRAIN_ITERS), "--sample-interval", "2", "--save", str(run_dir),
               "--export-hf"]  # the export loads the checkpoint: its warnings are covered too
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-4000:]
    return run_dir, console


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class ReportParser(HTMLParser):
    """Sections, the numbers table, the sample cards and the captions of a report page."""

    def __init__(self):
        super().__init__()
        self.sections, self.numbers, self.samples, self.captions = [], {}, [], []
        self._row, self._cell, self._sample, self._class, self._div = None, None, None, None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag == "tr" and "data-metric" in attrs:
            self._row = []
            self.numbers[attrs["data-metric"]] = self._row
        if tag in ("td", "th") and self._row is not None:
            self._cell = ""
        if tag == "div":
            self._div.append(attrs.get("class"))
            if attrs.get("class") == "sample":
                self._sample = {"step": int(attrs["data-step"]), "text": "", "rationale": ""}
                self.samples.append(self._sample)
        if tag == "p" and attrs.get("class") == "caption":
            self.captions.append("")
            self._class = "caption"

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        if tag == "tr":
            self._row = None
        if tag == "div" and self._div:
            self._div.pop()
        if tag == "p":
            self._class = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._sample is not None and self._div and self._div[-1] in ("text", "rationale"):
            self._sample[self._div[-1]] += data
        if self._class == "caption":
            self.captions[-1] += data


def parse_report(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text())
    return parser


def test_console_has_no_warning_and_times_each_phase(tiny_run):
    _, console = tiny_run
    assert not [line for line in console.splitlines() if re.search(r"Warning\b|warnings\.warn", line)], console
    for phase in ("built the model", "loaded the weights of", "compiled the fused ops and kernels"):
        assert re.search(rf"^{phase}.* in \d+\.\d s$", console, re.MULTILINE), phase
    progress = [line for line in console.splitlines() if line.startswith("[") and " step " in line]
    assert len(progress) == TRAIN_ITERS and all("tok/s" in line and "ETA" in line for line in progress)


def test_report_holds_the_run_numbers(tiny_run):
    run_dir, console = tiny_run
    report = run_dir / "report.html"
    assert f"run report: {report}" in console
    page = parse_report(report)
    assert page.sections == ["configuration", "curves", "lengths", "samples"]
    rows = metrics_rows(run_dir)
    for key in ("reward_mean", "reward_pos_mean", "response_length_mean", "truncation_rate", "clip_fraction",
                "grad_norm", "time_rollout_s", "time_update_s"):
        values = [row[key] for row in rows]
        steps, first, last, low, high, mean = page.numbers[key][1:]
        assert int(steps) == TRAIN_ITERS
        expected = (values[0], values[-1], min(values), max(values), sum(values) / len(values))
        assert [float(v) for v in (first, last, low, high, mean)] == pytest.approx(expected, rel=1e-5), key
    # Every rollout of the first group at each sampled step, as samples.jsonl has them.
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [step for step in SAMPLED_STEPS for _ in range(ROLLOUT_N)]
    assert [(s["step"], s["text"], s["rationale"]) for s in page.samples] == [
        (s["step"], s["text"], s["rationale"]) for s in samples]
    # The histograms count every main row of both data-parallel ranks, and their mean is the logged mean length.
    by_step = {row["step"]: row for row in rows}
    for step in SAMPLED_STEPS:
        lengths = by_step[step]["response_lengths"]
        assert len(lengths) == GROUPS * ROLLOUT_N
        assert sum(lengths) / len(lengths) == pytest.approx(by_step[step]["response_length_mean"], rel=1e-9)
        assert f"step {step}: n={len(lengths)}, mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}" in (
            page.captions)
    assert "response_lengths" not in by_step[2]
    assert json.loads((run_dir / "args.json").read_text())["train_iters"] == TRAIN_ITERS


def write_lines(path: Path, rows: list, tail: str = "") -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows) + tail)


def test_report_of_a_resumed_run_still_being_written(tmp_path):
    # Steps 1-4, a crash, a resume from step 2 (steps 3-4 again with new values), and a last line cut short.
    rows = [{"step": s, "reward_mean": float(s), "response_length_mean": 10.0 * s} for s in range(1, 5)]
    rows += [{"step": s, "reward_mean": 100.0 + s, "response_length_mean": 10.0 * s} for s in (3, 4)]
    write_lines(tmp_path / "metrics.jsonl", rows, tail='{"step": 5, "reward_me')
    samples = [{"step": 1, "rollout": 0, "text": "t <b>", "rationale": "r1", "reward": 0.5, "truncated": False},
               "not json", {"step": 3, "rollout": 0, "text": "t", "rationale": "old", "reward": None,
                            "truncated": True},
               {"step": 3, "rollout": 0, "text": "t", "rationale": "new", "reward": -1.0, "truncated": True}]
    write_lines(tmp_path / "samples.jsonl", samples)
    page_text = build_report(tmp_path).read_text()
    page = parse_report(tmp_path / "report.html")
    assert page.numbers["reward_mean"][1:] == ["4", "1", "104", "1", "104", f"{(1 + 2 + 103 + 104) / 4:.6g}"]
    assert [(s["step"], s["rationale"]) for s in page.samples] == [(1, "r1"), (3, "new")]
    assert "t &lt;b&gt;" in page_text  # user text is escaped
    assert "1 line(s) of metrics.jsonl skipped (the last one is still being written)" in page_text
    assert "2 step(s) logged twice (resumed run)" in page_text
    assert "1 line(s) of samples.jsonl skipped" in page_text
    assert "Configuration" in page_text and "unknown" in page_text  # no args.json, no checkpoint


def test_report_with_an_evaluation(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [{"step": 1, "reward_mean": 0.1}])
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    summary = {"base": {"tasks": {"A": {"type": "STS", "score": 12.5}, "B": {"type": "Retrieval", "score": 3.0}},
                        "category_mean": 7.75},
               "grace": {"tasks": {"A": {"type": "STS", "score": 20.0}}, "category_mean": 20.0}}
    (eval_dir / "summary.json").write_text(json.dumps(summary))
    (eval_dir / "summary.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    page_text = build_report(tmp_path, eval_dir=eval_dir).read_text()
    assert parse_report(tmp_path / "report.html").sections[-1] == "evaluation"
    assert re.search(r"<th>base</th><td>12\.5</td><td>3</td><td>7\.75</td>", page_text)
    assert re.search(r"<th>grace</th><td>20</td><td>–</td><td>20</td>", page_text)  # a task it lacks
    assert "MTEB summary chart" in page_text


def test_log_level_hides_only_the_listed_warnings(monkeypatch):
    known_category, known_message, _ = KNOWN_HARMLESS_WARNINGS[0]
    with warnings.catch_warnings(record=True) as caught:
        configure_console("info")
        warnings.warn(known_message, known_category)
        warnings.warn(known_message + " (and something else)", known_category)  # not the exact message
        warnings.warn("a warning of ours", UserWarning)
        configure_console("debug")
        warnings.warn(known_message, known_category)
    assert [str(w.message) for w in caught] == [known_message + " (and something else)", "a warning of ours",
                                               known_message]
    monkeypatch.setenv("MEGATRON_GRACE_LOG_LEVEL", "DEBUG")
    assert log_level() == "debug" and log_level("info") == "info"  # the flag wins over the environment
    monkeypatch.setenv("MEGATRON_GRACE_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match="MEGATRON_GRACE_LOG_LEVEL"):
        log_level()
