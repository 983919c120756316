"""One GRPO step of GRACE, top to bottom (:class:`GrpoStep`); each stage's code is in this package.

1. rows      this rank's groups: ``--rollout-n`` main rows per prompt, one query (anchor) row and one per negative
             (``rows.py``)
2. rollout   the policy samples every row's rationale in one batch, main rows at T=1.0, the others at T=0.5, on its
             own TP/PP layout (``megatron_grace/rollout/``)
3. forward   ONE no-grad forward over prompt ⊕ rationale: old log-probs of the rationale tokens under each row's
             sampling distribution, and pooled embeddings (``experience.py``)
4. reward    cosine-similarity rewards over the global batch, length penalty, advantages = reward − group mean
             (``reward.py``, ``losses.py``), and the collapse signals of the batch (``collapse.py``)
5. update    PPO clipped surrogate with dual clip, token-mean over each mini-batch, one optimizer step per mini-batch
             (``update.py``)
6. metrics   reduced over ranks; at sampled steps the first group's rationales (``metrics.py``); the collapse
             alarm (``collapse.py``)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import fault_injection
from .collapse import CollapseAlarm, step_collapse_signals
from ..config import ObjectiveConfig, RolloutConfig, TrainingConfig
from .experience import SequenceBatch, one_pass_forward
from .losses import group_advantages
from .metrics import StepOutcome, grpo_step_metrics, rationale_samples
from .reward import GlobalEmbeddings, compute_rewards
from .rows import GrpoRows
from .update import grpo_update


@dataclass
class GrpoStep:
    """Runs a GRPO step on this rank's examples; the trainer builds it once with its collaborators."""

    model: object
    reference: object | None  # frozen initial policy for the KL term (None without it)
    optimizer: object  # GuardedOptimizer
    engine: object  # RolloutEngine
    nonfinite: object  # NonFiniteGuard
    phases: object  # StepPhases
    rollout: RolloutConfig
    training: TrainingConfig
    objective: ObjectiveConfig
    train_mode: str
    num_negatives: int
    pad_token_id: int
    length_multiple: int
    is_last_stage: bool
    log_samples: object | None = None  # callable(records) on the logging rank at sampled steps
    tokenizer: object | None = None
    collapse_alarm: CollapseAlarm | None = None

    def __call__(self, examples: list, step: int, *, with_lengths: bool, sample: bool, lr_of) -> dict:
        """Step ``step`` (1-based) on ``examples``. ``with_lengths``: metrics carry every response length;
        ``sample``: log the first group's rationales; ``lr_of()``: the learning rate after the update."""
        n, timings = self.rollout.rollout_n, self.phases.begin_step()
        temperatures = {"rollout_temperature": self.rollout.rollout_temperature,
                        "query_temperature": self.rollout.query_temperature}

        # 1. rows: whole groups per data-parallel rank.
        rows = GrpoRows(examples, n, self.num_negatives)

        # 2. rollout: main rows (group-major), then one query row per group, then one row per group and negative.
        with self.phases("rollout", step):
            requests = rows.requests(seed=self.training.seed, step=step - 1, **temperatures)
            rollouts = self.engine.generate(requests, self.rollout.max_response_length)

        # 3. one no-grad forward: old log-probs + pooled embeddings (last pipeline stage), under each row's sampling
        # distribution softmax(logits / T), as the rollout sampled it.
        with self.phases("forward", step):
            batch = SequenceBatch.build(rows.prompts(), rollouts, pad_token_id=self.pad_token_id,
                                        length_multiple=self.length_multiple)
            row_temperatures = rows.temperatures(**temperatures)
            micro_batch_size = self.training.micro_batch_size
            experience = one_pass_forward(self.model, batch, micro_batch_size, temperatures=row_temperatures)
            reference_log_probs = (one_pass_forward(self.reference, batch, micro_batch_size,
                                                    temperatures=row_temperatures).old_log_probs
                                   if self.reference is not None else None)

        # 4. rewards and advantages for this rank's main rows (last stage; other stages only need shapes).
        with self.phases("reward", step):
            truncated = torch.tensor([r.truncated for r in rollouts[rows.main]])
            rewards = advantages = collapse = None
            if self.is_last_stage:
                embeddings = GlobalEmbeddings.gather(experience.embeddings, rows)  # the whole batch's, once
                rewards = compute_rewards(embeddings, truncated, n, self.objective, mode=self.train_mode)
                fault_injection.nonfinite("reward", step, rewards["total"])
                advantages = group_advantages(rewards["total"], n, norm_by_std=self.objective.norm_adv_by_std)
                collapse = step_collapse_signals(embeddings, rollouts[rows.main], self.rollout.max_response_length,
                                                 n, mode=self.train_mode)

        # 5. PPO updates over mini-batches of whole groups (none if a reward is NaN/Inf on any rank).
        with self.phases("update", step):
            rewards_finite = self.nonfinite.check(step, "reward", [rewards["total"]] if rewards else [])
            update = (grpo_update(self.model, self.optimizer, batch, experience, reference_log_probs, advantages,
                                  rows, row_temperatures, training=self.training, objective=self.objective,
                                  step=step)
                      if rewards_finite else {"grad_norm": float("nan")})

        # 6. metrics and, at sampled steps, the first group's rationales.
        outcome = StepOutcome(rows, rollouts, batch, experience, rewards, advantages, collapse, update, timings)
        metrics = grpo_step_metrics(step, outcome, self.objective, mode=self.train_mode,
                                    micro_batch_size=micro_batch_size, with_lengths=with_lengths, lr=lr_of())
        if sample and self.log_samples is not None:
            first_rewards = rewards["total"][rows.first_group].tolist() if rewards else [None] * n
            self.log_samples(rationale_samples(step, examples[0], rollouts[rows.first_group], first_rewards,
                                               self.tokenizer))
        if self.collapse_alarm is not None:
            self.collapse_alarm.update(step, metrics)
        return metrics

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the step between runs: the collapse alarm's windows."""
        return {"collapse_alarm": self.collapse_alarm.state_dict()} if self.collapse_alarm is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.collapse_alarm is not None and "collapse_alarm" in state:
            self.collapse_alarm.load_state_dict(state["collapse_alarm"])
