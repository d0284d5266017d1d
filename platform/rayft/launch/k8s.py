"""KubeRay manifests from a job spec: `rayft k8s render SPEC` -> a ConfigMap with the resolved
spec and a RayJob whose cluster is sized by the spec's `scaling` section.

The RayJob runs the same command as `ray job submit` does locally (`entrypoint_for`), against
the spec mounted from the ConfigMap, in an image built from k8s/Dockerfile (the repository at
IMAGE_WORKDIR). One Ray Train worker per worker pod: replicas = scaling.num_workers, and each
pod advertises exactly the CPUs/GPUs one worker asks for, so the placement group lands one
worker per pod. The head advertises no CPUs: it runs the driver, never a training worker.

Like spec.py this imports nothing heavy (no Ray, no torch): rendering is pure data.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from rayft import __version__
from rayft.env import STORAGE_ENV, Target, env_names
from rayft.errors import SpecError
from rayft.spec import JobSpec, ScalingSpec
from rayft.spec.secrets import contains_secret, redact_text
from rayft.storage import is_remote, scheme

RAY_VERSION = "2.60.0"  # the rayproject/ray tag k8s/Dockerfile builds FROM; KubeRay needs it for authOptions
IMAGE_WORKDIR = "/app"  # WORKDIR of k8s/Dockerfile: the repository, so `jobs/train.py` resolves
SPEC_DIR = "/etc/rayft"
SPEC_KEY = "spec.yaml"
SPEC_PATH = f"{SPEC_DIR}/{SPEC_KEY}"
RUNS_MOUNT = "/mnt/rayft-runs"  # where the run PVC is mounted on every Ray pod
DEFAULT_PVC = "rayft-runs"  # k8s/storage-pvc.yaml
SECRET_NAME = "rayft-secrets"  # k8s/secrets.example.yaml
# rayproject/ray images run as uid 1000, gid 100 (users); fsGroup makes the run volume
# writable by that group on volume types that support ownership changes.
RAY_GID = 100
# How long the finished cluster stays up for `kubectl logs` and the dashboard before cleanup.
TTL_SECONDS_AFTER_FINISHED = 600
# run.max_failures=-1 means "retry forever", which a RayJob cannot express.
MAX_JOB_RETRIES = 10

HEAD_RESOURCES = {"cpu": "2", "memory": "8Gi"}  # the driver: data planning, GGUF conversion, no training
MEMORY_GIB_PER_CPU = 4  # torch + a tokenizer + Ray's worker processes per core
MEMORY_GIB_PER_GPU = 32  # host RAM to load a checkpoint shard and feed the GPU

GPU_RESOURCE = "nvidia.com/gpu"
# Node label set by NVIDIA GPU Feature Discovery (part of the GPU operator), keyed by Ray's
# accelerator names (ray.util.accelerators), which is what scaling.accelerator_type holds.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_PRODUCTS = {
    "H200": "NVIDIA-H200",
    "H100": "NVIDIA-H100-80GB-HBM3",
    "A100-80G": "NVIDIA-A100-SXM4-80GB",
    "A100-40G": "NVIDIA-A100-SXM4-40GB",
    "L40S": "NVIDIA-L40S",
    "L4": "NVIDIA-L4",
    "A10G": "NVIDIA-A10G",
    "T4": "Tesla-T4",
    "V100": "Tesla-V100-SXM2-16GB",
}

MAX_NAME_LENGTH = 47  # KubeRay appends "-xxxxx" for the RayCluster, which must fit in 53
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ------------------------------------------------------------------------------- public
def entrypoint_for(spec_file: str) -> str:
    """The command that trains on `spec_file`, here and with `ray job submit`. No end-of-run
    comparison: it generates on the head, which is sized for the driver, not for inference."""
    return f"python jobs/train.py {shlex.quote(spec_file)} --no-compare"


def default_image(spec: JobSpec) -> str:
    """What k8s/README.md builds: rayft:VERSION, or rayft:VERSION-gpu on the CUDA base image."""
    return f"rayft:{__version__}{'-gpu' if spec.scaling.use_gpu else ''}"


def render(
    spec: JobSpec,
    *,
    spec_path: str,
    image: str | None = None,
    namespace: str | None = None,
    profiles: Sequence[str] = (),
    overrides: Sequence[str] = (),
    storage: str | None = None,
) -> list[dict[str, Any]]:
    """[ConfigMap, RayJob] that train `spec` on a KubeRay cluster sized by its scaling section.

    `spec_path`, `profiles` and `overrides` are what the spec was loaded from (recorded so the
    manifests say how to regenerate them); `storage` names the PVC for a local storage_path
    (default DEFAULT_PVC); an s3:// or gs:// storage_path is used as is.
    """
    if contains_secret(spec.run_name, spec.run.forward_env):
        # names are lowercased and re-spelt for Kubernetes, past the reach of redaction
        raise SpecError("holds the value of a secret environment variable; choose another run name", field="run.name")
    name = k8s_name(spec.run_name)
    labels = {
        "app.kubernetes.io/name": "rayft",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "rayft",
    }
    options = {"--image": image, "--namespace": namespace, "--storage": storage}
    source = "rayft k8s render " + shlex.join(
        [
            spec_path,
            *[a for p in profiles for a in ("-p", str(p))],
            *overrides,
            *[a for o, v in options.items() if v for a in (o, v)],
        ]
    )

    def metadata(object_name: str) -> dict[str, Any]:
        return {
            "name": object_name,
            **({"namespace": namespace} if namespace else {}),
            "labels": dict(labels),
            "annotations": {"rayft/rendered-from": redact_text(source)},
        }

    run_storage = RunStorage.for_spec(spec, storage)
    pods = PodParts(
        image=image or default_image(spec),
        labels=labels,
        storage=run_storage,
        env=_secret_env(env_names(spec, Target.KUBERAY)),
    )

    resolved = _resolved_spec(spec)
    resolved["run"]["storage_path"] = run_storage.path
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(f"{name}-spec"),
        "data": {SPEC_KEY: yaml.safe_dump(resolved, sort_keys=False)},
    }
    ray_job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": metadata(name),
        "spec": {
            "entrypoint": entrypoint_for(SPEC_PATH),
            # KubeRay starts a submitter Job that runs `ray job submit` against the new cluster.
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_SECONDS_AFTER_FINISHED,
            # Each retry is a fresh cluster; `rayft train` resumes from the run's checkpoints.
            "backoffLimit": MAX_JOB_RETRIES if spec.run.max_failures < 0 else spec.run.max_failures,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                # Ray >= 2.52 token auth: KubeRay generates the token and gives it to every
                # Ray container and the submitter.
                "authOptions": {"mode": "token"},
                "headGroupSpec": _head_group(pods, spec_config_map=f"{name}-spec"),
                "workerGroupSpecs": [_worker_group(spec.scaling, pods)],
            },
        },
    }
    return [config_map, ray_job]


def to_yaml(manifests: Sequence[dict[str, Any]]) -> str:
    """Multi-document YAML for `kubectl apply -f`, multi-line strings as literal blocks."""
    sources = {m.get("metadata", {}).get("annotations", {}).get("rayft/rendered-from") for m in manifests} - {None}
    header = "".join(
        f"# Generated by `{s}`: edit the spec and render again rather than this file.\n" for s in sorted(sources)
    )
    body = yaml.dump_all(
        manifests, Dumper=_ManifestDumper, sort_keys=False, default_flow_style=False, explicit_start=True, width=1000
    )
    return header + body


def k8s_name(run_name: str) -> str:
    """run.name as a Kubernetes name KubeRay accepts: a DNS-1035 label of at most 47 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if name and not name[0].isalpha():
        name = f"run-{name}"
    if not name:
        raise SpecError(f"{run_name!r} has no letters or digits to name Kubernetes objects with", field="run.name")
    if len(name) > MAX_NAME_LENGTH:
        raise SpecError(
            f"{run_name!r} makes the Kubernetes name {name!r} ({len(name)} characters); KubeRay "
            f"allows {MAX_NAME_LENGTH}: set a shorter run.name",
            field="run.name",
        )
    return name


def _resolved_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec as the job will load it, with secret values hidden.

    Not `spec.to_dict()`: its redaction by key name also hides fields that only look like
    secrets (`eval.max_new_tokens`, `data.filters.max_tokens`), and the job must read them
    back. A JobSpec has no secret fields (unknown keys are errors), so what needs hiding is a
    secret env var's value pasted into a string.
    """

    def hide(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: hide(item) for key, item in value.items()}
        if isinstance(value, list):
            return [hide(item) for item in value]
        return redact_text(value) if isinstance(value, str) else value

    return hide(spec.to_dict(redacted=False))


# ------------------------------------------------------------------------------ storage
@dataclass
class RunStorage:
    """Where runs go inside the pods: the object store URI as is, or a PVC at RUNS_MOUNT."""

    path: str
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    fs_group: int | None = None

    @classmethod
    def for_spec(cls, spec: JobSpec, pvc: str | None) -> RunStorage:
        storage_path = spec.run.storage_path
        if not is_remote(storage_path):
            volume = {"name": "runs", "persistentVolumeClaim": {"claimName": pvc or DEFAULT_PVC}}
            return cls(RUNS_MOUNT, [volume], [{"name": "runs", "mountPath": RUNS_MOUNT}], fs_group=RAY_GID)
        if pvc:
            raise SpecError(
                f"{storage_path!r} is an object store, so there is no PVC ({pvc!r}) to mount: drop the "
                "PVC option or set a local run.storage_path",
                field="run.storage_path",
            )
        if scheme(storage_path) not in STORAGE_ENV:
            raise SpecError(
                f"{scheme(storage_path)}:// cannot be used from Kubernetes pods; use s3://, gs:// or a "
                "local path (mounted from a PVC)",
                field="run.storage_path",
            )
        return cls(storage_path)


def _secret_env(names: Sequence[str]) -> list[dict[str, Any]]:
    """Env vars by reference to the Secret, never by value; optional, so that a Secret without
    WANDB_API_KEY just means offline W&B. Every Ray pod gets them: the driver forwards them to
    training workers, but Ray Data tasks (reading the hub) and checkpoint uploads run on the
    workers with the pod's own environment."""
    env = []
    for name in dict.fromkeys(names):  # in order, once each
        if not ENV_NAME.match(name):
            raise SpecError(f"{name!r} is not an environment variable name", field="run.forward_env")
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": name, "optional": True}}})
    return env


# --------------------------------------------------------------------------------- pods
@dataclass
class PodParts:
    """What every Ray pod of the job shares: image, labels, secret env, the run volume."""

    image: str
    labels: dict[str, str]
    env: list[dict[str, Any]]
    storage: RunStorage

    def template(
        self,
        container_name: str,
        resources: dict[str, dict[str, str]],
        *,
        mounts: Sequence[dict] = (),
        volumes: Sequence[dict] = (),
        **pod_spec: Any,
    ) -> dict[str, Any]:
        container: dict[str, Any] = {
            "name": container_name,
            "image": self.image,
            # Ray runs a job's entrypoint in the directory `ray start` ran in: the repository.
            "workingDir": IMAGE_WORKDIR,
            "resources": copy.deepcopy(resources),
        }
        if self.env:
            container["env"] = copy.deepcopy(self.env)
        if self.storage.mounts or mounts:
            container["volumeMounts"] = copy.deepcopy([*self.storage.mounts, *mounts])
        spec: dict[str, Any] = {}
        if self.storage.fs_group is not None:
            spec["securityContext"] = {"fsGroup": self.storage.fs_group}
        spec.update(pod_spec)
        spec["containers"] = [container]
        if self.storage.volumes or volumes:
            spec["volumes"] = copy.deepcopy([*self.storage.volumes, *volumes])
        return {"metadata": {"labels": dict(self.labels)}, "spec": spec}


def _head_group(pods: PodParts, spec_config_map: str) -> dict[str, Any]:
    return {
        # No CPUs for Ray to schedule here: training workers and data tasks go to the workers.
        "rayStartParams": {"num-cpus": "0"},
        "template": pods.template(
            "ray-head",
            _guaranteed(HEAD_RESOURCES),
            mounts=[{"name": "spec", "mountPath": SPEC_DIR, "readOnly": True}],
            volumes=[{"name": "spec", "configMap": {"name": spec_config_map}}],
        ),
    }


def _worker_group(scaling: ScalingSpec, pods: PodParts) -> dict[str, Any]:
    cpus = math.ceil(scaling.cpus_per_worker)  # Ray nodes advertise whole CPUs
    start_params = {"num-cpus": str(cpus)}
    if not scaling.use_gpu:
        resources = _guaranteed({"cpu": str(cpus), "memory": f"{MEMORY_GIB_PER_CPU * cpus}Gi"})
        return {
            "groupName": "workers",
            **_group_size(scaling),
            "rayStartParams": start_params,
            "template": pods.template("ray-worker", resources),
        }

    if scaling.gpus_per_worker <= 0:
        raise SpecError("must be above 0 when scaling.use_gpu is true", field="scaling.gpus_per_worker")
    gpus = math.ceil(scaling.gpus_per_worker)  # a pod holds whole GPUs
    start_params["num-gpus"] = str(gpus)
    resources = _guaranteed({"cpu": str(cpus), "memory": f"{MEMORY_GIB_PER_CPU * cpus + MEMORY_GIB_PER_GPU * gpus}Gi"})
    resources["limits"][GPU_RESOURCE] = str(gpus)  # an extended resource: its request defaults to the limit
    placement: dict[str, Any] = {}
    if scaling.accelerator_type:
        placement["nodeSelector"] = {GPU_PRODUCT_LABEL: gpu_product(scaling.accelerator_type)}
    # GPU node pools are tainted so that only pods that ask for GPUs land there.
    placement["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "groupName": "gpu-workers",
        **_group_size(scaling),
        "rayStartParams": start_params,
        "template": pods.template(
            "ray-worker",
            resources,
            **placement,
            # NCCL and DataLoader workers share memory through /dev/shm; a container gets 64 MiB.
            mounts=[{"name": "dshm", "mountPath": "/dev/shm"}],
            volumes=[{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
        ),
    }


def _guaranteed(resources: dict[str, str]) -> dict[str, dict[str, str]]:
    """Requests = limits: what Ray is told the pod has (num-cpus) is what the pod gets."""
    return {"requests": dict(resources), "limits": dict(resources)}


def _group_size(scaling: Any) -> dict[str, int]:
    """One pod per worker. Fixed: the spec's count (Ray Train's placement group wants them all).
    Elastic: asked for at the most, bounded by the range; KubeRay recreates a lost pod (a
    preempted spot node), so the run shrinks while it is gone and grows back when it returns."""
    low = scaling.min_workers if scaling.elastic else scaling.num_workers
    return {"replicas": scaling.num_workers, "minReplicas": low, "maxReplicas": scaling.num_workers}


def gpu_product(accelerator_type: str) -> str:
    """scaling.accelerator_type (a Ray accelerator name) -> the nvidia.com/gpu.product label value."""
    try:
        return GPU_PRODUCTS[accelerator_type]
    except KeyError:
        raise SpecError(
            f"{accelerator_type!r} has no known {GPU_PRODUCT_LABEL} node label; known: {', '.join(GPU_PRODUCTS)}",
            field="scaling.accelerator_type",
        ) from None


# --------------------------------------------------------------------------------- yaml
class _ManifestDumper(yaml.SafeDumper):
    """Block-style YAML, with the embedded spec as a readable literal block."""

    def ignore_aliases(self, data: Any) -> bool:  # no &id001 anchors: kubectl users read this
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _represent_str)
