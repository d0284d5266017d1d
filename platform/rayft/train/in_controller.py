"""What rayft hands to Ray Train's controller process, in a module that does not import torch.

The controller unpickles its arguments when it starts, before it starts any worker. With Ray's
own TorchConfig among them, that imports torch there first: about 2 s in which no worker
exists yet (bench/results/startup.md). TorchLater is the same configuration; its backend
imports Ray's torch backend only when the worker group is up, and first sets the workers
importing what the training loop needs, so that the two imports overlap. It also carries the
packages the run has no use for (rayft.train.worker.packages_unused_by), which the workers then
do not import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
        return self._torch_fields()

    def torch_config(self) -> Any:
        from ray.train.torch import TorchConfig

        return TorchConfig(**self._torch_fields())

    def _torch_fields(self) -> dict[str, Any]:
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
    """Ray's torch backend (process group set-up and shutdown), imported when first needed."""

    share_cuda_visible_devices = True  # as Ray's torch backend: a node's GPU workers see each other's (NCCL)

    def on_start(self, worker_group: Any, backend_config: Any) -> None:
        # ahead of the process group, queued first
        worker_group.execute_async(import_training_loop, backend_config.unused_packages)
        self._torch().on_start(worker_group, backend_config.torch_config())

    def on_training_start(self, worker_group: Any, backend_config: Any) -> None:
        self._torch().on_training_start(worker_group, backend_config.torch_config())

    def on_shutdown(self, worker_group: Any, backend_config: Any) -> None:
        self._torch().on_shutdown(worker_group, backend_config.torch_config())

    @staticmethod
    def _torch() -> Backend:
        from ray.train.torch.config import _TorchBackend

        return _TorchBackend()
