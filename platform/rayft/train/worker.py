"""What each Ray Train worker runs: the SFT recipe (rayft.train.recipe) on the run plan.

Kept apart from the recipe so that the driver, which hands this function to TorchTrainer, does
not import TRL: the recipe's imports are paid on the workers only.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayft.spec import JobSpec

TRAINING_LOOP = "rayft.train.recipe"  # torch, transformers, TRL, PEFT: seconds of imports

# Optimizers that transformers builds from torch (or itself) alone; any other may be bitsandbytes'.
TORCH_OPTIMIZERS = frozenset({"adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"})


def packages_unused_by(spec: JobSpec) -> tuple[str, ...]:
    """Packages the training loop's libraries import only because they are installed, which
    this run never calls (about 2.8 CPU-s per worker on a 2-core VM, bench/results/startup.md):
    - bitsandbytes, which PEFT imports whenever it can and whose kernels, decorated with
      torch.compile, import torch's inductor; QLoRA and bitsandbytes' optimizers need it.
    - wandb, which TRL imports whenever it can: the workers report to rayft's tracker, never
      to W&B (report_to="none").
    - scipy, which transformers.trainer imports, through its object-detection losses
      (scipy.optimize for their matching), whenever it can: about 1 CPU-s per worker; nothing
      an SFT run calls uses it (rayft's packing solver runs in `rayft prepare`'s tasks).
    - deepspeed, unless the run uses it: accelerate imports all of it (about 0.5 CPU-s) as the
      trainer starts, only to ask whether the model is wrapped in a DeepSpeedEngine."""
    unused = ["wandb", "scipy"]
    if spec.method.kind != "qlora" and spec.train.optimizer in TORCH_OPTIMIZERS:
        unused.append("bitsandbytes")
    if spec.method.deepspeed is None:
        unused.append("deepspeed")
    return tuple(unused)


def import_training_loop(unused_packages: tuple[str, ...] = ()) -> None:
    """Run on each worker as soon as the group is up (rayft.train.in_controller), while the
    controller sets up the process group; an import that fails fails again, and says why, in
    train_loop_per_worker.

    `unused_packages` (packages_unused_by) are made unimportable in this process first: a None
    in sys.modules is Python's own "not installed", so libraries that import them "if
    available" go without.

    The collector is off while they import: they make about 600,000 objects that live as long
    as the process, and the ~1,300 collections their allocations set off found almost no garbage
    (the import took 0.5-0.9 CPU-s less of its 7.7-8.5 in quickstart workers, the one collection
    below included). That collection frees what garbage there is (about 11,000 objects); then
    all of it leaves the collector's reach: every full collection walked it again, and
    accelerate runs one as training begins (0.3 s on 2 cores)."""
    for name in unused_packages:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # an import already made stays
    collecting = gc.isenabled()
    gc.disable()
    try:
        with contextlib.suppress(Exception):
            importlib.import_module(TRAINING_LOOP)
    finally:
        if collecting:
            gc.enable()
    gc.collect()
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
