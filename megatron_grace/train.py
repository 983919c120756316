"""GRACE training on Megatron-Core: ``torchrun ... -m megatron_grace.train [flags]`` (``examples/pretrain_grace.sh``).

:class:`GraceTrainer` sets up the policy, its optimizer, data and checkpoints, picks the step of ``--algorithm`` once
(:class:`~megatron_grace.grpo.GrpoStep`, read top to bottom there, or
:class:`~megatron_grace.contrastive.ContrastiveStep` for the baselines), runs the loop and saves.
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

from . import fault_injection
from .checkpointing import (checkpoint_to_resume, export_to_hf, load_checkpoint, read_checkpoint_meta,
                            save_checkpoint)
from .config import GraceConfig, parse_args
from .contrastive import NO_RATIONALE, ContrastiveStep
from .data.dataset import load_grace_dataset
from .data.sampler import GroupSampler
from .grpo import GrpoStep
from .grpo.collapse import CollapseAlarm, collapse_remedies, margin_description
from .grpo.experience import SequenceBatch, one_pass_forward
from .guards import (NonFiniteGuard, StallWatchdog, StepPhases, check_finite_weights, check_save_location,
                     checkpoint_size_estimate)
from .metrics import MetricsLogger
from .models import architecture_from_hf_dir
from .models.builder import build_gpt_model, make_transformer_config
from .models.hf_io import eos_token_ids, load_hf_weights
from .optim import GuardedOptimizer, wrap_for_training
from .planned_exit import ExitReason, PlannedExit
from .platform import ParallelLayout, initialize_distributed, sequence_length_multiple
from .rollout import RolloutEngine, RolloutRequest


def log0(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


class GraceTrainer:
    def __init__(self, config: GraceConfig, *, started: float | None = None):
        """``started``: ``time.monotonic()`` at the process's start, for ``--exit-duration-in-mins`` (default: now)."""
        from transformers import AutoTokenizer

        from .default_model import default_model_dir

        self.config = config
        # First, so that a signal during the slow set-up is a request too (acted on at the first step boundary).
        self.planned_exit = PlannedExit(config.checkpoint, started=started or time.monotonic(), first_iteration=0)
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.hf_dir = Path(config.model.hf_model) if config.model.hf_model else default_model_dir()
        self.checkpoint = checkpoint_to_resume(config.checkpoint, config.model.hf_model or 'the default model',
                                               log=log0)
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
        self.iteration = self.saved_iteration = 0
        step_state = {}
        if self.checkpoint is not None:
            with timed_phase(f"loaded {self.checkpoint}", printer=log0):
                step_state = self._resume()
        self.planned_exit.first_iteration = self.iteration
        self.exit_reason = ExitReason.NONE
        self.logger = MetricsLogger(config.logging, save=config.checkpoint.save, settings=config.flat(),
                                    is_logging_rank=dist.get_rank() == dist.get_world_size() - 1)
        self.watchdog = StallWatchdog(config.parallel.distributed_timeout_minutes)
        self.engine = None
        self.algorithm_step = self._build_step(StepPhases(self.watchdog))
        self.algorithm_step.load_state_dict(step_state)

    # ------------------------------------------------------------------------------------------------ set-up
    def _build_step(self, phases: StepPhases):
        """The step of ``--algorithm``, built once: GRPO with its rollout engine, or a contrastive baseline."""
        config = self.config
        common = dict(model=self.model, optimizer=self.optimizer, phases=phases, training=config.training,
                      objective=config.objective, pad_token_id=self.pad_token_id,
                      length_multiple=sequence_length_multiple(self.config.parallel), is_last_stage=self.is_last_stage)
        if config.objective.algorithm != "grace":
            return ContrastiveStep(hidden_size=self.arch.hidden_size, **common)
        rollout = config.rollout
        self.engine = RolloutEngine(self.model, rollout,
                                    eos_token_ids=eos_token_ids(self.hf_dir, self.tokenizer, self.arch),
                                    pad_token_id=self.pad_token_id)
        stop = self.planned_exit.request_on_collapse if config.checkpoint.stop_on_collapse else None
        remedies = collapse_remedies(config.objective.reward_variant, config.objective.kl_coef, config.optim.lr)
        margin = margin_description(config.data.train_mode, self.dataset.num_negatives)
        alarm = CollapseAlarm(config.logging.collapse_window, margin=margin, remedies=remedies, stop=stop, log=log0)
        return GrpoStep(reference=self.reference, engine=self.engine, nonfinite=self.nonfinite, rollout=rollout,
                        train_mode=config.data.train_mode, num_negatives=self.dataset.num_negatives,
                        log_samples=self.logger.samples if self.logger.is_logging_rank else None,
                        tokenizer=self.tokenizer, collapse_alarm=alarm, **common)

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

    def _resume(self) -> dict:
        """Load the checkpoint; returns the state the algorithm's step kept in it."""
        meta = read_checkpoint_meta(self.checkpoint)
        with_optimizer = meta["has_optimizer"] and self.config.checkpoint.load_optim
        meta = load_checkpoint(self.checkpoint, self.model, self.optimizer.optimizer if with_optimizer else None,
                               arch=self.arch)
        run_state = meta.get("run_state", {})
        if "data" in run_state:
            self.sampler.load_state_dict(run_state["data"])
            self.iteration = self.saved_iteration = meta["iteration"]
            self.optimizer.optimizer_steps = run_state.get("optimizer_steps", 0)
        log0(f"resumed from {self.checkpoint} at iteration {self.iteration}"
             f"{'' if with_optimizer else ' (weights only)'}; data position {self.sampler.state_dict()}")
        return run_state.get("step", {})

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One step of ``--algorithm`` on the next global batch (this rank's contiguous slice of its groups): the
        step's metrics, its skipped updates and the sample ids of its batch."""
        step = self.iteration + 1
        global_batch = self.sampler.next_batch()
        local = GroupSampler.shard(global_batch, parallel_state.get_data_parallel_rank(), self.dp_size)
        sampled = self.logger.is_sampled_step(step)
        metrics = self.algorithm_step([self.dataset[i] for i in local], step, with_lengths=sampled, sample=sampled,
                                      lr_of=lambda: self.optimizer.lr)
        self.iteration = step
        metrics["skipped_updates"] = self.nonfinite.finish_step(step)
        metrics["sample_ids"] = [self.dataset[i].sample_id for i in global_batch]
        self.watchdog.idle()
        return metrics

    # ------------------------------------------------------------------------------------------------ loop
    def steps(self):
        """Train up to ``--train-iters``, checkpointing every ``--save-interval`` steps and at the end (with
        ``--save``), or up to a planned exit (``planned_exit.py``), which all ranks agree on at a step boundary: the
        last completed step is saved. Yields each step's metrics before its checkpoint. The loop of :meth:`train`
        and of the multi-rank test workers."""
        interval, train_iters = self.config.checkpoint.save_interval, self.config.training.train_iters
        fault_injection.point("first_step", self.iteration + 1)
        while self.iteration < train_iters:
            self.exit_reason = self.planned_exit.requested(self.iteration)
            if self.exit_reason:
                break
            yield self.train_step()
            if interval and self.iteration % interval == 0:
                self.save()
        if self.saved_iteration != self.iteration:
            self.save()  # the last completed step, unless it is saved already
        self.planned_exit.finish(self.exit_reason, self.iteration, train_iters)

    def save(self) -> None:
        save_dir = self.config.checkpoint.save
        if not save_dir:
            return
        self.watchdog.enter("save", self.iteration)
        check_finite_weights(self.model, self.iteration)
        flags = {k: v for k, v in self.config.flat().items() if isinstance(v, (int, float, str, bool))}
        run_state = {"data": self.sampler.state_dict(), "optimizer_steps": self.optimizer.optimizer_steps,
                     "step": self.algorithm_step.state_dict(),
                     "args": flags}
        path = save_checkpoint(save_dir, self.iteration, self.model, self.optimizer.optimizer, arch=self.arch,
                               run_state=run_state, tokenizer_dir=self.hf_dir)
        self.saved_iteration = self.iteration
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
        if config.checkpoint.export_hf and not self.exit_reason:  # the export is of the final policy
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
                                    length_multiple=sequence_length_multiple(self.config.parallel))
        one_pass_forward(self.model, batch, self.config.training.micro_batch_size)


def main(argv=None) -> None:
    started = time.monotonic()
    config = parse_args(argv)
    configure_console(config.logging.log_level)
    config.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    parallel = config.parallel
    initialize_distributed(ParallelLayout(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                                          parallel.sequence_parallel),
                           seed=config.training.seed, timeout_minutes=parallel.distributed_timeout_minutes)
    trainer = GraceTrainer(config, started=started)
    trainer.train()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
