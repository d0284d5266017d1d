"""Connecting to Ray: an existing cluster (`--address` / RAY_ADDRESS, e.g. inside `ray job
submit`), or an embedded local instance sized to this machine."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

from rayft.env import EMBEDDED_RAY_ENV, STORAGE_ENV, processes_inherit_environment
from rayft.errors import ClusterError
from rayft.launch.local_node import without_unused_processes
from rayft.quiet import quiet_driver, quiet_env
from rayft.spec.secrets import is_secret_name


def job_env(address: str) -> dict:
    """For every process of the job: object-storage settings of this environment (endpoints,
    regions; never credentials, which rayft.env shares without Ray recording them), and the
    cluster's address. Ray's own helpers in the job's processes (Ray Train's placement-group
    cleaner, which frees the CPUs of a sweep trial stopped early) look the cluster up through the
    State API, and without an address they guess: with a second Ray on the machine (a
    developer's `ray start`) they guess wrong, and those CPUs stay reserved. Inside a submitted
    job its own environment has all this already (`rayft submit` sets it), and Ray refuses a
    ray.init that sets the same keys again."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return {}
    names = [name for group in STORAGE_ENV.values() for name in group if not is_secret_name(name)]
    env_vars = {name: os.environ[name] for name in names if name in os.environ}
    return {"env_vars": {**env_vars, "RAY_ADDRESS": address}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ray_auth_token() -> str | None:
    """The cluster token this client authenticates with, found where Ray looks for it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


AUTH_HINT = (
    "Ray 2.60 clusters use token authentication: export RAY_AUTH_MODE=token and make the cluster's token "
    "available here (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
)


def connect(
    address: str | None = None,
    *,
    verbose: bool = False,
    num_cpus: int | None = None,
    dashboard: bool = False,
    prestart: bool = False,
) -> str:
    """ray.init once; returns a description of what it connected to. `dashboard`: start one with
    an embedded local Ray (a sweep needs it; see below). `prestart`: an embedded local Ray starts
    a worker process per CPU with itself, for a command whose first act is a task per CPU (prepare):
    otherwise each starts when its task comes, one after another (the second read task of
    `rayft prepare` began 2.5 s after the first). Training starts actors, which never use them."""
    import ray

    if ray.is_initialized():
        return "already connected"
    os.environ.update({k: v for k, v in quiet_env().items() if k not in os.environ})
    if not verbose:
        quiet_driver()
    address = address or os.environ.get("RAY_ADDRESS")
    if address and "RAY_AUTH_MODE" not in os.environ and ray_auth_token():
        os.environ["RAY_AUTH_MODE"] = "token"  # a token is at hand: clusters of Ray >= 2.52 expect it
    try:
        if address:
            os.environ.pop(EMBEDDED_RAY_ENV, None)  # not inherited from a process that started its own
            # Ship this rayft to the cluster's workers: what runs there is what was submitted,
            # whether or not the cluster's image has rayft installed.
            package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # rayft/
            ray.init(
                address=address,
                log_to_driver=verbose,
                runtime_env={"py_modules": [package], **job_env(address)},
                logging_level=logging.ERROR if not verbose else logging.INFO,
            )
            where = f"Ray cluster at {address}"
        else:
            # address="local": a new instance of our own, even when a `ray start` cluster runs on
            # this machine (ray.init would otherwise join that one). A sweep needs the dashboard:
            # it serves the State API, which Ray Train's placement-group cleaner needs to release
            # a worker group whose controller died (a trial stopped early); without it those CPUs
            # stay reserved and the next trial never starts. Its address goes to every process
            # (they inherit this environment), so that the cleaner asks this instance, not another.
            # A single run has no use for it: its controller ends with this process, and the
            # dashboard's processes cost seconds of CPU at start-up (bench/results/startup.md).
            port = free_port() if dashboard else None
            if port:
                os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            # Ray Train's preemption watcher is one more actor process (2.6 CPU-s, started while the
            # workers import; bench/results/startup.md) that waits for drain notices. This
            # instance's only node is this machine, which no autoscaler drains.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            # Before ray.init: its processes inherit this environment (rayft.train.controller).
            os.environ[EMBEDDED_RAY_ENV] = "dashboard" if dashboard else "bare"
            if prestart:
                os.environ["RAY_enable_worker_prestart"] = "1"  # noqa: SIM112 (Ray config names are lower case)
            # A single run's instance starts without the head processes it never uses (local_node).
            lean = contextlib.nullcontext() if dashboard else without_unused_processes(forwards_logs=verbose)
            with lean:
                ray.init(
                    address="local",
                    num_cpus=num_cpus or os.cpu_count(),
                    include_dashboard=dashboard,
                    dashboard_port=port,
                    dashboard_host="127.0.0.1",
                    log_to_driver=verbose,
                    logging_level=logging.ERROR if not verbose else logging.INFO,
                )
            processes_inherit_environment()  # its workers are children of this process
            where = "embedded local Ray"
    except Exception as exc:  # ConnectionError, AuthenticationError, RuntimeError, TimeoutError ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        auth = "auth" in f"{type(exc).__name__} {exc}".lower() or not ray_auth_token()
        hint = f"; {AUTH_HINT}" if auth else "; check the address (HOST:6379) and that the cluster is up"
        hint = hint if address else ""
        raise ClusterError(f"cannot connect to Ray at {address or 'a new local instance'}: {reason}{hint}") from None
    resources = ray.cluster_resources()
    gpus = f", {resources['GPU']:g} GPU" if resources.get("GPU") else ""
    return f"{where} ({resources.get('CPU', 0):g} CPU{gpus}, {len(ray.nodes())} node(s))"
