"""GRPO for GRACE: one step's stages, each in its own module, and :class:`~.step.GrpoStep`, which runs them in order
(rows, rollout, one-pass forward, reward and advantages, PPO update, metrics)."""
from .step import GrpoStep

__all__ = ["GrpoStep"]
