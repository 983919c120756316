"""grace-plot (tools/plot_metrics.py) on synthetic metrics.jsonl files: PNG, summary numbers by hand, partial lines, resumed runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_tool():
    from megatron_grace.cli import plot_metrics

    return plot_metrics


def load_curves():
    from megatron_grace import curves

    return curves


def synthetic_row(step: int) -> dict:
    row = {"step": step, "reward_mean": 0.5 * step, "loss": 10.0 - step, "response_length_mean": 100 + 2 * step,
           "reward_pos_mean": 0.01 * step}
    if step % 2 == 0:  # a metric present only on some steps: summary windows count the steps that have it
        row["grad_norm"] = float(step)
    return row


def write_run(run_dir: Path, steps, tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(synthetic_row(step)) + "\n" for step in steps) + tail
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def test_summary_png_and_partial_last_line(tmp_path, capsys):
    tool = load_tool()
    # 25 complete steps, then a line cut off mid-write (no newline), as while training is still running.
    run_dir = write_run(tmp_path / "run", range(1, 26), tail='{"step": 26, "reward_me')
    summary_json = tmp_path / "summary.json"
    assert tool.main(["--run", str(run_dir), "--summary-json", str(summary_json)]) == 0

    png = run_dir / "metrics.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000

    report = json.loads(summary_json.read_text())["run"]
    assert report["steps"] == 25 and report["skipped_lines"] == 1 and report["partial_last_line"] is True
    metrics = report["metrics"]
    # reward_mean = 0.5 * step: first 10 steps 1..10 -> mean 0.5 * 5.5; last 10 steps 16..25 -> mean 0.5 * 20.5.
    assert metrics["reward_mean"]["first_mean"] == pytest.approx(2.75)
    assert metrics["reward_mean"]["last_mean"] == pytest.approx(10.25)
    assert metrics["reward_mean"]["change"] == pytest.approx(7.5)
    # loss = 10 - step: 10 - 5.5 and 10 - 20.5.
    assert metrics["loss"]["first_mean"] == pytest.approx(4.5)
    assert metrics["loss"]["last_mean"] == pytest.approx(-10.5)
    # response length = 100 + 2 * step: 111 and 141.
    assert metrics["response_length_mean"]["first_mean"] == pytest.approx(111.0)
    assert metrics["response_length_mean"]["last_mean"] == pytest.approx(141.0)
    # grad_norm only on even steps 2..24 (12 values, fewer than two windows): halves 2..12 -> 7, 14..24 -> 19.
    assert metrics["grad_norm"]["steps"] == 12 and metrics["grad_norm"]["window"] == 6
    assert metrics["grad_norm"]["first_mean"] == pytest.approx(7.0)
    assert metrics["grad_norm"]["last_mean"] == pytest.approx(19.0)
    # The positive similarity (raw cosine of the pos term).
    assert metrics["reward_pos_mean"]["last_mean"] == pytest.approx(0.205)
    # Metrics the file does not have are left out, not reported as zeros.
    assert "kl" not in metrics and "clip_fraction" not in metrics

    printed = capsys.readouterr().out
    assert "skipped 1 line(s): partial last line" in printed
    assert "reward_mean" in printed and "+7.5" in printed


def test_bad_middle_line_and_resumed_steps(tmp_path):
    tool = load_tool()
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    # Steps 1..8 logged, crash; resumed from the step-5 checkpoint, so 6..8 are logged again with new values.
    lines = [json.dumps(synthetic_row(step)) for step in range(1, 9)]
    lines.insert(3, "not json at all")
    lines += [json.dumps({**synthetic_row(step), "reward_mean": 100.0 + step}) for step in range(6, 11)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    run = load_curves().load_run(run_dir)
    assert [row["step"] for row in run.rows] == list(range(1, 11))
    assert run.bad_lines == [4] and not run.partial_last_line
    assert run.replaced_steps == 3
    assert run.rows[5]["reward_mean"] == 106.0  # the later entry of step 6 wins
    summary = tool.summarise(run, window=2)
    assert summary["reward_mean"]["first_mean"] == pytest.approx(0.75)  # steps 1, 2
    assert summary["reward_mean"]["last_mean"] == pytest.approx(109.5)  # steps 9, 10 of the resumed run


def test_moving_average_by_hand():
    tool = load_curves()
    assert tool.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert tool.moving_average([3.0, 6.0, 9.0], 5) == [3.0, 4.5, 6.0]
    assert tool.moving_average([1.0, 2.0], 1) == [1.0, 2.0]


def test_two_runs_labels_and_smoothing_from_the_command_line(tmp_path):
    first = write_run(tmp_path / "a", range(1, 31))
    second = write_run(tmp_path / "b" / "x", range(1, 21))
    output = tmp_path / "compare.png"
    completed = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_metrics.py"), "--run", str(first), "--label", "baseline",
         "--run", str(second / "metrics.jsonl"), "--label", "grace", "--smooth", "5", "--output", str(output)],
        capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert output.read_bytes()[:8] == PNG_MAGIC
    assert "== baseline: 30 steps" in completed.stdout and "== grace: 20 steps" in completed.stdout
    assert "(6 panels)" in completed.stdout  # reward, terms, positive similarity, length, loss, grad norm


def test_only_partial_content_is_an_error(tmp_path, capsys):
    tool = load_tool()
    run_dir = tmp_path / "starting"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "rew')
    assert tool.main(["--run", str(run_dir)]) == 1
    assert "no complete step" in capsys.readouterr().err
    assert tool.main(["--run", str(tmp_path / "missing")]) == 1


def test_a_run_shorter_than_two_windows_is_compared_by_halves(tmp_path, capsys):
    """8 steps with the default window of 10: the first 10 and last 10 would both be all 8 steps (change +0). Halves:
    steps 1-4 against 5-8; grad_norm, logged on the 4 even steps, compares steps 2, 4 against 6, 8."""
    tool = load_tool()
    run = load_curves().load_run(write_run(tmp_path / "short", range(1, 9)))
    summary = tool.summarise(run, window=10)
    assert summary["reward_mean"]["window"] == 4
    assert summary["reward_mean"]["first_mean"] == pytest.approx(0.5 * 2.5)
    assert summary["reward_mean"]["change"] == pytest.approx(0.5 * 4)
    assert summary["grad_norm"]["first_mean"] == pytest.approx(3.0) and summary["grad_norm"]["last_mean"] == 7.0
    text = tool.format_summary(run, summary, 10)
    assert "first 10" in text and text.count("(halves of 8 steps)") == 4 and "(halves of 4 steps)" in text
    one_step = tool.summarise(load_curves().load_run(write_run(tmp_path / "one", [1])), window=10)
    assert one_step["loss"]["window"] == 1 and one_step["loss"]["change"] == 0
    long_run = tool.summarise(load_curves().load_run(write_run(tmp_path / "long", range(1, 31))), window=10)
    assert long_run["reward_mean"]["window"] == 10 and long_run["reward_mean"]["change"] == pytest.approx(10.0)
