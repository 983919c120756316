"""Step metrics: reduction over ranks, progress lines with ETA, ``<save>/metrics.jsonl``, TensorBoard, optional
wandb, and sample rationales (``<save>/samples.jsonl``)."""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from .config import LoggingConfig

PROGRESS_BAR_WIDTH = 20
SHOWN = (("reward_mean", "reward", "{:.3f}"), ("reward_pos_mean", "pos", "{:.3f}"),
         ("margin_mean", "margin", "{:+.4f}"), ("loss", "loss", "{:+.4f}"),
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


def tensorboard_dir(logging: LoggingConfig, save: str | None) -> Path | None:
    """``--tensorboard-dir``, else ``<save>/tensorboard`` (so it follows ``--save``), else none."""
    if logging.tensorboard_dir:
        return Path(logging.tensorboard_dir)
    return Path(save) / "tensorboard" if save else None


class MetricsLogger:
    """``settings``: every flag's value (``GraceConfig.flat()``), written to ``<save>/args.json`` and wandb."""

    def __init__(self, logging: LoggingConfig, *, save: str | None, settings: dict, is_logging_rank: bool):
        self.config = logging
        self.save = save
        self.settings = settings
        self.is_logging_rank = is_logging_rank
        self.run_dir = Path(save) if save else None
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
            (self.run_dir / "args.json").write_text(json.dumps(self.settings, indent=1) + "\n")
        events_dir = tensorboard_dir(self.config, self.save)
        if events_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(events_dir), purge_step=first_step + 1)
        if self.config.wandb_project:
            import wandb  # optional dependency: only imported when asked for

            self.wandb = wandb.init(project=self.config.wandb_project, name=self.config.wandb_exp_name,
                                    config=self.settings, resume="allow")

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
        if step % self.config.log_interval == 0 or step == self.last_step:
            print(self._progress_line(metrics), flush=True)

    def is_sampled_step(self, step: int) -> bool:
        """Steps 1, 1 + N, 1 + 2N, ... for ``--sample-interval N`` (0: none)."""
        interval = self.config.sample_interval
        return bool(interval) and (step - 1) % interval == 0

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


# ---------------------------------------------------------------------------------------------------- step metrics
def contrastive_step_metrics(step: int, batch, loss_metrics: dict, grad_norm: float, timings: dict, *,
                             micro_batch_size: int, is_last_stage: bool, lr: float) -> dict:
    """A contrastive baseline step's metrics (:mod:`megatron_grace.contrastive`), reduced over data-parallel ranks;
    the response length and truncation are 0 (no rationale), so curves and the report read like GRACE's."""
    computed, real = map(float, batch.token_counts(micro_batch_size))
    # The update runs over the same micro-batches as the forward.
    sums = {**loss_metrics, "forward_tokens": computed, "forward_real_tokens": real, "update_tokens": computed,
            "update_real_tokens": real}
    totals = reduce_metrics(sums, {}, is_contributing=is_last_stage)
    metrics = {"step": step, "loss": totals.get("loss", float("nan")),
               "reward_pos_mean": totals.get("positive_cos", float("nan")),
               "negative_cos_mean": totals.get("negative_cos", float("nan")),
               "top1_accuracy": totals.get("top1_accuracy", float("nan")),
               "response_length_mean": 0.0, "truncation_rate": 0.0, "grad_norm": grad_norm, "lr": lr}
    metrics.update(throughput_metrics(timings, totals, update_tokens=totals["update_real_tokens"]))
    return metrics


def throughput_metrics(timings: dict, totals: dict, *, update_tokens: float) -> dict:
    """Phase times, tokens per second and padding shares from step totals summed over ranks (``forward_tokens`` /
    ``forward_real_tokens``: computed / real tokens of the one-pass forward, and the same ``update_*`` of the
    update); ``update_tokens``: the tokens the update's loss covers."""
    result = {f"time_{phase}_s": seconds for phase, seconds in timings.items()}
    result["seconds_per_step"] = sum(timings.values())
    result["forward_tokens_per_s"] = totals["forward_tokens"] / max(timings["forward"], 1e-9)
    result["padding_share_forward"] = 1.0 - totals["forward_real_tokens"] / totals["forward_tokens"]
    if totals.get("update_tokens"):
        result["padding_share_update"] = 1.0 - totals["update_real_tokens"] / totals["update_tokens"]
    result["update_tokens_per_s"] = update_tokens / max(timings["update"], 1e-9)
    # Throughput as verl reports it: every real (prompt + rationale) token of the step, all ranks, per second.
    result["tokens_per_s"] = totals["forward_real_tokens"] / max(result["seconds_per_step"], 1e-9)
    result["peak_memory_gb"] = _peak_memory_gb()
    return result


def std_of_sums(total, squares, count) -> float:
    if total is None or squares is None:
        return float("nan")
    return math.sqrt(max(squares / count - (total / count) ** 2, 0.0))


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB
