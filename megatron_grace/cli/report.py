"""Write a run's self-contained HTML report (the main job writes one at its end, ``--no-report`` to skip).

    grace-report RUN_DIR [--eval EVAL_DIR] [--output FILE] [--smooth N]     (or python tools/report.py ...)

RUN_DIR is a training ``--save`` directory (``metrics.jsonl``, ``samples.jsonl``, ``args.json``); ``--eval`` takes a
``grace-eval --output`` folder, whose summary table and chart are added. Default output: RUN_DIR/report.html.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--eval", type=Path, default=None, metavar="EVAL_DIR",
                        help="a grace-eval output folder (summary.json, summary.png)")
    parser.add_argument("--output", type=Path, default=None, help="default: RUN_DIR/report.html")
    parser.add_argument("--smooth", type=int, default=1, help="trailing moving average of the curves, in steps")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error("--smooth must be at least 1")
    from megatron_grace.report import build_report

    try:
        path = build_report(args.run_dir, eval_dir=args.eval, output=args.output, smooth=args.smooth)
    except FileNotFoundError as error:
        print(f"grace-report: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
