"""What each Ray Train worker runs: the SFT recipe (rayft.train.recipe) on the run plan.

Kept apart from the recipe so that the driver, which hands this function to TorchTrainer, does
not import TRL: the recipe's imports are paid on the workers only.
"""

from __future__ import annotations

from typing import Any


def train_loop_per_worker(config: dict[str, Any]) -> Any:
    """config: {"plan": RunPlan, "services": WorkerServices}. Returns rank 0's RunResult."""
    from rayft.train.recipe import SFTRecipe

    recipe = SFTRecipe(config["plan"], config["services"])
    recipe.setup()
    recipe.train()
    return recipe.finish()
