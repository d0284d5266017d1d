"""Evaluation work as Ray tasks: their resources and environment, how many a model gets, and
loading a model inside one (which may run on another node than the driver)."""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

from rayft import storage
from rayft.env import Target, adopt_secrets, runtime_env
from rayft.model import materialized_dir
from rayft.model.trained import load_for_generation
from rayft.quiet import quiet_worker
from rayft.rundir import local_models
from rayft.spec import JobSpec

ModelRef = tuple[str, "str | None"]  # (model directory, LoRA adapter directory or None)


def task_options(spec: JobSpec) -> dict[str, Any]:
    """One CPU per task; one GPU each when the job trains on GPUs and the cluster has them; the
    environment evaluation tasks get (storage credentials: they read data and models there)."""
    import ray

    options: dict[str, Any] = {"num_cpus": 1}
    if spec.scaling.use_gpu and ray.cluster_resources().get("GPU"):
        options["num_gpus"] = 1
    env = runtime_env(spec, Target.EVAL_TASKS)
    if env:
        options["runtime_env"] = env
    return options


def shard_count(items: int, min_per_shard: int, models: int, spec: JobSpec) -> int:
    """Tasks per model: one for a small eval set; for a large one, as many as the cluster can
    run at once beside the other models' tasks, but each with at least `min_per_shard` items."""
    import ray

    resources = ray.cluster_resources()
    slots = resources.get("GPU", 0) if "num_gpus" in task_options(spec) else resources.get("CPU", 1)
    by_size = max(1, items // max(1, min_per_shard))
    return max(1, min(by_size, int(slots) // max(1, models)))


def shard_ranges(rows: int, shards: int, batch_size: int) -> list[tuple[int, int]]:
    """Row ranges whose boundaries fall on batch boundaries, so every batch holds the same rows
    however many shards there are: sharded and unsharded results are then identical."""
    size = math.ceil(rows / max(1, shards))
    size = max(batch_size, math.ceil(size / batch_size) * batch_size)
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


def task_device() -> str:
    """Inside a Ray task: the GPU Ray gave it (CUDA_VISIBLE_DEVICES), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_on_this_node(model: ModelRef, spec: JobSpec, secrets: Any = None) -> tuple[Any, Any]:
    """`load_for_generation` inside a Ray task, on the task's device: a model in object storage
    is downloaded here, and a base the driver converted into its local cache (e.g. from GGUF) is
    converted here too, as training workers do. `secrets`: rayft.env.share_secrets's store."""
    import torch

    adopt_secrets(secrets)
    quiet_worker()
    torch.set_num_threads(1)
    model_dir, adapter_dir = model
    if not os.path.isdir(model_dir) and model_dir.startswith(local_models(spec)):
        model_dir = materialized_dir(spec)
    if adapter_dir and storage.is_remote(adapter_dir):
        adapter_dir = storage.download_dir(adapter_dir, tempfile.mkdtemp(prefix="rayft-adapter-"))
    elif storage.is_remote(model_dir):
        model_dir = storage.download_dir(model_dir, tempfile.mkdtemp(prefix="rayft-model-"))
    loaded, tokenizer = load_for_generation(model_dir, adapter_dir, spec)
    return loaded.to(task_device()), tokenizer
