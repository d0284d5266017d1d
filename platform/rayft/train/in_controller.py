"""What rayft hands to Ray Train's controller process, in a module that does not import torch.

The controller unpickles its arguments when it starts, before it starts any worker. With Ray's
own TorchConfig among them, that imports torch there first: about 2 s in which no worker
exists yet (bench/results/startup.md). TorchLater is the same configuration; its backend
imports Ray's torch backend only when the worker group is up, and first sets the workers
importing what the training loop needs, so that the two imports overlap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

from rayft.train.worker import import_training_loop


class FixedSizeWithoutAutoscaler(FixedScalingPolicy):
    """A fixed-size worker group on a cluster that no autoscaler grows: nothing to request."""

    def _send_resource_request(self) -> None:
        pass

    def _maybe_send_resource_request(self) -> None:
        pass

    def _cancel_resource_request(self) -> None:
        pass


@dataclass
class TorchLater(BackendConfig):
    """ray.train.torch.TorchConfig, field for field (TorchTrainer fills in `backend`)."""

    backend: str | None = None
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type[Backend]:
        return _TorchLaterBackend

    @property
    def train_func_context(self) -> Any:  # used on the workers, which import torch anyway
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def torch_config(self) -> Any:
        from ray.train.torch import TorchConfig

        return TorchConfig(**asdict(self))


class _TorchLaterBackend(Backend):
    """Ray's torch backend (process group set-up and shutdown), imported when first needed."""

    share_cuda_visible_devices = True  # as Ray's torch backend: a node's GPU workers see each other's (NCCL)

    def on_start(self, worker_group: Any, backend_config: Any) -> None:
        worker_group.execute_async(import_training_loop)  # ahead of the process group, queued first
        self._torch().on_start(worker_group, backend_config.torch_config())

    def on_training_start(self, worker_group: Any, backend_config: Any) -> None:
        self._torch().on_training_start(worker_group, backend_config.torch_config())

    def on_shutdown(self, worker_group: Any, backend_config: Any) -> None:
        self._torch().on_shutdown(worker_group, backend_config.torch_config())

    @staticmethod
    def _torch() -> Backend:
        from ray.train.torch.config import _TorchBackend

        return _TorchBackend()
