"""Plot GRACE training curves from one or more runs' ``metrics.jsonl`` and print a before/after summary.

    python tools/plot_metrics.py --run runs/grace [--run runs/other --label base --label other]
        [--smooth 20] [--window 10] [--output curves.png] [--summary-json summary.json]

``--run`` takes a run directory (its ``metrics.jsonl`` is read) or the jsonl file itself, and can be repeated to
compare runs; ``--label`` names them in the same order (default: the directory name). Each line of the file is one
training step, a JSON object with at least ``step``; any metric may be missing from any line.

The file can be read while training is still writing it: a last line without its newline or not yet valid JSON is
skipped and counted, as are unparsable lines elsewhere (reported with their line numbers). When a run was resumed
from a checkpoint, the steps after that checkpoint appear twice; the later entry wins, because it belongs to the run
that continued.

The PNG grid shows the total reward, the reward terms, the positive similarity, response length, truncation rate,
loss, grad norm, clip fraction, KL, entropy, train/inference log-prob mismatch and seconds per step; panels without
data in any run are left out. ``--smooth N`` draws a trailing N-step moving average over the faint raw curve.
The summary compares, per metric, the mean of the first ``--window`` steps with the mean of the last ``--window``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

METRICS_FILE = "metrics.jsonl"

# (panel title, metric keys drawn in it), in the names megatron_grace.train logs. The reward terms are the raw
# cosines before the 1/tau scaling, so reward_pos_mean is the mean positive similarity: it gets a panel of its own
# because it is the curve that shows the embedder learning (the total reward also moves with the length penalty).
PANELS: list[tuple[str, list[str]]] = [
    ("reward (total)", ["reward_mean"]),
    ("reward terms", ["reward_pos_mean", "reward_neg_mean", "reward_clust_mean", "reward_cross_mean"]),
    ("positive similarity cos(query, rollout)", ["reward_pos_mean"]),
    ("response length (tokens)", ["response_length_mean", "response_length_max"]),
    ("truncation rate", ["truncation_rate"]),
    ("loss", ["loss"]),
    ("grad norm", ["grad_norm"]),
    ("clip fraction", ["clip_fraction"]),
    ("KL", ["kl"]),
    ("entropy", ["entropy"]),
    ("log-prob mismatch (train vs rollout)", ["logprob_mismatch"]),
    ("seconds per step", ["seconds_per_step"]),
]


@dataclass
class Run:
    label: str
    path: Path
    rows: list[dict] = field(default_factory=list)  # one per step, sorted by step
    bad_lines: list[int] = field(default_factory=list)  # 1-based line numbers that were skipped
    partial_last_line: bool = False  # the last line was cut off (file still being written)
    replaced_steps: int = 0  # earlier entries of a step superseded by a later one (resume)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one metric, finite numbers only."""
        steps, values = [], []
        for row in self.rows:
            value = row.get(key)
            if _is_number(value) and math.isfinite(value):
                steps.append(row["step"])
                values.append(float(value))
        return steps, values

    def has(self, key: str) -> bool:
        return any(_is_number(row.get(key)) and math.isfinite(row[key]) for row in self.rows)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metrics_path(run: str | Path) -> Path:
    run = Path(run)
    return run / METRICS_FILE if run.is_dir() else run


def load_run(run: str | Path, label: str | None = None) -> Run:
    """Read a metrics.jsonl, skipping (and counting) lines that are not complete JSON objects with a step."""
    path = metrics_path(run)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file")
    if label is None:
        label = path.parent.name if path.name == METRICS_FILE else path.stem
    result = Run(label=label, path=path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    # A file that does not end in a newline has a last line that may still be being written.
    last_unterminated = bool(lines) and lines[-1] != b""
    by_step: dict[int, dict] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        step = row.get("step") if isinstance(row, dict) else None
        if not _is_number(step) or (isinstance(step, float) and not step.is_integer()):
            result.bad_lines.append(number)
            if number == len(lines) and last_unterminated:
                result.partial_last_line = True
            continue
        step = int(step)
        if step in by_step:
            result.replaced_steps += 1
        by_step[step] = {**row, "step": step}
    result.rows = [by_step[step] for step in sorted(by_step)]
    return result


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` points, so the smoothed curve starts at the first step (no lag padding)."""
    if window <= 1:
        return list(values)
    averaged, running = [], 0.0
    for index, value in enumerate(values):
        running += value
        if index >= window:
            running -= values[index - window]
        averaged.append(running / min(index + 1, window))
    return averaged


def summarise(run: Run, window: int = 10) -> dict[str, dict]:
    """Per plotted metric: mean of the first and of the last ``window`` steps that have it, and the change."""
    summary = {}
    for _, keys in PANELS:
        for name in keys:
            if name in summary or not run.has(name):
                continue
            steps, values = run.series(name)
            first, last = values[:window], values[-window:]
            first_mean, last_mean = sum(first) / len(first), sum(last) / len(last)
            summary[name] = {
                "steps": len(values), "first_step": steps[0], "last_step": steps[-1],
                "first_mean": first_mean, "last_mean": last_mean, "change": last_mean - first_mean,
            }
    return summary


def format_summary(run: Run, summary: dict[str, dict], window: int) -> str:
    lines = [f"== {run.label}: {len(run.rows)} steps from {run.path}"]
    if run.rows:
        lines[0] += f" (step {run.rows[0]['step']} .. {run.rows[-1]['step']})"
    if run.bad_lines:
        note = "partial last line (still being written)" if run.partial_last_line else ""
        others = [n for n in run.bad_lines if not (run.partial_last_line and n == run.bad_lines[-1])]
        if others:
            shown = ", ".join(map(str, others[:10])) + (" ..." if len(others) > 10 else "")
            note = (note + "; " if note else "") + f"unparsable line(s) {shown}"
        lines.append(f"   skipped {len(run.bad_lines)} line(s): {note}")
    if run.replaced_steps:
        lines.append(f"   {run.replaced_steps} step(s) logged twice (resumed run): the later entry is used")
    if not summary:
        lines.append("   no plotted metric found")
        return "\n".join(lines)
    width = max(len(name) for name in summary)
    lines.append(f"   {'metric':<{width}}  {'first ' + str(window):>12}  {'last ' + str(window):>12}  {'change':>12}")
    for name, stats in summary.items():
        lines.append(f"   {name:<{width}}  {stats['first_mean']:>12.4g}  {stats['last_mean']:>12.4g}  "
                     f"{stats['change']:>+12.4g}")
    return "\n".join(lines)


def plot_runs(runs: list[Run], output: Path, smooth: int = 1, title: str | None = None) -> list[str]:
    """Draw the panel grid into ``output``; returns the titles of the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    panels = [(title, keys) for title, keys in PANELS if any(run.has(key) for run in runs for key in keys)]
    if not panels:
        raise ValueError("none of the runs has any plotted metric")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    line_styles = ["-", "--", ":", "-."]
    for axis, (panel_title, keys) in zip(axes.flat, panels):
        for run_index, run in enumerate(runs):
            colour = colours[run_index % len(colours)]
            for key_index, name in enumerate(keys):
                if not run.has(name):
                    continue
                steps, values = run.series(name)
                # Several terms in one panel: "pos", "clust" ... read better than the full key names.
                short = name.removeprefix("reward_").removesuffix("_mean") if len(keys) > 1 else name
                parts = ([run.label] if len(runs) > 1 else []) + ([short] if len(keys) > 1 else [])
                label = " / ".join(parts) or None
                # Within a panel, runs differ by colour and metrics by line style, so both stay readable at once.
                style = line_styles[key_index % len(line_styles)]
                if smooth > 1:
                    axis.plot(steps, values, color=colour, linestyle=style, alpha=0.25, linewidth=0.8)
                    values = moving_average(values, smooth)
                axis.plot(steps, values, color=colour, linestyle=style, linewidth=1.4, label=label)
        axis.set_title(panel_title, fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[1]:
            axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    suptitle = title or ", ".join(run.label for run in runs)
    if smooth > 1:
        suptitle += f"  (moving average over {smooth} steps)"
    figure.suptitle(suptitle, fontsize=11)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return [name for name, _ in panels]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True,
                        help="run directory holding metrics.jsonl, or the jsonl file; repeat to compare runs")
    parser.add_argument("--label", action="append", default=[], help="legend name of each --run, in order")
    parser.add_argument("--smooth", type=int, default=1, help="trailing moving-average window in steps (1: off)")
    parser.add_argument("--window", type=int, default=10, help="steps averaged at each end for the summary")
    parser.add_argument("--output", type=Path,
                        help="PNG path (default: <run>/metrics.png for one run, metrics_comparison.png for several)")
    parser.add_argument("--summary-json", type=Path, help="also write the summary numbers as JSON")
    parser.add_argument("--title", help="figure title (default: the run labels)")
    args = parser.parse_args(argv)
    if len(args.label) > len(args.run):
        parser.error(f"{len(args.label)} --label for {len(args.run)} --run")
    if args.smooth < 1 or args.window < 1:
        parser.error("--smooth and --window must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    labels = args.label + [None] * (len(args.run) - len(args.label))
    try:
        runs = [load_run(run, label) for run, label in zip(args.run, labels)]
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    seen: dict[str, int] = {}
    for run in runs:  # two runs/<x>/metrics.jsonl from different parents would share a default label
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} ({seen[run.label]})"
    summaries = {}
    for run in runs:
        summaries[run.label] = summarise(run, args.window) if run.rows else {}
        print(format_summary(run, summaries[run.label], args.window))
    empty = [run.label for run in runs if not run.rows]
    if len(empty) == len(runs):
        print("error: no complete step in any metrics file", file=sys.stderr)
        return 1
    output = args.output or (metrics_path(args.run[0]).parent / "metrics.png" if len(runs) == 1
                             else Path("metrics_comparison.png"))
    panels = plot_runs([run for run in runs if run.rows], output, smooth=args.smooth, title=args.title)
    print(f"wrote {output} ({len(panels)} panels)")
    if args.summary_json:
        report = {run.label: {"path": str(run.path), "steps": len(run.rows), "skipped_lines": len(run.bad_lines),
                              "partial_last_line": run.partial_last_line, "replaced_steps": run.replaced_steps,
                              "window": args.window, "metrics": summaries[run.label]} for run in runs}
        args.summary_json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
