"""Whether the cluster can hold the job's worker group, checked before anything starts."""

from __future__ import annotations

from rayft.errors import ClusterError
from rayft.spec import JobSpec


def required_resources(spec: JobSpec) -> dict[str, float]:
    """What the worker group needs to start: an elastic run starts at scaling.min_workers."""
    scaling = spec.scaling
    workers = scaling.worker_counts.start
    needed = {"CPU": workers * scaling.cpus_per_worker}
    if scaling.use_gpu:
        needed["GPU"] = workers * scaling.gpus_per_worker
    return needed


def capacity_wait(spec: JobSpec) -> str | None:
    """None when the cluster has room for the worker group now; a note to print while waiting
    when an autoscaler can add what is missing. Raises ClusterError when it never can."""
    import ray

    needed, have = required_resources(spec), ray.cluster_resources()
    missing = {k: v - have.get(k, 0) for k, v in needed.items() if have.get(k, 0) < v}
    if not missing:
        return None
    scaling = spec.scaling
    what = ", ".join(f"{v:g} more {k}" for k, v in missing.items())
    asked = (
        (
            f"scaling.min_workers={scaling.min_workers}"
            if scaling.elastic
            else f"scaling.num_workers={scaling.num_workers}"
        )
        + " x "
        + (
            f"scaling.gpus_per_worker={scaling.gpus_per_worker:g} GPU"
            if "GPU" in missing
            else f"scaling.cpus_per_worker={scaling.cpus_per_worker:g} CPU"
        )
    )
    ceiling = _autoscaler_ceiling()
    if ceiling and all(ceiling.get(k, 0) >= v for k, v in needed.items()):
        return f"waiting for the autoscaler to add {what} ({asked})"
    have_text = ", ".join(f"{have.get(k, 0):g} {k}" for k in needed)
    raise ClusterError(
        f"the job needs {what} than the cluster has ({asked}; the cluster has {have_text}). "
        "Lower the scaling section or add nodes."
    )


def _autoscaler_ceiling() -> dict[str, float]:
    """The most the cluster's autoscaler may grow to, or {} without one. Ray has no public API
    for this (CONTRIBUTING.md lists the private ones rayft relies on)."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() or {}
    except Exception:  # no autoscaler config, or the private API moved
        return {}
