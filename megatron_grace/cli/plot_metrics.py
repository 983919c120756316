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
import sys
from pathlib import Path

from megatron_grace.curves import PANELS, Run, load_run, metrics_path, plot_runs

def summarise(run: Run, window: int = 10) -> dict[str, dict]:
    """Per plotted metric: mean of the first and of the last ``window`` steps that have it, and the change.

    A metric logged on fewer than two windows' worth of steps is compared by halves (``window`` = half its steps,
    at least 1), so the two means never share a step and the change shown is a real one."""
    summary = {}
    for _, keys in PANELS:
        for name in keys:
            if name in summary or not run.has(name):
                continue
            steps, values = run.series(name)
            used = max(1, min(window, len(values) // 2))
            first, last = values[:used], values[-used:]
            first_mean, last_mean = sum(first) / len(first), sum(last) / len(last)
            summary[name] = {
                "steps": len(values), "window": used, "first_step": steps[0], "last_step": steps[-1],
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
        halves = f"  (halves of {stats['steps']} steps)" if stats["window"] != window else ""
        lines.append(f"   {name:<{width}}  {stats['first_mean']:>12.4g}  {stats['last_mean']:>12.4g}  "
                     f"{stats['change']:>+12.4g}{halves}")
    return "\n".join(lines)


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
