"""GRACE training on Megatron-Core: ``torchrun ... -m megatron_grace.train [flags]`` (``examples/pretrain_grace.sh``).

One GRPO step, top to bottom (:meth:`GraceTrainer.train_step`):

1. data      the next global batch of prompts; this data-parallel rank takes its contiguous slice of groups
2. rollout   the policy samples ``--rollout-n`` rationales per prompt at T=1.0, plus one query (anchor) rationale and
             one per negative at T=0.5, all in one batch, on its own TP/PP layout
3. forward   ONE no-grad forward over prompt ⊕ rationale: old log-probs of the rationale tokens and pooled embeddings
4. reward    cosine-similarity rewards over the global batch (embeddings all-gathered over DP), length penalty
5. advantage reward minus the group mean (optionally / std)
6. update    PPO clipped surrogate with dual clip, token-mean over each mini-batch, one optimizer step per mini-batch
7. log, sample, checkpoint
"""
from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from .console import configure_console, timed_phase

configure_console()  # before Megatron-Core is imported: it warns at import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from . import faults
from .arguments import parse_args, validate_args
from .contrastive import NO_RATIONALE, ContrastiveRows, contrastive_backward
from .checkpointing import load_checkpoint, read_checkpoint_meta, resolve_checkpoint, save_checkpoint
from .data.dataset import DataError, load_grace_dataset
from .data.sampler import GroupSampler
from .experience import SequenceBatch, logprob_mismatch_sum, one_pass_forward
from .grpo import ClipSettings, group_advantages, low_var_kl, ppo_clipped_token_losses, vocab_parallel_entropy
from .metrics import MetricsLogger, reduce_metrics
from .models import architecture_from_hf_dir
from .models.builder import build_gpt_model, make_transformer_config
from .models.config import ModelArchitecture
from .models.hf_io import load_hf_weights
from .optim import OptimizerSettings, optimizer_step, set_learning_rate, wrap_for_training, zero_grads
from .platform import ParallelLayout, initialize_distributed
from .reliability import (NonFiniteGuard, StallWatchdog, check_before_launch, check_finite_weights,
                          check_save_location, checkpoint_size_estimate)
from .reward import ADVANTAGE_SHARE_TERMS, RewardSettings, advantage_variance_sums, compute_rewards
from .rollout import RolloutEngine, RolloutRequest, row_seed
from .schedule import StageOutput, run_microbatches
from .step_rows import GrpoRows
from .utils import free_port


def log0(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def eos_token_ids(hf_dir: Path, tokenizer, arch: ModelArchitecture) -> list[int]:
    """End-of-response ids: the generation config's (chat models end turns with it), the config's and the
    tokenizer's."""
    ids: set[int] = set()
    generation_config = hf_dir / "generation_config.json"
    sources = [arch.eos_token_id, tokenizer.eos_token_id]
    if generation_config.is_file():
        sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    if not ids:
        raise ValueError(f"no EOS token id in {hf_dir} (config, generation_config or tokenizer)")
    return sorted(ids)


class GraceTrainer:
    def __init__(self, args):
        from transformers import AutoTokenizer

        self.args = args
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.hf_dir = Path(args.hf_model) if args.hf_model else self._default_model()
        self.checkpoint = self._find_checkpoint()
        self.arch = architecture_from_hf_dir(self.hf_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.hf_dir)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.params_dtype = torch.bfloat16 if args.bf16 else torch.float32

        with timed_phase(f"built the model ({self.arch.family}, {self.arch.num_layers} layers)", printer=log0):
            model = self._build_model()
        if self.checkpoint is None:
            with timed_phase(f"loaded the weights of {self.hf_dir}", printer=log0):
                load_hf_weights(model, self.hf_dir, self.arch)
        self.model, self.optimizer = wrap_for_training(model, OptimizerSettings(
            lr=args.lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
            clip_grad=args.clip_grad))
        self.reference = self._reference_model() if args.kl_coef > 0 else None
        if args.save:
            check_save_location(args.save, checkpoint_size_estimate(
                self.model, parallel_state.get_model_parallel_group()))

        self.dataset = load_grace_dataset(args.train_data, self.tokenizer, mode=args.train_mode,
                                          max_prompt_length=args.max_prompt_length, strict=args.strict_data,
                                          verbose=dist.get_rank() == 0)
        if args.algorithm == "infonce" and self.dataset.num_negatives == 0:
            raise DataError(f"--algorithm infonce needs hard negatives: the rows of {args.train_data} have no "
                            f"'negative' field")
        if (args.algorithm == "grace" and args.train_mode == "supervised" and args.reward_variant == "code"
                and self.dataset.num_negatives > 1):
            raise ValueError(f"--reward-variant code scores one negative per query, and the training data "
                             f"({args.train_data or 'the bundled sample'}) has "
                             f"{self.dataset.num_negatives}: use --reward-variant paper or per-rollout")
        self.sampler = GroupSampler(len(self.dataset), args.global_batch_size, args.seed)
        self.iteration = 0
        self.optimizer_steps = 0
        if self.checkpoint is not None:
            with timed_phase(f"loaded {self.checkpoint}", printer=log0):
                self._resume()
        self.engine = None
        if args.algorithm == "grace":
            self.engine = RolloutEngine(self.model,
                                        eos_token_ids=eos_token_ids(self.hf_dir, self.tokenizer, self.arch),
                                        pad_token_id=self.pad_token_id, sync_interval=args.rollout_sync_interval)
        self.reward_settings = RewardSettings(
            mode=args.train_mode, variant=args.reward_variant, temperature=args.reward_temperature,
            clustering_weight=args.clustering_weight, cross_group_weight=args.cross_group_weight,
            length_penalty=args.length_penalty)
        self.clip = ClipSettings(args.clip_ratio_low, args.clip_ratio_high, args.clip_ratio_c)
        self.logger = MetricsLogger(args, is_logging_rank=dist.get_rank() == dist.get_world_size() - 1)
        self.nonfinite = NonFiniteGuard(args.max_nonfinite_steps, log=log0)
        self.watchdog = StallWatchdog(args.distributed_timeout_minutes)

    # ------------------------------------------------------------------------------------------------ set-up
    def _default_model(self) -> Path:
        from .default_model import default_model_dir

        return default_model_dir()

    def _find_checkpoint(self) -> Path | None:
        if not self.args.load:
            return None
        checkpoint = resolve_checkpoint(self.args.load, fallback_to_previous=self.args.fallback_to_previous_checkpoint,
                                        log=log0)
        if checkpoint is None:
            source = self.args.hf_model or "the default model"
            log0(f"WARNING: --load {self.args.load} holds no checkpoint; starting from {source} "
                 f"(expected on the first launch)")
        return checkpoint

    def _build_model(self):
        config = make_transformer_config(self.arch, params_dtype=self.params_dtype,
                                         sequence_parallel=self.args.sequence_parallel,
                                         recompute=self.args.recompute_activations,
                                         hidden_dropout=self.args.hidden_dropout)
        return build_gpt_model(self.arch, config)

    def _reference_model(self):
        reference = self._build_model()
        load_hf_weights(reference, self.hf_dir, self.arch)
        reference.eval()
        for param in reference.parameters():
            param.requires_grad_(False)
        return reference

    def _resume(self) -> None:
        meta = read_checkpoint_meta(self.checkpoint)
        with_optimizer = meta["has_optimizer"] and not self.args.no_load_optim
        meta = load_checkpoint(self.checkpoint, self.model, self.optimizer if with_optimizer else None,
                               arch=self.arch)
        run_state = meta.get("run_state", {})
        if "data" in run_state:
            self.sampler.load_state_dict(run_state["data"])
            self.iteration = meta["iteration"]
            self.optimizer_steps = run_state.get("optimizer_steps", 0)
        log0(f"resumed from {self.checkpoint} at iteration {self.iteration}"
             f"{'' if with_optimizer else ' (weights only)'}; data position {self.sampler.state_dict()}")

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        if self.args.algorithm != "grace":
            return self.contrastive_step()
        args, timings = self.args, {}
        n, step = args.rollout_n, self.iteration + 1

        # 1. data: whole groups per data-parallel rank.
        global_batch, examples = self._next_examples()
        rows = GrpoRows(examples, n, self.dataset.num_negatives)

        # 2. rollout: main rows (group-major), then one query row per group, then one row per group and negative.
        self.watchdog.enter("rollout", step)
        start = time.perf_counter()
        requests = rows.requests(seed=args.seed, step=self.iteration, rollout_temperature=args.rollout_temperature,
                                 query_temperature=args.query_temperature)
        rollouts = self.engine.generate(requests, args.max_response_length)
        timings["rollout"] = time.perf_counter() - start

        # 3. one no-grad forward: old log-probs + pooled embeddings (last pipeline stage).
        self.watchdog.enter("forward", step)
        start = time.perf_counter()
        batch = SequenceBatch.build(rows.prompts(), rollouts, pad_token_id=self.pad_token_id,
                                    length_multiple=self._length_multiple())
        # Log-probs under each row's sampling distribution, softmax(logits / T), as the rollout sampled it.
        temperatures = rows.temperatures(rollout_temperature=args.rollout_temperature,
                                         query_temperature=args.query_temperature)
        experience = one_pass_forward(self.model, batch, args.micro_batch_size, temperatures=temperatures)
        reference_log_probs = (one_pass_forward(self.reference, batch, args.micro_batch_size,
                                                temperatures=temperatures).old_log_probs
                               if self.reference is not None else None)
        timings["forward"] = time.perf_counter() - start

        # 4-5. rewards and advantages for this rank's main rows (last stage; other stages only need shapes).
        self.watchdog.enter("reward", step)
        start = time.perf_counter()
        truncated = torch.tensor([r.truncated for r in rollouts[rows.main]])
        rewards = advantages = None
        if self.is_last_stage:
            embeddings = experience.embeddings
            rewards = compute_rewards(embeddings[rows.main], embeddings[rows.query], rows.negatives_view(embeddings),
                                      truncated, n, self.reward_settings)
            faults.nonfinite("reward", step, rewards["total"])
            advantages = group_advantages(rewards["total"], n, norm_by_std=args.norm_adv_by_std)
        timings["reward"] = time.perf_counter() - start
        # The first group's rationales, for samples.jsonl and the run report (read by _log_samples).
        self.last_sample = (examples[0], rollouts[rows.first_group],
                            rewards["total"][rows.first_group].tolist() if rewards else [None] * n)

        # 6. PPO updates over mini-batches of whole groups (none if a reward is NaN/Inf on any rank).
        self.watchdog.enter("update", step)
        start = time.perf_counter()
        rewards_finite = self.nonfinite.check(step, "reward", [rewards["total"]] if rewards else [])
        update = (self._update(batch, experience, reference_log_probs, advantages, rows, temperatures)
                  if rewards_finite else {"grad_norm": float("nan")})
        timings["update"] = time.perf_counter() - start
        self.iteration += 1

        metrics = self._step_metrics(batch, rollouts, rows, experience, rewards, advantages, update,
                                     timings)
        metrics["skipped_updates"] = self.nonfinite.finish_step(step)
        metrics["sample_ids"] = [self.dataset[i].sample_id for i in global_batch]
        self.watchdog.idle()
        return metrics

    def _next_examples(self) -> tuple[list[int], list]:
        """The global batch's dataset indices and this data-parallel rank's examples (a contiguous slice)."""
        global_batch = self.sampler.next_batch()
        local = GroupSampler.shard(global_batch, parallel_state.get_data_parallel_rank(), self.dp_size)
        return global_batch, [self.dataset[i] for i in local]

    def contrastive_step(self) -> dict:
        """One step of a contrastive baseline (``--algorithm infonce | simcse``, :mod:`megatron_grace.contrastive`):
        embed the rows without rationale, the in-batch loss and its embedding gradients, one optimizer step."""
        args, timings, step = self.args, {}, self.iteration + 1
        global_batch, examples = self._next_examples()
        rows = ContrastiveRows.build(examples, args.algorithm)
        batch = rows.sequence_batch(pad_token_id=self.pad_token_id, length_multiple=self._length_multiple())
        # SimCSE's two views differ by their dropout masks; the update replays the masks of the embedding pass.
        dropout_seed = row_seed(args.seed, self.iteration, 0, 0) if args.hidden_dropout > 0 else None

        self.watchdog.enter("update", step)
        self._set_lr()
        zero_grads(self.model, self.optimizer)
        outputs, loss_metrics = contrastive_backward(
            self.model, batch, rows, micro_batch_size=args.micro_batch_size,
            temperature=args.contrastive_temperature, hidden_size=self.arch.hidden_size, dropout_seed=dropout_seed,
            timings=timings)
        start = time.perf_counter()
        _, grad_norm = self._checked_optimizer_step(step, outputs)
        timings["update"] += time.perf_counter() - start
        self.iteration += 1

        computed, real = map(float, batch.token_counts(args.micro_batch_size))
        # The update runs over the same micro-batches as the forward.
        sums = {**loss_metrics, "forward_tokens": computed, "forward_real_tokens": real, "update_tokens": computed,
                "update_real_tokens": real}
        totals = reduce_metrics(sums, {}, is_contributing=self.is_last_stage)
        metrics = {"step": self.iteration, "loss": totals.get("loss", float("nan")),
                   "reward_pos_mean": totals.get("positive_cos", float("nan")),
                   "negative_cos_mean": totals.get("negative_cos", float("nan")),
                   "top1_accuracy": totals.get("top1_accuracy", float("nan")),
                   "response_length_mean": 0.0, "truncation_rate": 0.0,
                   "grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"]}
        metrics.update(self._throughput_metrics(timings, totals, update_tokens=totals["update_real_tokens"]))
        metrics["skipped_updates"] = self.nonfinite.finish_step(step)
        metrics["sample_ids"] = [self.dataset[i].sample_id for i in global_batch]
        self.watchdog.idle()
        return metrics

    def _checked_optimizer_step(self, step: int, outputs: list[dict]) -> tuple[bool, float]:
        """The optimizer step after a forward/backward schedule, unless a loss or a gradient is NaN/Inf (checked
        before optimizer.step(), which clips with the grad norm and applies the update in one call). Returns
        (applied, grad norm; NaN when skipped)."""
        faults.nonfinite("grad", step, next(self.model.parameters()).main_grad)
        if not (self.nonfinite.check(step, "loss", [v for out in outputs for v in out.values()])
                and self.nonfinite.check_gradients(step, self.model)):
            return False, float("nan")
        _, grad_norm = optimizer_step(self.model, self.optimizer)
        self.optimizer_steps += 1
        return True, float("nan") if grad_norm is None else grad_norm

    def _update(self, batch: SequenceBatch, experience, reference_log_probs, advantages, rows: GrpoRows,
                temperatures: torch.Tensor) -> dict:
        args = self.args
        rows_per_mini_batch = args.ppo_mini_batch_size // self.dp_size * args.rollout_n
        width = batch.tokens.shape[1] - 1
        old_log_probs = experience.old_log_probs if self.is_last_stage else torch.zeros(len(batch), width)
        main_rows = rows.num_main
        if advantages is None:
            advantages = torch.zeros(main_rows)
        per_row = {"advantages": advantages, "old_log_probs": old_log_probs[rows.main],
                   "temperatures": temperatures[rows.main]}
        if reference_log_probs is not None:
            per_row["reference_log_probs"] = (reference_log_probs if self.is_last_stage
                                              else torch.zeros(len(batch), width))[rows.main]
        main = batch.select(rows.main)
        totals: dict[str, float] = {}
        grad_norms = []
        step = self.iteration + 1
        for _ in range(args.ppo_epochs):
            for first in range(0, main_rows, rows_per_mini_batch):
                rows = slice(first, first + rows_per_mini_batch)
                mini = main.select(rows)
                micro = mini.microbatches(args.micro_batch_size, **{k: v[rows] for k, v in per_row.items()})
                computed, real = mini.token_counts(args.micro_batch_size)
                totals["update_tokens"] = totals.get("update_tokens", 0.0) + computed
                totals["update_real_tokens"] = totals.get("update_real_tokens", 0.0) + real
                self._set_lr()
                zero_grads(self.model, self.optimizer)
                outputs = run_microbatches(self.model, micro, self._policy_loss, forward_only=False,
                                           need_logits=args.entropy_coef > 0)
                applied, grad_norm = self._checked_optimizer_step(step, outputs)
                grad_norms.append(grad_norm)
                if not applied:
                    continue
                for out in outputs:
                    for key, value in out.items():
                        totals[key] = totals.get(key, 0.0) + float(value)
        totals["grad_norm"] = max(grad_norms) if grad_norms else float("nan")
        return totals

    def _policy_loss(self, micro: dict, output: StageOutput):
        args = self.args
        log_probs = output.log_probs
        mask = (micro["response_mask"] & ~micro["is_filler"].unsqueeze(1)).float()
        advantages = micro["advantages"].unsqueeze(1).to(log_probs.dtype)
        losses, clipped, dual_clipped = ppo_clipped_token_losses(log_probs, micro["old_log_probs"], advantages,
                                                                 self.clip)
        policy_loss_sum = (losses * mask).sum()
        faults.nonfinite("loss", self.iteration + 1, policy_loss_sum)
        loss = policy_loss_sum
        metrics = {"policy_loss_sum": policy_loss_sum.detach(), "clipped": (clipped.float() * mask).sum(),
                   "dual_clipped": (dual_clipped.float() * mask).sum()}
        if "reference_log_probs" in micro:
            kl_sum = (low_var_kl(log_probs, micro["reference_log_probs"]) * mask).sum()
            loss = loss + args.kl_coef * kl_sum
            metrics["kl_sum"] = kl_sum.detach()
        if args.entropy_coef > 0:
            entropy_sum = (vocab_parallel_entropy(output.logits[:, :-1]) * mask).sum()
            loss = loss - args.entropy_coef * entropy_sum
            metrics["entropy_sum"] = entropy_sum.detach()
        num_tokens = mask.sum().to(torch.int)
        metrics["tokens"] = num_tokens.float()
        return loss, num_tokens, metrics

    def _set_lr(self) -> None:
        warmup = self.args.lr_warmup_iters
        scale = min(1.0, (self.optimizer_steps + 1) / warmup) if warmup > 0 else 1.0
        set_learning_rate(self.optimizer, self.args.lr * scale)

    def _step_metrics(self, batch, rollouts, rows: GrpoRows, experience, rewards, advantages, update,
                      timings) -> dict:
        """Per-step metrics, reduced over data-parallel ranks on the last stage; returned on every rank."""
        main_lengths = batch.response_lengths[rows.main].float()
        main_rollouts = rollouts[rows.main]
        sums = {"main_rows": float(rows.num_main), "groups": float(rows.groups),
                "response_length_sum": float(main_lengths.sum()),
                "query_response_length_sum": float(batch.response_lengths[rows.query].sum()),
                "truncated": float(sum(r.truncated for r in main_rollouts)),
                "rollout_tokens": float(batch.response_lengths.sum())}
        sums["forward_tokens"], sums["forward_real_tokens"] = map(float, batch.token_counts(self.args.micro_batch_size))
        maxima = {"response_length_max": float(main_lengths.max())}
        if self.is_last_stage:
            for term, values in rewards.items():
                sums[f"reward_{term}_sum"] = float(values.sum())
                sums[f"reward_{term}_sq_sum"] = float((values.double() ** 2).sum())
            sums["advantage_sum"] = float(advantages.sum())
            sums["advantage_sq_sum"] = float((advantages.double() ** 2).sum())
            maxima["advantage_abs_max"] = float(advantages.abs().max())
            sums.update(advantage_variance_sums(rewards, torch.tensor([r.truncated for r in main_rollouts]),
                                                self.args.rollout_n, self.reward_settings))
            sums["logprob_mismatch_sum"] = float(logprob_mismatch_sum(
                main_rollouts, experience.old_log_probs[rows.main], batch.response_target_mask()[rows.main]))
            sums.update({key: value for key, value in update.items() if key != "grad_norm"})
        # At sampled steps every main row's response length, for the report's length histogram.
        lengths = {"response_lengths": main_lengths.long().tolist()} if self._is_sampled_step(self.iteration) else {}
        metrics = reduce_metrics(sums, maxima, is_contributing=self.is_last_stage, concatenated=lengths)
        tokens = max(metrics.get("tokens", 0.0), 1.0)
        main_total = max(metrics["main_rows"], 1.0)
        result = {
            "step": self.iteration,
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
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        for term in ("pos", "neg", "clust", "cross"):
            result[f"reward_{term}_mean"] = metrics.get(f"reward_{term}_sum", float("nan")) / main_total
        variance = metrics.get("advantage_var_sum", 0.0)
        for term in ADVANTAGE_SHARE_TERMS:  # NaN when no group had any spread
            result[f"advantage_share_{term}"] = (metrics.get(f"advantage_cov_{term}_sum", float("nan")) / variance
                                                 if variance > 0 else float("nan"))
        if self.args.kl_coef > 0:
            result["kl"] = metrics.get("kl_sum", float("nan")) / tokens
        if self.args.entropy_coef > 0:
            result["entropy"] = metrics.get("entropy_sum", float("nan")) / tokens
        result["rollout_tokens_per_s"] = metrics["rollout_tokens"] / max(timings["rollout"], 1e-9)
        result.update(self._throughput_metrics(timings, metrics, update_tokens=tokens))
        if "response_lengths" in metrics:
            result["response_lengths"] = metrics["response_lengths"]
        return result

    @staticmethod
    def _throughput_metrics(timings: dict, totals: dict, *, update_tokens: float) -> dict:
        """Phase times, tokens per second and padding shares from step totals summed over ranks
        (``forward_tokens``/``forward_real_tokens``: computed/real tokens of the one-pass forward, and the same
        ``update_*`` of the update); ``update_tokens``: the tokens the update's loss covers."""
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

    def _is_sampled_step(self, step: int) -> bool:
        """Steps 1, 1 + N, 1 + 2N, ... for ``--sample-interval N`` (0: none)."""
        return bool(self.args.sample_interval) and (step - 1) % self.args.sample_interval == 0

    # ------------------------------------------------------------------------------------------------ loop
    def save(self) -> None:
        if not self.args.save:
            return
        self.watchdog.enter("save", self.iteration)
        check_finite_weights(self.model, self.iteration)
        run_state = {"data": self.sampler.state_dict(), "optimizer_steps": self.optimizer_steps,
                     "args": {k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, bool))}}
        path = save_checkpoint(self.args.save, self.iteration, self.model, self.optimizer, arch=self.arch,
                               run_state=run_state, tokenizer_dir=self.hf_dir)
        self.watchdog.idle()
        log0(f"saved checkpoint {path}")

    def train(self) -> None:
        args = self.args
        log0(f"training {self.hf_dir.name} ({self.arch.family}, {self.arch.num_layers} layers) on "
             f"{dist.get_world_size()} ranks: TP{args.tensor_model_parallel_size} "
             f"PP{args.pipeline_model_parallel_size} DP{self.dp_size}; {len(self.dataset)} examples; "
             f"steps {self.iteration}→{args.train_iters}")
        with timed_phase("compiled the fused ops and kernels (one small rollout and forward)", printer=log0):
            self._warm_up()
        self.logger.start(self.iteration, args.train_iters)
        while self.iteration < args.train_iters:
            metrics = self.train_step()
            self.logger.log(metrics)
            if self.engine is not None and self._is_sampled_step(self.iteration):
                self._log_samples()
            if args.save_interval and self.iteration % args.save_interval == 0:
                self.save()
        if args.save and not (args.save_interval and self.iteration % args.save_interval == 0):
            self.save()
        self.logger.finish()
        if args.save and args.report and self.logger.is_logging_rank:
            from .report import build_report

            print(f"run report: {build_report(args.save)}", flush=True)
        if args.export_hf:
            self._export_hf()

    def _warm_up(self) -> None:
        """A two-row rollout of two tokens and its forward before step 1, so that torch.compile (Megatron-Core's fused
        RoPE and SwiGLU, for a fixed and then a dynamic shape) and the Triton kernels compile under a timed line
        instead of silently inside step 1. Nothing a step reads changes: each generate gets a fresh KV cache, the
        forward takes no gradients and sampling noise is counter-based."""
        example = self.dataset[0]
        prompts = [example.main, example.query]
        rollouts = [NO_RATIONALE] * 2
        if self.engine is not None:
            rollouts = self.engine.generate([RolloutRequest(prompt.input_ids, self.args.rollout_temperature, 0)
                                             for prompt in prompts], 2)
        batch = SequenceBatch.build(prompts, rollouts, pad_token_id=self.pad_token_id,
                                    length_multiple=self._length_multiple())
        one_pass_forward(self.model, batch, self.args.micro_batch_size)

    def _length_multiple(self) -> int:
        """Sequence parallelism splits the sequence over TP ranks: widths must divide by TP."""
        return parallel_state.get_tensor_model_parallel_world_size() if self.args.sequence_parallel else 1

    def _log_samples(self) -> None:
        """The logging rank's first group of the step: each main rationale, decoded, with its text and reward."""
        if not self.logger.is_logging_rank:
            return
        example, rollouts, rewards = self.last_sample
        self.logger.samples([{"step": self.iteration, "sample_id": example.sample_id, "rollout": index,
                              "text": example.row.main,
                              "rationale": self.tokenizer.decode(rollout.response, skip_special_tokens=False),
                              "response_length": len(rollout.response), "reward": reward,
                              "truncated": rollout.truncated}
                             for index, (rollout, reward) in enumerate(zip(rollouts, rewards))])

    def _export_hf(self) -> None:
        if dist.get_rank() == 0:
            command = [sys.executable, "-m", "megatron_grace.cli.convert_hf", "mcore-to-hf", "--load", self.args.save, "--save", self.args.export_hf, "--overwrite"]
            # A world of one on a port of its own, outside torchrun's agent store: the training job's rendezvous is
            # still up and would otherwise be joined.
            env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "GROUP_", "ROLE_"))}
            env.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_PORT=str(free_port()))
            subprocess.run(command, check=True, env=env)
            print(f"exported the trained policy to {self.args.export_hf}", flush=True)
        dist.barrier()


def _std(total, squares, count) -> float:
    if total is None or squares is None:
        return float("nan")
    return math.sqrt(max(squares / count - (total / count) ** 2, 0.0))


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def main(argv=None) -> None:
    args = parse_args(argv)
    configure_console(args.log_level)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_args(args, world_size)
    check_before_launch(args)
    initialize_distributed(ParallelLayout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                          args.sequence_parallel),
                           seed=args.seed, timeout_minutes=args.distributed_timeout_minutes)
    trainer = GraceTrainer(args)
    trainer.train()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
