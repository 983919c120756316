"""Evaluate GRACE encoders on MTEB (2.x) and compare them.

    python tools/eval_mteb.py --model exports/step_1000 [--model exports/step_0 ...] --tasks local \
        [--rationale | --no-rationale] [--max-new-tokens 2048] [--batch-size 16] [--limit N] --output DIR

--tasks takes MTEB task names and presets: paper-56 (the paper's 56 English tasks), paper-16 (its ablation subset),
local (the offline suite of megatron_grace/eval/local_suite.py). Hub tasks need the Hugging Face Hub; when it is not
reachable the run stops before loading anything.

Writes under DIR: results/<model>/<revision>/experiments/<settings>/<Task>.json (MTEB's result files), summary.md
(per task, per category, dataset-weighted and category means), summary.png (bars per model) and summary.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from megatron_grace.config import RolloutConfig
from megatron_grace.console import configure_console

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", action="append", required=True, metavar="HF_DIR",
                        help="Hugging Face model folder (a GRACE export); repeat to compare models")
    parser.add_argument("--tasks", nargs="+", default=["local"],
                        help="task names and/or presets paper-56, paper-16, local (default: local)")
    parser.add_argument("--rationale", action=argparse.BooleanOptionalAction, default=True,
                        help="generate a rationale before pooling (--no-rationale: the paper's Base)")
    parser.add_argument("--max-new-tokens", type=int, default=RolloutConfig.max_response_length,
                        help="rationale length limit (default: the trainer's --max-response-length, the paper's)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (each text's generator derives from it)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pooling", choices=("mean", "last", "eos"), default="mean")
    parser.add_argument("--layer", type=int, default=-1,
                        help="hidden states to pool: -1 = last layer after the final norm, -2 = penultimate layer …")
    parser.add_argument("--limit", type=int, default=None,
                        help="subsample every task to N examples (retrieval: N queries + N distractor documents)")
    parser.add_argument("--output", type=Path, required=True, help="output folder")
    parser.add_argument("--cache-dir", default=None,
                        help="megatron-grace cache (the local suite); default $MEGATRON_GRACE_CACHE "
                             "or ~/.cache/megatron_grace")
    parser.add_argument("--embedding-cache", type=Path, default=None,
                        help="also keep embeddings on disk here (sqlite), keyed by model, text and settings, so a "
                             "rerun or another task with the same texts skips generation; default: in memory only")
    parser.add_argument("--training-data", type=Path, default=None,
                        help="training data folder the local suite must not overlap (default: examples/data)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    for model in args.model:
        if not (Path(model) / "config.json").is_file():
            parser.error(f"--model {model}: no config.json there; expected a Hugging Face model folder")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    configure_console()
    args = parse_args(argv)
    from megatron_grace.eval.local_suite import DEFAULT_TRAINING_DATA
    from megatron_grace.eval.mteb_eval import HubUnreachable, resolve_tasks

    try:
        tasks = resolve_tasks(args.tasks, args.cache_dir, args.training_data or DEFAULT_TRAINING_DATA)
    except HubUnreachable as error:
        print(f"eval_mteb: error: {error}", file=sys.stderr)
        return 2

    import datasets
    import mteb

    from megatron_grace.eval.mteb_eval import (GraceMtebModel, collect_results, limit_task, run_label, summarise,
                                         write_summary)

    logging.getLogger("mteb").setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    if args.limit is not None:
        for task in tasks:
            limit_task(task, args.limit, args.seed)
    timings = {}
    for model_dir in args.model:
        model = GraceMtebModel.from_pretrained(
            model_dir, device=args.device, pooling=args.pooling, layer=args.layer,
            cache_dir=args.embedding_cache, rationale=args.rationale,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
            batch_size=args.batch_size)
        started, cpu_started = time.perf_counter(), time.process_time()
        mteb.evaluate(
            model, tasks, cache=mteb.ResultCache(args.output), overwrite_strategy="always",
            encode_kwargs={"batch_size": args.batch_size}, show_progress_bar=False)
        label = run_label(model.mteb_model_meta.model_dump())
        # CPU time too: on a shared machine the wall time also measures the neighbours.
        timings[label] = {"seconds": round(time.perf_counter() - started, 1),
                          "cpu_seconds": round(time.process_time() - cpu_started, 1), "limit": args.limit,
                          "tasks": [t.metadata.name for t in tasks]}
        print(f"{label}: {len(tasks)} task(s) in {timings[label]['seconds']:.0f} s", file=sys.stderr)
    # Wall times of earlier runs into the same folder are kept, as their results are (see collect_results).
    times_path = args.output / "wall_times.json"
    timings = (json.loads(times_path.read_text()) if times_path.is_file() else {}) | timings
    times_path.write_text(json.dumps(timings, indent=2) + "\n")
    header = ["# MTEB summary", "",
              f"Tasks: {', '.join(t.metadata.name for t in tasks)}" +
              (f"; each subsampled to --limit {args.limit}" if args.limit else ""),
              f"Sampling: temperature={args.temperature}, seed={args.seed}.",
              "Time per run (wall / CPU): " + ", ".join(f"{label} {t['seconds']:.0f} s / {t['cpu_seconds']:.0f} s"
                                                        for label, t in timings.items())]
    task_types = {task.metadata.name: task.metadata.type for task in tasks}
    paths = write_summary(summarise(collect_results(args.output, task_types)), args.output, header)
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
