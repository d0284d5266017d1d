"""A spec's local paths, anchored where the command runs.

A spec's relative paths (`run.storage_path: ./runs`, `model.path: ./my-model`) mean relative to
the directory the user ran the command in. Ray Train's workers and Tune's trials run in
directories of their own, so the process that plans a run anchors its spec once, before
anything leaves it; every later reader sees absolute paths. A spec sent elsewhere (`rayft
submit`, a RayJob) is anchored by the job's own driver, in the job's working directory."""

from __future__ import annotations

import os

from rayft.spec.schema import JobSpec
from rayft.storage import is_remote, location


def anchored(spec: JobSpec) -> JobSpec:
    """`spec` with every local relative path made absolute against the current directory."""
    data = spec.data
    sources = {
        name: [s.model_copy(update={"path": _data_path(s.path)}) for s in getattr(data, name)]
        for name in ("train", "eval")
        if getattr(data, name)
    }
    wandb = spec.tracking.wandb
    return spec.model_copy(
        update={
            "model": spec.model.model_copy(update={"path": _existing(spec.model.path)}),
            "data": data.model_copy(
                update={**sources, "cache_dir": location(data.cache_dir) if data.cache_dir else None}
            ),
            "run": spec.run.model_copy(update={"storage_path": location(spec.run.storage_path)}),
            "tracking": spec.tracking.model_copy(
                update={"wandb": wandb.model_copy(update={"dir": location(wandb.dir) if wandb.dir else None})}
            ),
        }
    )


def _data_path(path: str) -> str:
    """A data source: a local file, directory or glob (anchored), or `hf:NAME` (unchanged)."""
    if is_remote(path) or ":" in path.split("/", 1)[0]:
        return path
    return os.path.abspath(os.path.expanduser(path))


def _existing(path: str) -> str:
    """A model or data path: absolute where it names something here; otherwise (a hub id,
    `pkg:`, `hf:`, a URI, a glob) unchanged, for its own resolver to read."""
    if is_remote(path) or ":" in path.split("/", 1)[0] or os.path.isabs(path):
        return path
    expanded = os.path.expanduser(path)
    return os.path.abspath(expanded) if os.path.exists(expanded) else path
