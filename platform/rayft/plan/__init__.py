"""`rayft plan`: per-worker memory and time of a job from the model's config alone.

estimate (the plan and its throughput) <- memory (bytes by item) and suggest (what would fit);
shapes (model shapes and accelerators)."""

from rayft.plan.estimate import Plan, estimate
from rayft.plan.memory import GiB
from rayft.plan.suggest import Suggestion

__all__ = ["GiB", "Plan", "Suggestion", "estimate"]
