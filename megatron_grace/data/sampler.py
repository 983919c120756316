"""Seeded, resumable, epoch-aware sampling of GRPO prompt batches.

The sample stream is the concatenation of one permutation of the dataset per epoch, epoch ``e`` shuffled with
``seed + e``. A global batch is the next ``global_batch_size`` indices of that stream, so every example is drawn exactly
once per epoch: nothing is skipped or repeated at an epoch boundary. A batch that straddles the boundary takes the end
of one epoch and the start of the next (when the dataset size is not a multiple of the batch size, such a batch can
hold the same example twice, once for each epoch).

Every data-parallel rank runs its own sampler with the same seed, so all draw the same global batch; each then keeps
its contiguous slice (:meth:`GroupSampler.shard`). A prompt's whole rollout group therefore lives on one rank.

The data position (epoch, position within the epoch, seed) is the sampler's ``state_dict()``; saving it with every
checkpoint and restoring it with ``load_state_dict()`` resumes at exactly the next batch.
"""
from __future__ import annotations

import numpy as np


class GroupSampler:
    """Draws global batches of dataset indices (positions in a ``GraceDataset``, not sample ids)."""

    def __init__(self, num_examples: int, global_batch_size: int, seed: int):
        if num_examples < 1:
            raise ValueError(f"cannot sample from {num_examples} examples")
        if global_batch_size < 1:
            raise ValueError(f"global batch size must be positive, got {global_batch_size}")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # index into the current epoch's permutation; always < num_examples
        self._cached_order: tuple[int, np.ndarray] | None = None

    @property
    def consumed_samples(self) -> int:
        return self.epoch * self.num_examples + self.position

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of dataset indices that epoch ``epoch`` visits."""
        if self._cached_order is None or self._cached_order[0] != epoch:
            order = np.random.default_rng(self.seed + epoch).permutation(self.num_examples)
            self._cached_order = (epoch, order)
        return self._cached_order[1]

    def next_batch(self) -> list[int]:
        """The next global batch (identical on every rank), advancing the data position."""
        batch: list[int] = []
        while len(batch) < self.global_batch_size:
            take = min(self.global_batch_size - len(batch), self.num_examples - self.position)
            batch.extend(self.epoch_order(self.epoch)[self.position:self.position + take].tolist())
            self.position += take
            if self.position == self.num_examples:
                self.epoch += 1
                self.position = 0
        return batch

    @staticmethod
    def shard(batch: list[int], dp_rank: int, dp_size: int) -> list[int]:
        """The contiguous slice of a global batch that data-parallel rank ``dp_rank`` of ``dp_size`` processes."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
        if len(batch) % dp_size:
            raise ValueError(f"global batch of {len(batch)} prompts does not divide over {dp_size} data-parallel ranks")
        per_rank = len(batch) // dp_size
        return batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "num_examples": self.num_examples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a data position. The checkpoint's seed wins; a different dataset size is an error."""
        if state["num_examples"] != self.num_examples:
            raise ValueError(
                f"the checkpoint's data position is for {state['num_examples']} examples but this dataset has "
                f"{self.num_examples}: the training data (or its length filter) changed since the checkpoint"
            )
        if not 0 <= state["position"] < self.num_examples or state["epoch"] < 0:
            raise ValueError(f"invalid data position in checkpoint: {state}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._cached_order = None
