"""Where files live: a local (or NFS) path or an object-store URI (s3://, gs://), read and
written through pyarrow's filesystems, the same layer Ray Train uses for checkpoints.

`Location` is the one place that tells a URI from a local path and expands `~`: every other
module asks it (`is_remote`, `location`), so `run.storage_path: ~/runs` means `$HOME/runs` for
checkpoints, prepared data and converted models alike.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

SCHEME_SEPARATOR = "://"
# URI schemes pyarrow's filesystems open (what Ray Train's storage accepts too).
SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "file")


def is_remote(path: str) -> bool:
    """An object-store (or other fsspec-style) URI rather than a path on this machine."""
    return SCHEME_SEPARATOR in path


def scheme(path: str) -> str:
    """'s3' for s3://bucket/key, 'file' for file:///x, '' for a plain path."""
    return path.split(SCHEME_SEPARATOR, 1)[0].lower() if is_remote(path) else ""


def check_scheme(path: str) -> str:
    """`path`, or a ValueError naming the schemes that can be used."""
    if is_remote(path) and scheme(path) not in SCHEMES:
        raise ValueError(
            f"{path!r}: unknown storage scheme {scheme(path)}://; use a local or NFS path, or one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    return path


@dataclass(frozen=True)
class Location:
    """A normalized storage location: a URI without a trailing slash, or an absolute local path
    with `~` expanded. `str(location)` is what is stored and printed."""

    path: str

    @classmethod
    def of(cls, path: str) -> Location:
        if is_remote(path):
            return cls(path.rstrip("/"))
        return cls(os.path.abspath(os.path.expanduser(path)))

    @property
    def remote(self) -> bool:
        return is_remote(self.path)

    @property
    def scheme(self) -> str:
        return scheme(self.path)

    def join(self, *parts: str) -> Location:
        return Location("/".join([self.path.rstrip("/"), *(p.strip("/") for p in parts)]))

    def filesystem(self) -> tuple[Any, str]:
        """(pyarrow filesystem, path inside it)."""
        return filesystem(self.path)

    def __str__(self) -> str:
        return self.path


def location(path: str) -> str:
    """`Location.of(path)` as a string: the form every stored path takes."""
    return Location.of(path).path


def filesystem(path: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if is_remote(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def portable_filesystem(path: str) -> tuple[Any, str]:
    """(filesystem, path inside it) for processes that cannot read this process's credentials
    from their own environment: Ray Train's controller and workers, Ray Data's write tasks. An
    S3 filesystem is built with this process's AWS_* credentials inside it, and reaches them
    pickled, through the object store (never a runtime environment, which Ray records)."""
    if scheme(path) != "s3" or not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
        return filesystem(path)
    import pyarrow.fs as pafs

    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    fs = pafs.S3FileSystem(
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        session_token=env.get("AWS_SESSION_TOKEN"),
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        endpoint_override=endpoint,
    )
    return fs, path.split(SCHEME_SEPARATOR, 1)[1].rstrip("/")


def for_ray(path: str) -> tuple[str, Any | None]:
    """(storage_path, storage_filesystem) for Ray Train's and Tune's RunConfig: a location as is,
    or, where credentials must travel inside the filesystem (portable_filesystem), the path
    inside it and that filesystem."""
    if not is_remote(path):
        return path, None
    fs, inner = portable_filesystem(path)
    import pyarrow.fs as pafs

    return (inner, fs) if isinstance(fs, pafs.S3FileSystem) and inner != path else (path, None)


def with_scheme(like: str, inner: str) -> str:
    """A path inside `like`'s filesystem, as a full location again (s3://bucket/x for bucket/x)."""
    return f"{scheme(like)}{SCHEME_SEPARATOR}{inner.lstrip('/')}" if is_remote(like) and not is_remote(inner) else inner


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def upload_dir(local: str, target: str) -> None:
    """Copy a local directory to `target`, replacing what was there."""
    if not is_remote(target):
        if os.path.exists(target):
            shutil.rmtree(target)
        shutil.copytree(local, target)
        return
    import pyarrow.fs as pafs

    fs, inner = filesystem(target)
    if exists(target):
        fs.delete_dir(inner)
    pafs.copy_files(local, inner, destination_filesystem=fs)


def download_dir(source: str, local: str) -> str:
    """A local directory with `source`'s files: `source` itself when it is local."""
    if not is_remote(source):
        return source
    import pyarrow.fs as pafs

    fs, inner = filesystem(source)
    pafs.copy_files(inner, local, source_filesystem=fs)
    return local


def write_bytes(path: str, data: bytes) -> None:
    fs, inner = filesystem(path)
    fs.create_dir(os.path.dirname(inner), recursive=True)
    with fs.open_output_stream(inner) as out:
        out.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist (or cannot be read)."""
    fs, inner = filesystem(path)
    try:
        with fs.open_input_stream(inner) as handle:
            return handle.read().decode("utf-8")
    except (FileNotFoundError, OSError):
        return None


def write_json(path: str, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str))


def read_json(path: str) -> Any | None:
    text = read_text(path)
    return json.loads(text) if text else None


def delete_file(path: str) -> None:
    fs, inner = filesystem(path)
    if exists(path):
        fs.delete_file(inner)


def delete_dir(path: str) -> None:
    fs, inner = filesystem(path)
    if exists(path):
        fs.delete_dir(inner)


def move_dir(source: str, target: str) -> None:
    """Rename a directory within one filesystem (atomic on a local disk)."""
    fs, inner = filesystem(source)
    _, target_inner = filesystem(target)
    fs.move(inner, target_inner)


def list_files(path: str, suffix: str = "") -> list[str]:
    """Names (not paths) of the files directly inside a directory, sorted."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return []
    return sorted(
        info.base_name
        for info in fs.get_file_info(pafs.FileSelector(inner))
        if info.type == pafs.FileType.File and info.base_name.endswith(suffix)
    )
