"""Whether every node of the cluster sees the paths a job uses: the run storage and the data
cache (each node writes there), the data files and the model directory (each node reads them).

A path only some nodes see fails late and misleadingly: prepare tasks on a second node write
their output to that node's own disk, and the driver then finds "no training samples left". So
before anything is prepared, this process writes a token into each writable directory and one
tiny task per node (pinned to it, no CPU reserved) reads the tokens back and checks the input
files' sizes. Object-store URIs (s3://, gs://) are the same everywhere and are not probed.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Any

from rayft import storage
from rayft.errors import ClusterError

ANSWER_TIMEOUT_S = 180  # a node starts a worker process for the probe: slow on a busy machine
PROBE_PREFIX = ".rayft-visible-"
_verified: set[tuple[str, str, frozenset[str]]] = set()  # (field, path, nodes) this process checked


@dataclass(frozen=True)
class Probe:
    field: str  # the spec field that names the path
    path: str
    token: str | None  # written there (a directory every node writes), or None: a file every node reads
    size: int = -1  # the file's size here, for inputs


def on_this_node() -> dict[str, Any]:
    """Ray options that keep an actor on this (the driver's) node. The run's helpers (progress
    board, W&B tracker, data ledger, secret store) live as long as the driver does: placed on a
    worker node, they would die with it and end a run that could have gone on without it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def check_shared(writable: dict[str, str], readable: dict[str, str] | None = None) -> None:
    """Every alive node sees `writable` (field -> directory) and `readable` (field -> file) as
    this node does; ClusterError naming the path, the nodes and the fix otherwise."""
    import ray

    if not ray.is_initialized():
        return
    nodes = _worker_nodes()
    here = ray.get_runtime_context().get_node_id()
    if not nodes or (len(nodes) == 1 and nodes[0]["NodeID"] == here):
        return  # one node, this one: nothing to compare
    members = frozenset(n["NodeID"] for n in nodes)
    probes = [
        _writable_probe(field, path)
        for field, path in writable.items()
        if not storage.is_remote(path) and (field, path, members) not in _verified
    ]
    probes += [
        Probe(field, path, None, os.path.getsize(path))
        for field, path in (readable or {}).items()
        if not storage.is_remote(path) and os.path.isfile(path) and (field, path, members) not in _verified
    ]
    if not probes:
        return
    try:
        answers = _ask(nodes, probes)
    finally:
        for probe in probes:
            if probe.token:
                storage.delete_file(os.path.join(probe.path, PROBE_PREFIX + probe.token))
    for index, probe in enumerate(probes):
        blind = [node for node, seen in answers.items() if seen is not None and not seen[index]]
        if blind:
            raise ClusterError(_not_shared(probe, blind, nodes))
        _verified.add((probe.field, probe.path, members))


def _worker_nodes() -> list[dict[str, Any]]:
    """The alive nodes that can run a task or worker (a head with num-cpus=0 runs neither)."""
    import ray

    resources = ("CPU", "GPU")
    return [n for n in ray.nodes() if n.get("Alive") and any(n.get("Resources", {}).get(r, 0) > 0 for r in resources)]


def _writable_probe(field: str, directory: str) -> Probe:
    token = secrets.token_hex(8)
    os.makedirs(directory, exist_ok=True)
    storage.write_text(os.path.join(directory, PROBE_PREFIX + token), token)
    return Probe(field, directory, token)


def _ask(nodes: list[dict[str, Any]], probes: list[Probe]) -> dict[str, list[bool] | None]:
    """node id -> whether it sees each probe (None: it did not answer in time)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(_sees)
    pending = {
        node["NodeID"]: remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(probes)
        for node in nodes
    }
    ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=ANSWER_TIMEOUT_S)
    answered = set(ready)
    return {node: (ray.get(ref) if ref in answered else None) for node, ref in pending.items()}


def _sees(probes: list[Probe]) -> list[bool]:
    """On one node: whether each probe's token (or file of the same size) is there."""
    seen = []
    for probe in probes:
        if probe.token is None:
            seen.append(os.path.isfile(probe.path) and os.path.getsize(probe.path) == probe.size)
            continue
        marker = os.path.join(probe.path, PROBE_PREFIX + probe.token)
        try:
            with open(marker, encoding="utf-8") as handle:
                seen.append(handle.read() == probe.token)
        except OSError:
            seen.append(False)
    return seen


def _not_shared(probe: Probe, blind: list[str], nodes: list[dict[str, Any]]) -> str:
    total = len(nodes)
    names = {n["NodeID"]: f"{n.get('NodeManagerAddress', '?')} ({n['NodeID'][:12]})" for n in nodes}
    which = ", ".join(names.get(node, node[:12]) for node in blind)
    if probe.token is None:
        what = f"{probe.field}: {probe.path} is missing (or different) on {len(blind)} of {total} nodes: {which}"
        fix = "copy it to the same path on every node, or put it on a shared filesystem (NFS, a Kubernetes PVC)"
    else:
        what = (
            f"{probe.field}: {probe.path} is not the same directory on every node: {len(blind)} of {total} nodes "
            f"({which}) do not see what this node wrote there, and every node that runs a task or a worker "
            "reads and writes it"
        )
        fix = (
            "put it on a filesystem mounted at the same path on every node (NFS, a Kubernetes PVC) or use "
            "object storage (s3://bucket/path, gs://bucket/path)"
        )
    return f"{what}. Fix: {fix}."
