"""The node of an embedded local Ray for a single run, without the head processes it never uses.

ray.init(address="local") starts, besides the GCS and the raylet:
- an API server (dashboard.py). With include_dashboard=False it loads only Ray's usage-stats
  module, yet ray.init waits for it to come up before it returns: 2.4 s, and 1.5-1.9 CPU-s;
- an autoscaler monitor, for an autoscaler this instance does not have (its one node is this
  machine): 0.8-1.1 CPU-s;
- a log monitor, which forwards worker output to the driver: nothing to forward when the driver
  does not print it (log_to_driver=False, rayft's default): 0.8-1.0 CPU-s.
All of this on the two cores the training workers are about to import torch on. Without them,
ray.init took 3.6-4.9 s instead of 6.7-7.1 s, and its processes 5.0-6.0 CPU-s instead of 9.3-9.8
(4 interleaved pairs; bench/results/startup.md).

ray.init has no option for these (Ray's RayParams has, but ray.init does not pass them on), so
for the duration of the call its Node class is this subclass that skips them. A sweep keeps the
full node: its placement-group cleaner needs the State API that the dashboard serves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def without_unused_processes(*, forwards_logs: bool) -> Iterator[None]:
    """Within: a ray.init that starts a local instance starts it without the API server and the
    autoscaler monitor, and without the log monitor unless `forwards_logs`."""
    import ray._private.node as ray_node

    full = ray_node.Node

    class SingleRunNode(full):  # type: ignore[misc, valid-type]
        def start_api_server(self, **_: object) -> None:
            pass

        def start_monitor(self) -> None:
            pass

        def start_log_monitor(self) -> None:
            if forwards_logs:
                super().start_log_monitor()

    ray_node.Node = SingleRunNode
    try:
        yield
    finally:
        ray_node.Node = full
