"""Step metrics: reduction over ranks, progress lines with ETA, ``<save>/metrics.jsonl``, TensorBoard, optional
wandb, and sample rationales (``<save>/samples.jsonl``)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

PROGRESS_BAR_WIDTH = 20
SHOWN = (("reward_mean", "reward", "{:.3f}"), ("reward_pos_mean", "pos", "{:.3f}"), ("loss", "loss", "{:+.4f}"),
         ("response_length_mean", "len", "{:.1f}"), ("truncation_rate", "trunc", "{:.2f}"),
         ("grad_norm", "gnorm", "{:.3f}"), ("seconds_per_step", "s/step", "{:.1f}"),
         ("tokens_per_s", "tok/s", "{:.0f}"))


def reduce_metrics(sums: dict[str, float], maxima: dict[str, float], *, is_contributing: bool,
                   concatenated: dict[str, list] | None = None) -> dict:
    """Sum ``sums``, take the max of ``maxima`` and join the lists of ``concatenated`` (in data-parallel rank order,
    which is the global batch's order: each rank holds a contiguous slice) over data-parallel ranks. Exactly one rank
    per data-parallel replica contributes (last pipeline stage, TP rank 0); keys may differ between stages, so dicts
    travel as objects (a few hundred bytes per rank per step)."""
    contributes = is_contributing and parallel_state.get_tensor_model_parallel_rank() == 0
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (sums, maxima, concatenated or {}) if contributes else None)
    total: dict = {}
    for entry in filter(None, gathered):
        rank_sums, rank_maxima, rank_lists = entry
        for key, value in rank_sums.items():
            total[key] = total.get(key, 0.0) + value
        for key, value in rank_maxima.items():
            total[key] = max(total.get(key, float("-inf")), value)
        for key, values in rank_lists.items():
            total[key] = total.get(key, []) + list(values)
    return total


def tensorboard_dir(args) -> Path | None:
    """``--tensorboard-dir``, else ``<save>/tensorboard`` (so it follows ``--save``), else none."""
    if args.tensorboard_dir:
        return Path(args.tensorboard_dir)
    return Path(args.save) / "tensorboard" if args.save else None


class MetricsLogger:
    def __init__(self, args, *, is_logging_rank: bool):
        self.args = args
        self.is_logging_rank = is_logging_rank
        self.run_dir = Path(args.save) if args.save else None
        self.tensorboard = None
        self.wandb = None
        self.history: list[dict] = []

    def start(self, first_step: int, last_step: int) -> None:
        self.first_step, self.last_step = first_step, last_step
        self.started = time.perf_counter()
        if not self.is_logging_rank:
            return
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_jsonl(self.run_dir / "metrics.jsonl", first_step)
            self._truncate_jsonl(self.run_dir / "samples.jsonl", first_step)
            # The flags of this launch, for the run report (a resumed launch rewrites them).
            settings = {key: value for key, value in vars(self.args).items()
                        if value is None or isinstance(value, (int, float, str, bool, list))}
            (self.run_dir / "args.json").write_text(json.dumps(settings, indent=1) + "\n")
        events_dir = tensorboard_dir(self.args)
        if events_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(events_dir), purge_step=first_step + 1)
        if self.args.wandb_project:
            import wandb  # optional dependency: only imported when asked for

            self.wandb = wandb.init(project=self.args.wandb_project, name=self.args.wandb_exp_name,
                                    config=vars(self.args), resume="allow")

    @staticmethod
    def _truncate_jsonl(path: Path, keep_through_step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they are recomputed) so the file has no duplicates."""
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= keep_through_step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by a crash
        path.write_text("".join(line + "\n" for line in kept))

    def log(self, metrics: dict) -> None:
        if not self.is_logging_rank:
            return
        self.history.append(metrics)
        step = metrics["step"]
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(metrics) + "\n")
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if step % self.args.log_interval == 0 or step == self.last_step:
            print(self._progress_line(metrics), flush=True)

    def _progress_line(self, metrics: dict) -> str:
        step = metrics["step"]
        done = (step - self.first_step) / max(self.last_step - self.first_step, 1)
        filled = int(round(done * PROGRESS_BAR_WIDTH))
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(step - self.first_step, 1) * (self.last_step - step)
        fields = " | ".join(f"{label} {fmt.format(metrics[key])}" for key, label, fmt in SHOWN if key in metrics)
        return (f"[{'#' * filled}{'.' * (PROGRESS_BAR_WIDTH - filled)}] step {step}/{self.last_step} | {fields} | "
                f"elapsed {_duration(elapsed)} | ETA {_duration(eta)}")

    def samples(self, records: list[dict]) -> None:
        """Append every record to ``samples.jsonl``; print the first (the console stays short)."""
        first = records[0]
        print(f"--- sample (step {first['step']}, reward {first['reward']}, truncated {first['truncated']}) ---\n"
              f"text: {first['text'][:200]}\nrationale: {first['rationale'][:600]}\n---", flush=True)
        if self.run_dir is not None:
            with open(self.run_dir / "samples.jsonl", "a") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in records)

    def finish(self) -> None:
        if not self.is_logging_rank:
            return
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.history:
            first, last = self.history[0], self.history[-1]
            lines = [f"summary: {len(self.history)} steps in {_duration(time.perf_counter() - self.started)}"]
            for key in ("reward_mean", "reward_pos_mean", "loss", "response_length_mean", "truncation_rate"):
                if key in first:
                    lines.append(f"  {key}: {first[key]:.4f} (step {first['step']}) → {last[key]:.4f} "
                                 f"(step {last['step']})")
            if self.run_dir is not None:
                lines.append(f"  metrics: {self.run_dir / 'metrics.jsonl'}")
            print("\n".join(lines), file=sys.stdout, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
