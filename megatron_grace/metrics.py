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
from .experience import logprob_mismatch_sum
from .reward import ADVANTAGE_SHARE_TERMS, advantage_variance_sums

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
def grpo_step_metrics(step: int, batch, rollouts, rows, experience, rewards, advantages, update: dict,
                      timings: dict, *, config, is_last_stage: bool, with_lengths: bool, lr: float) -> dict:
    """A GRPO step's metrics (``metrics.jsonl``), reduced over data-parallel ranks from the last pipeline stage's
    values; returned on every rank. ``rows``: the step's :class:`~megatron_grace.step_rows.GrpoRows`; ``rewards``
    and ``advantages``: this rank's main rows (None off the last stage); ``update``: the update's sums and grad
    norm; ``with_lengths``: also every main row's response length (for the report's histogram)."""
    micro_batch_size, objective = config.training.micro_batch_size, config.objective
    main_lengths = batch.response_lengths[rows.main].float()
    main_rollouts = rollouts[rows.main]
    sums = {"main_rows": float(rows.num_main), "groups": float(rows.groups),
            "response_length_sum": float(main_lengths.sum()),
            "query_response_length_sum": float(batch.response_lengths[rows.query].sum()),
            "truncated": float(sum(r.truncated for r in main_rollouts)),
            "rollout_tokens": float(batch.response_lengths.sum())}
    sums["forward_tokens"], sums["forward_real_tokens"] = map(float, batch.token_counts(micro_batch_size))
    maxima = {"response_length_max": float(main_lengths.max())}
    if is_last_stage:
        for term, values in rewards.items():
            sums[f"reward_{term}_sum"] = float(values.sum())
            sums[f"reward_{term}_sq_sum"] = float((values.double() ** 2).sum())
        sums["advantage_sum"] = float(advantages.sum())
        sums["advantage_sq_sum"] = float((advantages.double() ** 2).sum())
        maxima["advantage_abs_max"] = float(advantages.abs().max())
        sums.update(advantage_variance_sums(rewards, torch.tensor([r.truncated for r in main_rollouts]),
                                            config.rollout.rollout_n, objective, mode=config.data.train_mode))
        sums["logprob_mismatch_sum"] = float(logprob_mismatch_sum(
            main_rollouts, experience.old_log_probs[rows.main], batch.response_target_mask()[rows.main]))
        sums.update({key: value for key, value in update.items() if key != "grad_norm"})
    lengths = {"response_lengths": main_lengths.long().tolist()} if with_lengths else {}
    metrics = reduce_metrics(sums, maxima, is_contributing=is_last_stage, concatenated=lengths)
    tokens = max(metrics.get("tokens", 0.0), 1.0)
    main_total = max(metrics["main_rows"], 1.0)
    result = {
        "step": step,
        "reward_mean": metrics.get("reward_total_sum", float("nan")) / main_total,
        "reward_std": _std(metrics.get("reward_total_sum"), metrics.get("reward_total_sq_sum"), main_total),
        "loss": metrics.get("policy_loss_sum", float("nan")) / tokens,
        "response_length_mean": metrics["response_length_sum"] / main_total,
        "response_length_max": metrics["response_length_max"],
        "query_response_length_mean": metrics["query_response_length_sum"] / max(metrics["groups"], 1.0),
        "truncation_rate": metrics["truncated"] / main_total,
        "advantage_mean": metrics.get("advantage_sum", float("nan")) / main_total,
        "advantage_std": _std(metrics.get("advantage_sum"), metrics.get("advantage_sq_sum"), main_total),
        "advantage_abs_max": metrics.get("advantage_abs_max", float("nan")),
        "clip_fraction": metrics.get("clipped", float("nan")) / tokens,
        "dual_clip_fraction": metrics.get("dual_clipped", float("nan")) / tokens,
        "logprob_mismatch": metrics.get("logprob_mismatch_sum", float("nan")) / tokens,
        "grad_norm": update["grad_norm"],
        "lr": lr,
    }
    for term in ("pos", "neg", "clust", "cross"):
        result[f"reward_{term}_mean"] = metrics.get(f"reward_{term}_sum", float("nan")) / main_total
    variance = metrics.get("advantage_var_sum", 0.0)
    for term in ADVANTAGE_SHARE_TERMS:  # NaN when no group had any spread
        result[f"advantage_share_{term}"] = (metrics.get(f"advantage_cov_{term}_sum", float("nan")) / variance
                                             if variance > 0 else float("nan"))
    if objective.kl_coef > 0:
        result["kl"] = metrics.get("kl_sum", float("nan")) / tokens
    if objective.entropy_coef > 0:
        result["entropy"] = metrics.get("entropy_sum", float("nan")) / tokens
    result["rollout_tokens_per_s"] = metrics["rollout_tokens"] / max(timings["rollout"], 1e-9)
    result.update(throughput_metrics(timings, metrics, update_tokens=tokens))
    if "response_lengths" in metrics:
        result["response_lengths"] = metrics["response_lengths"]
    return result


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


def _std(total, squares, count) -> float:
    if total is None or squares is None:
        return float("nan")
    return math.sqrt(max(squares / count - (total / count) ** 2, 0.0))


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def rationale_samples(step: int, example, rollouts, rewards, tokenizer) -> list[dict]:
    """``samples.jsonl`` records of one group: each main rationale, decoded, with its text and reward."""
    return [{"step": step, "sample_id": example.sample_id, "rollout": index, "text": example.row.main,
             "rationale": tokenizer.decode(rollout.response, skip_special_tokens=False),
             "response_length": len(rollout.response), "reward": reward, "truncated": rollout.truncated}
            for index, (rollout, reward) in enumerate(zip(rollouts, rewards))]
