"""`rayft submit` and `rayft jobs`: the same job through Ray's job server, from Python.

The entrypoint is jobs/train.py, exactly what `ray job submit ... -- python jobs/train.py SPEC`
runs; the working directory travels with the excludes of jobs/runtime_env.yaml. Secrets named in
`run.forward_env` go from the submitter's environment into the job's environment at submission
(never into a file); they are masked in everything rayft prints.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from rayft.env import Target, secrets, settings
from rayft.errors import ClusterError, SpecError
from rayft.launch.cluster import ray_auth_token
from rayft.spec import JobSpec
from rayft.spec.secrets import redact_text

RUNTIME_ENV_FILE = "jobs/runtime_env.yaml"
ENTRYPOINT = "jobs/train.py"
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
# The job's secrets, sealed (see `seal`). Not RAYFT_-prefixed: those are forwarded as test hooks.
SEALED_SECRETS = "SEALED_JOB_SECRETS_RAYFT"


def client(address: str | None) -> Any:
    """A job client for the cluster's dashboard address (http://HOST:8265)."""
    # Ray 2.60 clusters use token auth by default; the client then reads ~/.ray/auth_token.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address or not address.startswith(("http://", "https://")):
        raise ClusterError(f"--address must be the cluster's job server, e.g. http://HEAD:8265 (got {address!r})")
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterError(f"cannot reach the Ray job server at {address}: {exc}") from None


def entrypoint(
    spec_path: Path, overrides: list[str], profiles: list[Path], working_dir: Path, fresh: bool = False
) -> str:
    """The command the job runs, with paths relative to the uploaded working directory."""

    def inside(path: Path) -> str:
        resolved = path.resolve()
        try:
            return str(resolved.relative_to(working_dir.resolve()))
        except ValueError:  # outside the upload: only works where the cluster shares this filesystem
            return str(resolved)

    parts = ["python", ENTRYPOINT, inside(spec_path), *overrides]
    for profile in profiles:
        parts += ["-p", inside(profile)]
    if fresh:
        parts.append("--fresh")
    return " ".join(shlex.quote(part) for part in parts)


def runtime_env(spec: JobSpec, working_dir: Path, address: str, sealed: str | None = None) -> dict[str, Any]:
    """The job's runtime environment: the working directory, the settings it needs, and the
    cluster's job-server address (rayft.launch.cluster.job_env says why its processes need it).
    Ray records it (`ray job list`, the dashboard show it), so secrets are in it only sealed."""
    env_file = working_dir / RUNTIME_ENV_FILE
    base = yaml.safe_load(env_file.read_text()) if env_file.is_file() else {}
    env_vars = {**base.get("env_vars", {}), **settings(spec, Target.JOB), "RAY_API_SERVER_ADDRESS": address}
    if sealed:
        env_vars[SEALED_SECRETS] = sealed
    return {"working_dir": str(working_dir), "excludes": base.get("excludes", []), "env_vars": env_vars}


def _fernet(token: str) -> Any:
    from cryptography.fernet import Fernet

    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(f"rayft-job-secrets:{token}".encode()).digest()))


def seal(values: dict[str, str], token: str) -> str:
    """Secrets encrypted with a key derived from the cluster's auth token: whoever can read the
    job's record without the token learns nothing, and whoever has the token can run code on
    the cluster anyway."""
    return _fernet(token).encrypt(json.dumps(values).encode()).decode("ascii")


def adopt_job_secrets() -> list[str]:
    """Inside a submitted job (jobs/train.py, first thing): unseal what `rayft submit` passed
    into this process's environment, and drop the sealed copy. Returns the names."""
    sealed = os.environ.pop(SEALED_SECRETS, None)
    token = ray_auth_token()
    if not sealed or not token:
        return []
    values = json.loads(_fernet(token).decrypt(sealed.encode()))
    for name, value in values.items():
        os.environ.setdefault(name, value)
    return sorted(values)


def submit(
    spec: JobSpec,
    spec_path: Path,
    *,
    overrides: list[str],
    profiles: list[Path],
    address: str | None,
    working_dir: Path,
    fresh: bool = False,
    follow: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[str, str]:
    """Submit; with follow, stream the job's output until it ends. Returns (job id, status)."""
    if not (working_dir / ENTRYPOINT).is_file():
        raise SpecError(f"{working_dir} has no {ENTRYPOINT}: submit from the repository root or pass --working-dir")
    jobs = client(address)
    command = entrypoint(spec_path, overrides, profiles, working_dir, fresh)
    values, token = secrets(spec, Target.JOB), ray_auth_token()
    if values and not token:
        log(
            f"not passing {', '.join(sorted(values))}: the cluster uses no auth token to seal them with; "
            "set them in the environment of the cluster's processes (ray start) instead"
        )
    sealed = seal(values, token) if values and token else None
    job_id = jobs.submit_job(
        entrypoint=command,
        runtime_env=runtime_env(spec, working_dir, jobs.get_address(), sealed),
        metadata={"rayft_run": spec.run_name},
    )
    passed = sorted(values) if sealed else []
    log(
        f"submitted {job_id}: {command}"
        + (f" (passing {', '.join(passed)} from this environment, sealed)" if passed else "")
    )
    if not follow:
        return job_id, str(jobs.get_job_status(job_id))
    asyncio.run(_follow(jobs, job_id, log))
    return job_id, _status(jobs, job_id)


async def _follow(jobs: Any, job_id: str, log: Callable[[str], None]) -> None:
    async for chunk in jobs.tail_job_logs(job_id):
        for line in chunk.rstrip("\n").split("\n"):
            log(redact_text(line))


def _status(jobs: Any, job_id: str) -> str:
    status = jobs.get_job_status(job_id)
    return getattr(status, "value", str(status))


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    rows = []
    for job in client(address).list_jobs():
        rows.append(
            {
                "job": job.submission_id or job.job_id,
                "status": getattr(job.status, "value", str(job.status)),
                "run": (job.metadata or {}).get("rayft_run", ""),
                "entrypoint": job.entrypoint,
                "start": job.start_time,
                "end": job.end_time,
            }
        )
    return sorted(rows, key=lambda row: row["start"] or 0)


def logs(address: str | None, job_id: str, follow: bool, log: Callable[[str], None] = print) -> str:
    jobs = client(address)
    if follow:
        asyncio.run(_follow(jobs, job_id, log))
    else:
        for line in jobs.get_job_logs(job_id).splitlines():
            log(redact_text(line))
    return _status(jobs, job_id)


def stop(address: str | None, job_id: str) -> str:
    jobs = client(address)
    jobs.stop_job(job_id)
    return _status(jobs, job_id)
