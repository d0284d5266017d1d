"""Ray Train's TorchTrainer without the controller helpers a run has no use for, and without
importing torch in the driver.

Ray Train's controller starts helper actors around every fit, each a Python process of its own
that imports Ray (about 2.5 CPU-s each; bench/results/startup.md), several of them waited for
before the first worker starts:
- a DatasetManager, for the Ray Datasets passed to the trainer. rayft passes none (each worker
  reads the prepared parquet itself), yet the manager is started, and every worker is sent Ray
  Data's context, which imports Ray Data there.
- an AutoscalingCoordinator, which a fixed-size run only tells how many CPUs it wants. On the
  embedded local Ray there is no autoscaler to tell: its one node is this machine.
- a PlacementGroupCleaner, which asks Ray's State API (the dashboard) whether the controller
  still lives. The embedded local Ray of a single run has no dashboard, and its placement groups
  end with this process anyway. (A sweep starts the dashboard and keeps the cleaner: a trial
  stopped early must give its CPUs back.)
And its torch configuration is rayft.train.in_controller.TorchLater, so that the controller does
not import torch before it starts the workers. RayftTorchTrainer is TorchTrainer's data-parallel
trainer with that configuration, built on DataParallelTrainer: `ray.train.torch` imports torch
(2.3 CPU-s) in the driver, which never uses it. Everything else (the failure policy,
checkpoints, callbacks, elastic resizing) is Ray Train's own, but for one thing: an elastic
run's new size leaves out a node that has just been lost or drained
(rayft.train.in_controller.ElasticWithoutLostNodes).
"""

from __future__ import annotations

from typing import Any

from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, FixedScalingPolicy
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from rayft.env import embedded_ray
from rayft.train.in_controller import ElasticWithoutLostNodes, FixedSizeWithoutAutoscaler, TorchLater


def without_unused_helpers(
    controller_kwargs: dict[str, Any], *, has_datasets: bool, embedded: str | None
) -> dict[str, Any]:
    """The TrainController's arguments less the helpers this run has no use for (module
    docstring). `embedded`: rayft.env.embedded_ray()."""
    unused: tuple[type, ...] = () if has_datasets else (DatasetsCallback,)
    if embedded == "bare":
        unused += (PlacementGroupCleanerCallback,)
    policy = controller_kwargs["scaling_policy"]
    if embedded and type(policy) is FixedScalingPolicy:  # an elastic one asks the coordinator what it holds
        policy = FixedSizeWithoutAutoscaler(policy.scaling_config)
    elif type(policy) is ElasticScalingPolicy:
        policy = ElasticWithoutLostNodes(policy.scaling_config)
    callbacks = [c for c in controller_kwargs["callbacks"] if not isinstance(c, unused)]
    return {**controller_kwargs, "callbacks": callbacks, "scaling_policy": policy}


class RayftTorchTrainer(DataParallelTrainer):
    def __init__(
        self, train_loop_per_worker: Any, *, scaling_config: Any, unused_packages: tuple[str, ...] = (), **kwargs: Any
    ):
        backend = "nccl" if scaling_config.use_gpu else "gloo"  # as TorchTrainer picks it
        super().__init__(
            train_loop_per_worker,
            backend_config=TorchLater(backend, unused_packages=unused_packages),
            scaling_config=scaling_config,
            **kwargs,
        )

    def _initialize_and_run_controller(self, **controller_kwargs: Any) -> Any:
        kwargs = without_unused_helpers(controller_kwargs, has_datasets=bool(self.datasets), embedded=embedded_ray())
        return super()._initialize_and_run_controller(**kwargs)
