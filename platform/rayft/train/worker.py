"""What each Ray Train worker runs: the SFT recipe (rayft.train.recipe) on the run plan.

Kept apart from the recipe so that the driver, which hands this function to TorchTrainer, does
not import TRL: the recipe's imports are paid on the workers only.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
from typing import Any

TRAINING_LOOP = "rayft.train.recipe"  # torch, transformers, TRL, PEFT: seconds of imports


def import_training_loop() -> None:
    """Run on each worker as soon as the group is up (rayft.train.in_controller), while the
    controller sets up the process group; an import that fails fails again, and says why, in
    train_loop_per_worker.

    Then what the imports made (about 600,000 objects, there for the life of the process) is
    moved out of the garbage collector's reach: every full collection walked them all, and
    accelerate runs one as training begins (0.3 s on a 2-core CPU)."""
    with contextlib.suppress(Exception):
        importlib.import_module(TRAINING_LOOP)
    gc.freeze()


def train_loop_per_worker(config: dict[str, Any]) -> Any:
    """config: {"plan": RunPlan, "services": WorkerServices}. Returns rank 0's RunResult, or
    the RayftError that refused the run in setup.

    A refusal in setup (a template, an attention kernel or a package the spec cannot use) would
    refuse again on every restart, so it is returned, not raised: Ray's failure budget is for
    crashes, hangs and lost nodes. Every rank refuses alike, since each decides from the same
    spec on the same kind of node."""
    from rayft.errors import RayftError
    from rayft.train.recipe import SFTRecipe

    recipe = SFTRecipe(config["plan"], config["services"])
    try:
        recipe.setup()
    except RayftError as refusal:
        return refusal
    recipe.train()
    return recipe.finish()
