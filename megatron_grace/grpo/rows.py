"""The rows of one GRPO step on a data-parallel rank: which prompt each rollout row samples, with which temperature
and seed, and where each stream sits in the batch. Every part of the step that indexes rows goes through
:class:`GrpoRows` instead of repeating the layout's arithmetic.

Batch order (docs/algorithm.md, "The rows of one step"):

    [ main: G groups × n rollouts, group-major | query: one per group | negatives: one per (slot, group), slot-major ]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.dataset import GraceExample
from ..data.prompts import Prompt
from ..rollout import RolloutRequest
from ..kernels.sample_tokens import row_seed


@dataclass(frozen=True)
class GrpoRows:
    examples: list[GraceExample]
    rollout_n: int
    num_negatives: int

    @property
    def groups(self) -> int:
        return len(self.examples)

    @property
    def main(self) -> slice:
        return slice(0, self.groups * self.rollout_n)

    @property
    def query(self) -> slice:
        start = self.groups * self.rollout_n
        return slice(start, start + self.groups)

    @property
    def negatives(self) -> slice:
        start = self.groups * (self.rollout_n + 1)
        return slice(start, start + self.groups * self.num_negatives)

    @property
    def first_group(self) -> slice:
        """The first group's main rows (the sample rationales a step logs)."""
        return slice(0, self.rollout_n)

    @property
    def num_main(self) -> int:
        return self.groups * self.rollout_n

    def _rows(self) -> list[tuple[GraceExample, Prompt, bool, int]]:
        """(example, prompt, is_main, rollout index within the example) per row, in batch order. The rollout index
        (0..n-1 main, n query, n+1+m negative m) seeds the row's sampling noise."""
        n = self.rollout_n
        return ([(ex, ex.main, True, k) for ex in self.examples for k in range(n)]
                + [(ex, ex.query, False, n) for ex in self.examples]
                + [(ex, ex.negatives[m], False, n + 1 + m) for m in range(self.num_negatives) for ex in self.examples])

    def prompts(self) -> list[Prompt]:
        return [prompt for _, prompt, _, _ in self._rows()]

    def requests(self, *, seed: int, step: int, rollout_temperature: float, query_temperature: float
                 ) -> list[RolloutRequest]:
        """Main rows at ``rollout_temperature``, query and negative rows at ``query_temperature``; seeds from
        (seed, step, sample id, rollout index), so a row's tokens do not depend on the layout or the batch."""
        return [RolloutRequest(prompt.input_ids, rollout_temperature if is_main else query_temperature,
                               row_seed(seed, step, ex.sample_id, index))
                for ex, prompt, is_main, index in self._rows()]

    def temperatures(self, *, rollout_temperature: float, query_temperature: float) -> torch.Tensor:
        """[rows] sampling temperature of each row, in batch order."""
        return torch.tensor([rollout_temperature if is_main else query_temperature
                             for _, _, is_main, _ in self._rows()])

    def negatives_view(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        """[G, M, H] hard-negative embeddings from the batch's [rows, H] (None without negatives)."""
        if not self.num_negatives:
            return None
        return embeddings[self.negatives].view(self.num_negatives, self.groups, -1).transpose(0, 1)
