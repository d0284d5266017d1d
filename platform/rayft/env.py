"""Which environment variables reach which Ray processes: the one table, and the functions
every launcher calls (training workers, Ray Data tasks, evaluation tasks, the W&B tracker, a
submitted job, KubeRay pods).

Secret values never travel in a Ray runtime environment: Ray records runtime environments (the
runtime-env agent logs them, `ray job list` shows a job's). Settings do (`runtime_env`); secrets
reach the processes another way:
- an embedded local Ray is started by this process, so its workers inherit its environment;
- on an existing cluster (`--address`, a submitted job, a sweep's trials), this process puts them
  in a small SecretStore actor (`share_secrets`) and every rayft process takes them from there
  when it starts (`adopt_secrets`): an actor call's values go through the object store, which
  Ray neither logs nor shows;
- KubeRay pods get them from a Kubernetes Secret, by reference (rayft.launch.k8s).

Groups of variables:
- quiet: progress bars and advisories off (rayft.quiet);
- storage: object-store credentials and endpoints, by the URI schemes the spec uses;
- storage_secrets: the same, less those a Kubernetes Secret cannot carry (gs: GKE pods get
  Workload Identity from their service account, not a key file);
- forwarded: `run.forward_env` (W&B and HF tokens by default), passed by name;
- wandb: the W&B mode and server;
- test_hooks: RAYFT_* variables the test suite sets (CONTRIBUTING.md lists them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from enum import Enum
from typing import Any

from rayft.nodes import on_this_node
from rayft.quiet import quiet_env
from rayft.spec import JobSpec
from rayft.spec.secrets import is_secret_name
from rayft.storage import scheme

# What processes that read or write object storage need, by URI scheme.
STORAGE_ENV: dict[str, tuple[str, ...]] = {
    "s3": (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_PROFILE",
    ),
    "gs": ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"),
}
SECRET_STORAGE_SCHEMES = ("s3",)  # those whose credentials KubeRay pods read from the Secret
WANDB_ENV = ("WANDB_MODE", "WANDB_BASE_URL")
TEST_HOOK_PREFIX = "RAYFT_"
# Set by rayft.launch.cluster in a process that starts the embedded local Ray, and so in every Ray
# process of that instance: "bare" (a single run's, no dashboard) or "dashboard" (a sweep's).
EMBEDDED_RAY_ENV = "RAYFT_EMBEDDED_RAY"


class Target(Enum):
    WORKERS = "training workers"
    DATA_TASKS = "Ray Data tasks"
    EVAL_TASKS = "evaluation tasks"
    TRACKER = "the W&B tracker"
    JOB = "a submitted job"
    KUBERAY = "KubeRay pods"


GROUPS: dict[Target, tuple[str, ...]] = {
    Target.WORKERS: ("quiet", "storage", "forwarded", "test_hooks"),
    Target.DATA_TASKS: ("storage",),
    Target.EVAL_TASKS: ("storage",),
    Target.TRACKER: ("forwarded", "wandb"),
    Target.JOB: ("storage", "forwarded", "test_hooks"),
    Target.KUBERAY: ("forwarded", "storage_secrets"),
}


def storage_paths(spec: JobSpec) -> list[str]:
    """Every path of the spec that a process may read or write through an object store."""
    sources = spec.data.train + (spec.data.eval or [])
    return [spec.run.storage_path, spec.data.cache_dir or "", *(source.path for source in sources)]


def storage_env_names(paths: Iterable[str], schemes: Iterable[str] = tuple(STORAGE_ENV)) -> list[str]:
    used = [s for s in dict.fromkeys(scheme(path) for path in paths) if s in schemes]
    return [name for s in used for name in STORAGE_ENV[s]]


def env_names(spec: JobSpec, target: Target) -> list[str]:
    """The variables `target` gets, by name, in order, once each."""
    names: list[str] = []
    for group in GROUPS[target]:
        if group == "quiet":
            names += list(quiet_env())
        elif group == "storage":
            names += storage_env_names(storage_paths(spec))
        elif group == "storage_secrets":
            names += storage_env_names(storage_paths(spec), SECRET_STORAGE_SCHEMES)
        elif group == "forwarded":
            names += spec.run.forward_env
        elif group == "wandb":
            names += WANDB_ENV
        elif group == "test_hooks":
            names += [name for name in os.environ if name.startswith(TEST_HOOK_PREFIX) and name != EMBEDDED_RAY_ENV]
    return list(dict.fromkeys(names))


def env_values(spec: JobSpec, target: Target) -> dict[str, str]:
    """What `target` gets from this process's environment (quiet settings are constants)."""
    constants = quiet_env() if "quiet" in GROUPS[target] else {}
    return {
        name: constants.get(name) or os.environ[name]
        for name in env_names(spec, target)
        if name in constants or name in os.environ
    }


def is_secret(spec: JobSpec, name: str) -> bool:
    """A secret by its name, or because the spec forwards it: run.forward_env holds tokens, and
    a setting among them (WANDB_MODE) loses nothing by travelling the way secrets do."""
    return is_secret_name(name) or name in spec.run.forward_env


def settings(spec: JobSpec, target: Target) -> dict[str, str]:
    """What `target` gets that is no secret: what may go in a runtime environment."""
    return {k: v for k, v in env_values(spec, target).items() if not is_secret(spec, k)}


def secrets(spec: JobSpec, target: Target) -> dict[str, str]:
    """What `target` gets that is secret: delivered by `share_secrets`, never recorded."""
    return {k: v for k, v in env_values(spec, target).items() if is_secret(spec, k)}


def runtime_env(spec: JobSpec, target: Target) -> dict[str, dict[str, str]] | None:
    """`{"env_vars": settings}` for a Ray runtime environment, or None when there is nothing."""
    values = settings(spec, target)
    return {"env_vars": values} if values else None


# --------------------------------------------------------------------------------- secrets
class SecretStore:
    """Holds a driver's secret environment variables for the Ray processes of its jobs."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def put(self, values: dict[str, str]) -> None:
        self.values.update(values)

    def get(self) -> dict[str, str]:
        return dict(self.values)


_inherited = False  # set by rayft.launch.cluster when it starts an embedded local Ray
_store: Any = None


def processes_inherit_environment(inherit: bool = True) -> None:
    """Declare that this process started the Ray instance, so every Ray process it runs
    inherits its environment (and nothing needs sharing)."""
    global _inherited
    _inherited = inherit


def embedded_ray() -> str | None:
    """ "bare" or "dashboard" when this job runs on the embedded local Ray its driver started
    (one node, this machine, no autoscaler), None on a cluster."""
    return os.environ.get(EMBEDDED_RAY_ENV) or None


def share_secrets(spec: JobSpec) -> Any | None:
    """A SecretStore actor holding the secrets every target of `spec` needs, or None when the
    Ray processes inherit this environment, or there are none."""
    global _store
    values = {k: v for target in Target if target is not Target.KUBERAY for k, v in secrets(spec, target).items()}
    if _inherited or not values:
        return _store  # a store another part of this process shared stays usable
    import ray

    if _store is None:
        _store = ray.remote(num_cpus=0)(SecretStore).options(**on_this_node()).remote()
    ray.get(_store.put.remote(values))
    return _store


def adopt_secrets(store: Any | None) -> None:
    """In a Ray process: take the driver's secrets into this process's environment (values
    already set here, by the cluster's own environment, win)."""
    if store is None:
        return
    import ray

    for name, value in ray.get(store.get.remote()).items():
        os.environ.setdefault(name, value)
