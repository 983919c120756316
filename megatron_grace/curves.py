"""Training curves of a run: reading ``metrics.jsonl`` tolerantly (partial last line, resumed runs) and drawing
panels of metrics over steps. Used by ``grace-plot`` (:mod:`megatron_grace.cli.plot_metrics`) and the run report
(:mod:`megatron_grace.report`)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

METRICS_FILE = "metrics.jsonl"

# (panel title, metric keys drawn in it), in the names megatron_grace.train logs. The reward terms are the raw
# cosines before the 1/tau scaling, so reward_pos_mean is the mean positive similarity: it gets a panel of its own
# because it is the curve that shows the embedder learning (the total reward also moves with the length penalty).
PANELS: list[tuple[str, list[str]]] = [
    ("reward (total)", ["reward_mean"]),
    ("reward terms", ["reward_pos_mean", "reward_neg_mean", "reward_clust_mean", "reward_cross_mean"]),
    ("positive similarity cos(query, rollout)", ["reward_pos_mean"]),
    ("collapse: margin (own text against negatives or other texts)", ["margin_mean"]),
    ("collapse: cosine of different texts", ["embedding_spread"]),
    ("collapse: rationale diversity", ["distinct_2", "near_identical_share"]),
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


def plot_runs(runs: list[Run], output: Path | BinaryIO, smooth: int = 1, title: str | None = None,
              panels: list[tuple[str, list[str]]] = PANELS, columns: int = 3) -> list[str]:
    """Draw the grid of ``panels`` that have data into ``output`` (a PNG path or binary file); returns the titles of
    the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(name, keys) for name, keys in panels if any(run.has(key) for run in runs for key in keys)]
    if not panels:
        raise ValueError("none of the runs has any plotted metric")
    columns = min(columns, len(panels))
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
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
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
    if isinstance(output, Path):
        output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110, format="png")
    plt.close(figure)
    return [name for name, _ in panels]
