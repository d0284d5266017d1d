"""Run directories in local/NFS paths or object storage (s3://, gs://) through pyarrow's
filesystems, the same layer Ray Train uses for checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from rayft.spec import JobSpec

FINAL_METRICS = "final_metrics.json"  # a run's summary, written by rank 0 when training ends


# What processes that read or write object storage need from the environment, by URI scheme.
CREDENTIAL_ENV = {
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
           "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"),
    "gs": ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"),
}


def credential_env(path: str) -> dict[str, str]:
    """The driver's storage credentials for `path`, to pass to workers and Ray Data tasks (by
    value in their runtime environment, never in a file)."""
    scheme = path.split("://", 1)[0] if "://" in path else ""
    return {name: os.environ[name] for name in CREDENTIAL_ENV.get(scheme, ()) if name in os.environ}


def storage_root(spec: JobSpec) -> str:
    storage = spec.run.storage_path
    return storage.rstrip("/") if "://" in storage else os.path.abspath(os.path.expanduser(storage))


def run_dir(spec: JobSpec) -> str:
    return f"{storage_root(spec)}/{spec.run_name}"


def _fs(path: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = _fs(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def upload_dir(local: str, target: str) -> None:
    """Copy a local directory to `target`, replacing what was there."""
    if "://" not in target:
        if os.path.exists(target):
            shutil.rmtree(target)
        shutil.copytree(local, target)
        return
    import pyarrow.fs as pafs

    fs, inner = _fs(target)
    if exists(target):
        fs.delete_dir(inner)
    pafs.copy_files(local, inner, destination_filesystem=fs)


def download_dir(source: str, local: str) -> str:
    if "://" not in source:
        return source
    import pyarrow.fs as pafs

    fs, inner = _fs(source)
    pafs.copy_files(inner, local, source_filesystem=fs)
    return local


def write_bytes(path: str, data: bytes) -> None:
    fs, inner = _fs(path)
    fs.create_dir(os.path.dirname(inner), recursive=True)
    with fs.open_output_stream(inner) as out:
        out.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_text(path: str) -> str | None:
    fs, inner = _fs(path)
    try:
        with fs.open_input_stream(inner) as handle:
            return handle.read().decode("utf-8")
    except (FileNotFoundError, OSError):
        return None


def write_json(path: str, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str))


def delete_file(path: str) -> None:
    fs, inner = _fs(path)
    if exists(path):
        fs.delete_file(inner)


def delete_dir(path: str) -> None:
    fs, inner = _fs(path)
    if exists(path):
        fs.delete_dir(inner)
