"""The contrastive baselines GRACE is compared with, trained in the same system: ``--algorithm infonce | simcse``.

Both embed texts with the GRACE prompt and pooling and *no* rationale (the paper's Base protocol), and train the
policy through the pooling kernel's backward on an InfoNCE loss over the global batch:

* ``infonce`` (supervised rows): query q_i against the candidates {every positive p_j} ∪ {every hard negative}
  of all data-parallel ranks; the target is its own positive.
* ``simcse`` (unsupervised text): the text embedded twice with dropout on (``--hidden-dropout``); view a_i against
  every view b_j, the target is its own second view.

loss = (1/Q) Σ_i −log softmax_j(cos(anchor_i, candidate_j) / τ)[own positive], Q anchors in the global batch.

Megatron's pipeline schedules back-propagate one micro-batch at a time, but an in-batch loss couples every row of the
global batch. The step therefore runs in two passes (GradCache, Gao et al. 2021; sentence-transformers'
``CachedMultipleNegativesRankingLoss`` does the same):

1. the one-pass forward (:func:`~megatron_grace.grpo.experience.one_pass_forward`, no grad) gives every row's pooled
   embedding on the last pipeline stage; the embeddings are all-gathered over data-parallel ranks, every rank
   evaluates the full loss on a leaf copy and back-propagates it to the embeddings (a [rows, H] tensor: cheap);
2. the usual forward/backward schedule over the same micro-batches with the surrogate loss Σ_rows ⟨pooled, ∂L/∂pooled⟩,
   whose parameter gradient is exactly ∂L/∂θ for this rank's rows; Megatron DDP sums the ranks' contributions.

For SimCSE the two passes must see the same dropout masks: both run with the same ``dropout_seed``, which
:func:`~megatron_grace.schedule.run_microbatches` turns into a seed per (micro-batch, layer), so the masks replay
exactly and do not depend on the pipeline layout.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from .config import ObjectiveConfig, TrainingConfig
from .data.dataset import GraceExample
from .data.prompts import Prompt
from .grpo.experience import SequenceBatch, one_pass_forward, pool_hidden
from .grpo.reward import all_gather_data_parallel
from .kernels.sample_tokens import row_seed
from .metrics import contrastive_step_metrics
from .rollout import Rollout
from .schedule import StageOutput, run_microbatches

NO_RATIONALE = Rollout(response=[], log_probs=[], truncated=False)  # the baselines embed the prompt alone


@dataclass(frozen=True)
class ContrastiveRows:
    """This rank's rows of a contrastive step, in this order:

    infonce: G queries, G positives, then G rows per hard-negative slot (slot-major: [M, G] rows);
    simcse:  G first views, G second views (the same prompt twice).
    The first G rows are the anchors: each is one term of the loss."""

    prompts: list[Prompt]
    groups: int
    num_negatives: int

    @classmethod
    def build(cls, examples: list[GraceExample], algorithm: str) -> "ContrastiveRows":
        if algorithm == "infonce":
            prompts = ([ex.query for ex in examples] + [ex.main for ex in examples]
                       + [ex.negatives[m] for m in range(len(examples[0].negatives)) for ex in examples])
            return cls(prompts, len(examples), len(examples[0].negatives))
        if algorithm == "simcse":
            return cls([ex.main for ex in examples] * 2, len(examples), 0)
        raise ValueError(f"--algorithm {algorithm!r} is not a contrastive baseline")

    def sequence_batch(self, *, pad_token_id: int, length_multiple: int = 1) -> SequenceBatch:
        return SequenceBatch.build(self.prompts, [NO_RATIONALE] * len(self.prompts), pad_token_id=pad_token_id,
                                   length_multiple=length_multiple)

    def anchor_mask(self) -> torch.Tensor:
        """[rows] bool: True for the rows whose loss term is counted (the query / first view)."""
        return torch.arange(len(self.prompts)) < self.groups


def info_nce_loss_sum(anchors: torch.Tensor, candidates: torch.Tensor, temperature: float) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    """Σ_i −log softmax_j(cos(anchor_i, candidate_j) / τ)[i]: anchor i's positive is candidate i. Returns the sum and
    the [Q, C] similarity matrix (cosines, before the temperature)."""
    similarities = F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T
    targets = torch.arange(anchors.shape[0], device=anchors.device)
    return F.cross_entropy(similarities / temperature, targets, reduction="sum"), similarities


def loss_and_embedding_grads(embeddings: torch.Tensor, rows: ContrastiveRows, temperature: float
                             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Pass 1 of the step, on the last pipeline stage: the global loss from this rank's pooled embeddings [rows, H]
    and the gradient of its *sum* over anchors w.r.t. them ([rows, H]). Every data-parallel rank computes the same
    loss; each keeps the gradient of its own rows. The schedule later divides by Q (see :func:`surrogate_loss`).

    Metrics are global values, reported by data-parallel rank 0 only (:func:`~megatron_grace.metrics.reduce_metrics`
    sums over ranks): the mean loss, the mean cosine of an anchor to its positive and to the other candidates, and
    the top-1 accuracy of the positive among all candidates."""
    rank = parallel_state.get_data_parallel_rank()
    gathered = all_gather_data_parallel(embeddings.detach().float().unsqueeze(0))  # [DP, rows, H]
    gathered.requires_grad_(True)
    groups = rows.groups
    anchors = gathered[:, :groups].flatten(0, 1)
    if rows.num_negatives:  # infonce: positives, then every hard negative of every rank
        candidates = torch.cat([gathered[:, groups: 2 * groups].flatten(0, 1),
                                gathered[:, 2 * groups:].flatten(0, 1)])
    else:  # simcse: the second views
        candidates = gathered[:, groups:].flatten(0, 1)
    loss_sum, similarities = info_nce_loss_sum(anchors, candidates, temperature)
    loss_sum.backward()
    with torch.no_grad():
        count = anchors.shape[0]
        positive = similarities.diagonal()
        others = (similarities.sum() - positive.sum()) / max(similarities.numel() - count, 1)
        correct = (similarities.argmax(dim=1) == torch.arange(count, device=similarities.device)).float().mean()
        reported = 1.0 if rank == 0 else 0.0
        metrics = {"loss": float(loss_sum.detach()) / count, "positive_cos": float(positive.mean()),
                   "negative_cos": float(others), "top1_accuracy": float(correct)}
    return gathered.grad[rank], {key: reported * value for key, value in metrics.items()}


def surrogate_loss(micro: dict, output: StageOutput):
    """Pass 2, per micro-batch on the last stage: Σ_rows ⟨pooled, ∂L_sum/∂pooled⟩ has the parameter gradient of the
    global loss sum restricted to these rows. ``num_tokens`` is the number of anchors, so Megatron's division by the
    count summed over micro-batches and data-parallel ranks turns the sum into the mean over the Q anchors."""
    pooled = pool_hidden(output.hidden, micro["pool_mask"])
    keep = (~micro["is_filler"]).unsqueeze(1).to(pooled.dtype)
    loss = (pooled * micro["embedding_grads"].to(pooled.dtype) * keep).sum()
    anchors = (micro["is_anchor"] & ~micro["is_filler"]).sum().to(torch.int)
    return loss, anchors, {"surrogate": loss.detach()}


def contrastive_backward(model, batch: SequenceBatch, rows: ContrastiveRows, *, micro_batch_size: int,
                         temperature: float, hidden_size: int, dropout_seed: int | None = None,
                         phase=None) -> tuple[list[dict], dict[str, float]]:
    """Both passes of a contrastive step over this rank's ``batch`` (the rows of ``rows``): afterwards the model's
    gradient buffers hold ∂(mean loss)/∂θ, reduced over data-parallel ranks, ready for the optimizer step. Returns
    the surrogate's per-micro-batch outputs (last stage) and the loss metrics of :func:`loss_and_embedding_grads`
    (empty off the last stage). ``phase(name)``: a context that times the phases forward, loss and update
    (:class:`~megatron_grace.guards.StepPhases` bound to the step)."""
    phase = phase or (lambda name: contextlib.nullcontext())
    with phase("forward"):
        embeddings = one_pass_forward(model, batch, micro_batch_size, dropout_seed=dropout_seed).embeddings
    with phase("loss"):
        embedding_grads, metrics = torch.zeros(len(batch), hidden_size), {}
        if parallel_state.is_pipeline_last_stage():
            embedding_grads, metrics = loss_and_embedding_grads(embeddings, rows, temperature)
    with phase("update"):
        micro = batch.microbatches(micro_batch_size, row_vectors={"embedding_grads": embedding_grads},
                                   is_anchor=rows.anchor_mask())
        outputs = run_microbatches(model, micro, surrogate_loss, forward_only=False, dropout_seed=dropout_seed)
    return outputs, metrics


@dataclass
class ContrastiveStep:
    """One step of a contrastive baseline on this rank's examples, the shape of :class:`~megatron_grace.grpo.GrpoStep`:
    embed the rows without rationale, the in-batch loss and its embedding gradients, one optimizer step."""

    model: object
    optimizer: object  # GuardedOptimizer
    phases: object  # StepPhases
    training: TrainingConfig
    objective: ObjectiveConfig
    hidden_size: int
    pad_token_id: int
    length_multiple: int
    is_last_stage: bool

    def state_dict(self) -> dict:
        """Nothing to keep between runs (the GRPO step keeps its collapse alarm's windows)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __call__(self, examples: list, step: int, *, lr_of, **unused) -> dict:
        rows = ContrastiveRows.build(examples, self.objective.algorithm)
        batch = rows.sequence_batch(pad_token_id=self.pad_token_id, length_multiple=self.length_multiple)
        # SimCSE's two views differ by their dropout masks; the update replays the masks of the embedding pass.
        dropout_seed = (row_seed(self.training.seed, step - 1, 0, 0) if self.objective.hidden_dropout > 0
                        else None)
        timings = self.phases.begin_step()
        self.optimizer.begin_update()
        outputs, loss_metrics = contrastive_backward(
            self.model, batch, rows, micro_batch_size=self.training.micro_batch_size,
            temperature=self.objective.contrastive_temperature, hidden_size=self.hidden_size,
            dropout_seed=dropout_seed, phase=lambda name: self.phases(name, step))
        with self.phases("update", step):
            _, grad_norm = self.optimizer.finish_update(step, outputs)
        return contrastive_step_metrics(step, batch, loss_metrics, grad_norm, timings,
                                        micro_batch_size=self.training.micro_batch_size,
                                        is_last_stage=self.is_last_stage, lr=lr_of())
