"""What rayft hands to Ray Train's controller process, in a module that does not import torch.

The controller unpickles its arguments when it starts, before it starts any worker. With Ray's
own TorchConfig among them, that imports torch there first: about 2 s in which no worker
exists yet (bench/results/startup.md). TorchLater is the same configuration; its backend sets
the workers importing what the training loop needs as soon as they are up, and sets up their
process group without importing torch in the controller at all. It also carries the
packages the run has no use for (rayft.train.worker.packages_unused_by), which the workers then
do not import.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from ray._common.network_utils import build_address
from ray._private.ray_constants import env_integer
from ray.exceptions import ActorUnavailableError, GetTimeoutError
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, FixedScalingPolicy
from ray.train.v2._internal.util import time_monotonic
from ray.train.v2.api.exceptions import PreemptionError

from rayft.train.worker import import_training_loop

logger = logging.getLogger(__name__)


class FixedSizeWithoutAutoscaler(FixedScalingPolicy):
    """A fixed-size worker group on a cluster that no autoscaler grows: nothing to request."""

    def _send_resource_request(self) -> None:
        pass

    def _maybe_send_resource_request(self) -> None:
        pass

    def _cancel_resource_request(self) -> None:
        pass


class ElasticWithoutLostNodes(ElasticScalingPolicy):
    """Ray's elastic policy, less the nodes that a failed attempt showed to be lost or leaving.

    When a node is lost, the health checks of its workers fail at once (the actor is
    unavailable), but Ray marks the node dead only when its heartbeats have been missing for a
    while (12 s here; more on a busy cluster). A drained node stays alive until its deadline.
    Ray's policy decides the new size at once, counts such a node's CPUs, and the worker group
    then waits 60 s for a placement group that cannot be placed
    (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) before it tries again with what is left: 80 s from
    a lost node to the next step (bench/results/recovery.md). This policy leaves such a node
    out for LOST_FOR_S. By then Ray has marked a lost node dead; a node that was unreachable
    for a moment counts again, and the periodic resize check grows the group back onto it.
    """

    LOST_FOR_S = 120.0

    def __init__(self, scaling_config: Any):
        super().__init__(scaling_config)
        self._lost_since: dict[str, float] = {}  # node id -> when an attempt failed because of it

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        super().after_controller_state_update(previous_state, current_state)
        # restarting, rescheduling and errored states carry the error
        for node in nodes_lost_in(getattr(current_state, "training_failed_error", None)):
            self._lost_since[node] = time_monotonic()  # a later failure there starts the window again

    def _count_possible_workers(self, reserved_resources: Any) -> int:
        now = time_monotonic()
        staying = {
            node: free
            for node, free in reserved_resources.items()
            if now - self._lost_since.get(node, float("-inf")) >= self.LOST_FOR_S
        }
        return super()._count_possible_workers(staying)


def nodes_lost_in(error: Exception | None) -> list[str]:
    """The nodes a failed attempt showed to be lost (a worker there unreachable) or leaving (a
    drain notice). A worker that died (killed, out of memory) leaves its node usable."""
    if isinstance(error, PreemptionError):
        return list(error.preemption_info.preempted_node_to_ranks)
    nodes: list[str] = []
    for failure in getattr(error, "worker_failures", {}).values():
        unreachable = getattr(failure, "health_check_failure", None)
        node = _node_of_actor(unreachable.actor_id) if isinstance(unreachable, ActorUnavailableError) else None
        if node:
            nodes.append(node)
    return nodes


def _node_of_actor(actor_id: str | None) -> str | None:
    """The node an actor was placed on, from the GCS (it keeps dead actors' records)."""
    from ray._private.state import actors

    if not actor_id:
        return None
    try:
        return actors(actor_id)["Address"]["NodeID"] or None
    except Exception:  # noqa: BLE001 - no record: the node then simply counts as Ray says
        return None


@dataclass
class TorchLater(BackendConfig):
    """ray.train.torch.TorchConfig, field for field, and `unused_packages`."""

    backend: str | None = None
    init_method: str = "env"
    timeout_s: int = 1800
    unused_packages: tuple[str, ...] = field(default=(), kw_only=True)

    @property
    def backend_cls(self) -> type[Backend]:
        return _TorchLaterBackend

    @property
    def train_func_context(self) -> Any:
        return _TorchWorkerContext

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        """TorchConfig's fields (what Ray records of a run's backend)."""
        fields = asdict(self)
        del fields["unused_packages"]
        return fields


class _TorchWorkerContext:
    """Ray's TorchConfigContextManager (it sets a GPU worker's CUDA device), imported when a
    worker enters it: the driver builds the train function with this context and has no use
    for torch itself."""

    def __enter__(self) -> Any:
        from ray.train.torch.config import TorchConfigContextManager

        self._torch = TorchConfigContextManager()
        return self._torch.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._torch.__exit__(*exc)


class _TorchLaterBackend(Backend):
    """Ray's torch backend (ray.train.torch.config._TorchBackend) for Ray Train's worker groups,
    driven from a controller that never imports torch: each call that needs torch runs on the
    workers, which import it anyway. Importing it in the controller cost about 3 CPU-s while the
    workers imported theirs, on the same cores. Left out of Ray's: TPU and HCCL set-up (rayft
    trains on CPUs and CUDA GPUs), and the v1 worker groups' hook (Ray Train v2 only)."""

    share_cuda_visible_devices = True  # as Ray's torch backend: a node's GPU workers see each other's (NCCL)

    def on_start(self, worker_group: Any, backend_config: Any) -> None:
        # ahead of the process group, queued first
        worker_group.execute_async(import_training_loop, backend_config.unused_packages)
        backend = backend_config.backend or (
            "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) else "gloo"
        )
        address, port = worker_group.execute_single(0, get_address_and_port)
        if backend_config.init_method == "env":
            worker_group.execute(_set_master, address, port)
            url = "env://"
        elif backend_config.init_method == "tcp":
            url = f"tcp://{build_address(address, port)}"
        else:
            raise ValueError(f"init_method {backend_config.init_method!r}: 'env' or 'tcp'")
        worker_group.execute(_in_ray_torch_config, "_set_torch_distributed_env_vars")  # LOCAL_RANK and the rest
        size = len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _in_ray_torch_config,
                    "_setup_torch_process_group",
                    backend=backend,
                    world_rank=rank,
                    world_size=size,
                    init_method=url,
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(size)
            ]
        )

    def on_shutdown(self, worker_group: Any, backend_config: Any) -> None:
        done = worker_group.execute_async(
            _in_ray_torch_config, "_shutdown_torch", destroy_process_group=len(worker_group) > 1
        )
        timeout = env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        try:
            ray.get(done, timeout=timeout)
        except GetTimeoutError:
            logger.warning(f"torch process group shutdown timed out after {timeout} seconds")


def _set_master(address: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)


def _in_ray_torch_config(name: str, *args: Any, **kwargs: Any) -> Any:
    """On a worker: a function of Ray's torch backend module (which imports torch)."""
    from ray.train.torch import config

    return getattr(config, name)(*args, **kwargs)
