"""Which environment variables reach which Ray processes: the one table, and the one function
every launcher calls (training workers, Ray Data tasks, evaluation tasks, the W&B tracker, a
submitted job, KubeRay pods).

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

from rayft.quiet import quiet_env
from rayft.spec import JobSpec
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
            names += [name for name in os.environ if name.startswith(TEST_HOOK_PREFIX)]
    return list(dict.fromkeys(names))


def env_values(spec: JobSpec, target: Target) -> dict[str, str]:
    """What `target` gets from this process's environment (quiet settings are constants)."""
    constants = quiet_env() if "quiet" in GROUPS[target] else {}
    return {
        name: constants.get(name) or os.environ[name]
        for name in env_names(spec, target)
        if name in constants or name in os.environ
    }


def runtime_env(spec: JobSpec, target: Target) -> dict[str, dict[str, str]] | None:
    """`{"env_vars": ...}` for a Ray runtime environment, or None when there is nothing to set."""
    values = env_values(spec, target)
    return {"env_vars": values} if values else None
