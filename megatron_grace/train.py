"""GRACE training on Megatron-Core: ``torchrun ... -m megatron_grace.train [flags]`` (``examples/pretrain_grace.sh``).

One GRPO step, top to bottom (:meth:`GraceTrainer.grpo_step`):

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

import os
import time
from pathlib import Path

from .console import configure_console, timed_phase

configure_console()  # before Megatron-Core is imported: it warns at import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from . import faults
from .checkpointing import load_checkpoint, read_checkpoint_meta, resolve_checkpoint, save_checkpoint
from .config import GraceConfig, parse_args
from .contrastive import NO_RATIONALE, ContrastiveRows, contrastive_backward
from .data.dataset import load_grace_dataset
from .data.sampler import GroupSampler
from .experience import SequenceBatch, one_pass_forward
from .grpo import group_advantages
from .metrics import MetricsLogger, contrastive_step_metrics, grpo_step_metrics, rationale_samples
from .models import architecture_from_hf_dir
from .models.builder import build_gpt_model, make_transformer_config
from .models.convert import export_to_hf
from .models.hf_io import eos_token_ids, load_hf_weights
from .optim import GuardedOptimizer, wrap_for_training
from .platform import ParallelLayout, initialize_distributed
from .reliability import (NonFiniteGuard, StallWatchdog, check_finite_weights, check_save_location,
                          checkpoint_size_estimate)
from .reward import compute_rewards
from .rollout import RolloutEngine, RolloutRequest, row_seed
from .step_rows import GrpoRows
from .update import grpo_update


def log0(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


class GraceTrainer:
    def __init__(self, config: GraceConfig):
        from transformers import AutoTokenizer

        from .default_model import default_model_dir

        self.config = config
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.hf_dir = Path(config.model.hf_model) if config.model.hf_model else default_model_dir()
        self.checkpoint = self._find_checkpoint()
        self.arch = architecture_from_hf_dir(self.hf_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.hf_dir)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.params_dtype = torch.bfloat16 if config.model.bf16 else torch.float32

        with timed_phase(f"built the model ({self.arch.family}, {self.arch.num_layers} layers)", printer=log0):
            model = self._build_model()
        if self.checkpoint is None:
            with timed_phase(f"loaded the weights of {self.hf_dir}", printer=log0):
                load_hf_weights(model, self.hf_dir, self.arch)
        self.model, optimizer = wrap_for_training(model, config.optim)
        self.nonfinite = NonFiniteGuard(config.training.max_nonfinite_steps, log=log0)
        self.optimizer = GuardedOptimizer(self.model, optimizer, config.optim, self.nonfinite)
        self.reference = self._reference_model() if config.objective.kl_coef > 0 else None
        if config.checkpoint.save:
            check_save_location(config.checkpoint.save, checkpoint_size_estimate(
                self.model, parallel_state.get_model_parallel_group()))

        self.dataset = self._load_dataset()
        self.sampler = GroupSampler(len(self.dataset), config.training.global_batch_size, config.training.seed)
        self.iteration = 0
        if self.checkpoint is not None:
            with timed_phase(f"loaded {self.checkpoint}", printer=log0):
                self._resume()
        self.engine = None
        if config.objective.algorithm == "grace":
            self.engine = RolloutEngine(self.model,
                                        eos_token_ids=eos_token_ids(self.hf_dir, self.tokenizer, self.arch),
                                        pad_token_id=self.pad_token_id,
                                        sync_interval=config.rollout.rollout_sync_interval,
                                        decode_step=config.rollout.rollout_decode_step,
                                        cuda_graphs=config.rollout.rollout_cuda_graphs)
        self.logger = MetricsLogger(config.logging, save=config.checkpoint.save, settings=config.flat(),
                                    is_logging_rank=dist.get_rank() == dist.get_world_size() - 1)
        self.watchdog = StallWatchdog(config.parallel.distributed_timeout_minutes)

    # ------------------------------------------------------------------------------------------------ set-up
    def _find_checkpoint(self) -> Path | None:
        checkpoint_config = self.config.checkpoint
        if not checkpoint_config.load:
            return None
        checkpoint = resolve_checkpoint(checkpoint_config.load, log=log0,
                                        fallback_to_previous=checkpoint_config.fallback_to_previous_checkpoint)
        if checkpoint is None:
            log0(f"WARNING: --load {checkpoint_config.load} holds no checkpoint; starting from "
                 f"{self.config.model.hf_model or 'the default model'} (expected on the first launch)")
        return checkpoint

    def _build_model(self):
        config = make_transformer_config(self.arch, params_dtype=self.params_dtype,
                                         sequence_parallel=self.config.parallel.sequence_parallel,
                                         recompute=self.config.model.recompute_activations,
                                         hidden_dropout=self.config.objective.hidden_dropout)
        return build_gpt_model(self.arch, config)

    def _reference_model(self):
        reference = self._build_model()
        load_hf_weights(reference, self.hf_dir, self.arch)
        reference.eval()
        for param in reference.parameters():
            param.requires_grad_(False)
        return reference

    def _load_dataset(self):
        data = self.config.data
        dataset = load_grace_dataset(data.train_data, self.tokenizer, mode=data.train_mode,
                                     max_prompt_length=data.max_prompt_length, strict=data.strict_data,
                                     verbose=dist.get_rank() == 0)
        self.config.check_training_data(dataset.num_negatives)
        return dataset

    def _resume(self) -> None:
        meta = read_checkpoint_meta(self.checkpoint)
        with_optimizer = meta["has_optimizer"] and self.config.checkpoint.load_optim
        meta = load_checkpoint(self.checkpoint, self.model, self.optimizer.optimizer if with_optimizer else None,
                               arch=self.arch)
        run_state = meta.get("run_state", {})
        if "data" in run_state:
            self.sampler.load_state_dict(run_state["data"])
            self.iteration = meta["iteration"]
            self.optimizer.optimizer_steps = run_state.get("optimizer_steps", 0)
        log0(f"resumed from {self.checkpoint} at iteration {self.iteration}"
             f"{'' if with_optimizer else ' (weights only)'}; data position {self.sampler.state_dict()}")

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One step of ``--algorithm`` on the next global batch: the step's metrics, its skipped updates and the
        sample ids of its batch."""
        step = self.iteration + 1
        global_batch, examples = self._next_examples()
        algorithm_step = self.grpo_step if self.config.objective.algorithm == "grace" else self.contrastive_step
        metrics = algorithm_step(examples, step)
        metrics["skipped_updates"] = self.nonfinite.finish_step(step)
        metrics["sample_ids"] = [self.dataset[i].sample_id for i in global_batch]
        self.watchdog.idle()
        return metrics

    def grpo_step(self, examples: list, step: int) -> dict:
        config, timings, n = self.config, {}, self.config.rollout.rollout_n

        # 1. data: whole groups per data-parallel rank.
        rows = GrpoRows(examples, n, self.dataset.num_negatives)

        # 2. rollout: main rows (group-major), then one query row per group, then one row per group and negative.
        self.watchdog.enter("rollout", step)
        start = time.perf_counter()
        temperatures = {"rollout_temperature": config.rollout.rollout_temperature,
                        "query_temperature": config.rollout.query_temperature}
        requests = rows.requests(seed=config.training.seed, step=self.iteration, **temperatures)
        rollouts = self.engine.generate(requests, config.rollout.max_response_length)
        timings["rollout"] = time.perf_counter() - start

        # 3. one no-grad forward: old log-probs + pooled embeddings (last pipeline stage), under each row's sampling
        # distribution softmax(logits / T), as the rollout sampled it.
        self.watchdog.enter("forward", step)
        start = time.perf_counter()
        batch = SequenceBatch.build(rows.prompts(), rollouts, pad_token_id=self.pad_token_id,
                                    length_multiple=self._length_multiple())
        row_temperatures = rows.temperatures(**temperatures)
        micro_batch_size = config.training.micro_batch_size
        experience = one_pass_forward(self.model, batch, micro_batch_size, temperatures=row_temperatures)
        reference_log_probs = (one_pass_forward(self.reference, batch, micro_batch_size,
                                                temperatures=row_temperatures).old_log_probs
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
                                      truncated, n, config.objective, mode=config.data.train_mode)
            faults.nonfinite("reward", step, rewards["total"])
            advantages = group_advantages(rewards["total"], n, norm_by_std=config.objective.norm_adv_by_std)
        timings["reward"] = time.perf_counter() - start

        # 6. PPO updates over mini-batches of whole groups (none if a reward is NaN/Inf on any rank).
        self.watchdog.enter("update", step)
        start = time.perf_counter()
        rewards_finite = self.nonfinite.check(step, "reward", [rewards["total"]] if rewards else [])
        update = (grpo_update(self.model, self.optimizer, batch, experience, reference_log_probs, advantages, rows,
                              row_temperatures, config=config, step=step)
                  if rewards_finite else {"grad_norm": float("nan")})
        timings["update"] = time.perf_counter() - start
        self.iteration += 1

        # 7. metrics and, at sampled steps, the first group's rationales.
        metrics = grpo_step_metrics(self.iteration, batch, rollouts, rows, experience, rewards, advantages, update,
                                    timings, config=config, is_last_stage=self.is_last_stage,
                                    with_lengths=self._is_sampled_step(self.iteration),
                                    lr=self.optimizer.lr)
        if self._is_sampled_step(self.iteration) and self.logger.is_logging_rank:
            first_rewards = rewards["total"][rows.first_group].tolist() if rewards else [None] * n
            self.logger.samples(rationale_samples(self.iteration, examples[0], rollouts[rows.first_group],
                                                  first_rewards, self.tokenizer))
        return metrics

    def _next_examples(self) -> tuple[list[int], list]:
        """The global batch's dataset indices and this data-parallel rank's examples (a contiguous slice)."""
        global_batch = self.sampler.next_batch()
        local = GroupSampler.shard(global_batch, parallel_state.get_data_parallel_rank(), self.dp_size)
        return global_batch, [self.dataset[i] for i in local]

    def contrastive_step(self, examples: list, step: int) -> dict:
        """One step of a contrastive baseline (``--algorithm infonce | simcse``, :mod:`megatron_grace.contrastive`):
        embed the rows without rationale, the in-batch loss and its embedding gradients, one optimizer step."""
        config, timings = self.config, {}
        rows = ContrastiveRows.build(examples, config.objective.algorithm)
        batch = rows.sequence_batch(pad_token_id=self.pad_token_id, length_multiple=self._length_multiple())
        # SimCSE's two views differ by their dropout masks; the update replays the masks of the embedding pass.
        dropout_seed = (row_seed(config.training.seed, self.iteration, 0, 0)
                        if config.objective.hidden_dropout > 0 else None)

        self.watchdog.enter("update", step)
        self.optimizer.begin_update()
        outputs, loss_metrics = contrastive_backward(
            self.model, batch, rows, micro_batch_size=config.training.micro_batch_size,
            temperature=config.objective.contrastive_temperature, hidden_size=self.arch.hidden_size,
            dropout_seed=dropout_seed, timings=timings)
        start = time.perf_counter()
        _, grad_norm = self.optimizer.finish_update(step, outputs)
        timings["update"] += time.perf_counter() - start
        self.iteration += 1

        metrics = contrastive_step_metrics(self.iteration, batch, loss_metrics, grad_norm, timings,
                                           micro_batch_size=config.training.micro_batch_size,
                                           is_last_stage=self.is_last_stage, lr=self.optimizer.lr)
        return metrics

    def _is_sampled_step(self, step: int) -> bool:
        """Steps 1, 1 + N, 1 + 2N, ... for ``--sample-interval N`` (0: none)."""
        interval = self.config.logging.sample_interval
        return bool(interval) and (step - 1) % interval == 0

    def _length_multiple(self) -> int:
        """Sequence parallelism splits the sequence over TP ranks: widths must divide by TP."""
        return (parallel_state.get_tensor_model_parallel_world_size() if self.config.parallel.sequence_parallel
                else 1)

    # ------------------------------------------------------------------------------------------------ loop
    def steps(self):
        """Train up to ``--train-iters``, checkpointing every ``--save-interval`` steps and at the end (with
        ``--save``); yields each step's metrics before its checkpoint. The loop of :meth:`train` and of the
        multi-rank test workers."""
        interval = self.config.checkpoint.save_interval
        while self.iteration < self.config.training.train_iters:
            yield self.train_step()
            if interval and self.iteration % interval == 0:
                self.save()
        if not (interval and self.iteration % interval == 0):
            self.save()  # the final state, unless the interval has just saved it

    def save(self) -> None:
        save_dir = self.config.checkpoint.save
        if not save_dir:
            return
        self.watchdog.enter("save", self.iteration)
        check_finite_weights(self.model, self.iteration)
        flags = {k: v for k, v in self.config.flat().items() if isinstance(v, (int, float, str, bool))}
        run_state = {"data": self.sampler.state_dict(), "optimizer_steps": self.optimizer.optimizer_steps,
                     "args": flags}
        path = save_checkpoint(save_dir, self.iteration, self.model, self.optimizer.optimizer, arch=self.arch,
                               run_state=run_state, tokenizer_dir=self.hf_dir)
        self.watchdog.idle()
        log0(f"saved checkpoint {path}")

    def train(self) -> None:
        config, parallel = self.config, self.config.parallel
        log0(f"training {self.hf_dir.name} ({self.arch.family}, {self.arch.num_layers} layers) on "
             f"{dist.get_world_size()} ranks: TP{parallel.tensor_model_parallel_size} "
             f"PP{parallel.pipeline_model_parallel_size} DP{self.dp_size}; {len(self.dataset)} examples; "
             f"steps {self.iteration}→{config.training.train_iters}")
        with timed_phase("compiled the fused ops and kernels (one small rollout and forward)", printer=log0):
            self._warm_up()
        self.logger.start(self.iteration, config.training.train_iters)
        for metrics in self.steps():
            self.logger.log(metrics)
        self.logger.finish()
        if config.checkpoint.save and config.logging.report and self.logger.is_logging_rank:
            from .report import build_report

            print(f"run report: {build_report(config.checkpoint.save)}", flush=True)
        if config.checkpoint.export_hf:
            export_to_hf(self.model, self.arch, config.checkpoint.export_hf, tokenizer_dir=self.hf_dir)
            log0(f"exported the trained policy to {config.checkpoint.export_hf}")

    def _warm_up(self) -> None:
        """A two-row rollout of two tokens and its forward before step 1, so that torch.compile (Megatron-Core's fused
        RoPE and SwiGLU, for a fixed and then a dynamic shape) and the Triton kernels compile under a timed line
        instead of silently inside step 1. Nothing a step reads changes: each generate gets a fresh KV cache, the
        forward takes no gradients and sampling noise is counter-based."""
        example = self.dataset[0]
        prompts = [example.main, example.query]
        rollouts = [NO_RATIONALE] * 2
        if self.engine is not None:
            rollouts = self.engine.generate([RolloutRequest(prompt.input_ids, self.config.rollout.rollout_temperature,
                                                            0) for prompt in prompts], 2)
        batch = SequenceBatch.build(prompts, rollouts, pad_token_id=self.pad_token_id,
                                    length_multiple=self._length_multiple())
        one_pass_forward(self.model, batch, self.config.training.micro_batch_size)


def main(argv=None) -> None:
    config = parse_args(argv)
    configure_console(config.logging.log_level)
    config.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    parallel = config.parallel
    initialize_distributed(ParallelLayout(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                                          parallel.sequence_parallel),
                           seed=config.training.seed, timeout_minutes=parallel.distributed_timeout_minutes)
    trainer = GraceTrainer(config)
    trainer.train()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
