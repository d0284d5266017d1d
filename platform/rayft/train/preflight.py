"""What can be known about a job before Ray starts, checked before it starts: `rayft validate`
runs these, and so does every command that runs a job (train, eval, prepare, tune, preview).

The spec's own rules (types, ranges, finite numbers, known names, consistent fields, sweep
paths) are checked when it loads (rayft.spec); these need the file system or the network: the
model path is a model, every data source names files that exist and are not empty, the chat
template can be used, a DeepSpeed file parses, and object storage answers.
"""

from __future__ import annotations

import concurrent.futures
import os
from types import SimpleNamespace

from rayft import storage
from rayft.data.sources import HUB_PREFIX, expand
from rayft.data.templates import BUILTIN_TEMPLATES, resolve_template
from rayft.errors import SpecError
from rayft.model.source import resolve_source
from rayft.model.tokenizer import load_tokenizer
from rayft.nodes import check_shared
from rayft.rundir import local_models, prepared_base, storage_root
from rayft.spec import JobSpec, ModelSpec, anchored
from rayft.train.deepspeed import deepspeed_config

STORAGE_PROBE_SECONDS = 20  # an object store that has not answered in this long is unreachable


def preflight(spec: JobSpec, *, storage_probe: bool = True) -> None:
    """Raise a SpecError naming the field (and file) of the first problem found."""
    check_files(spec)
    check_template(spec)
    if spec.method.deepspeed:
        deepspeed_config(spec)  # a missing or broken JSON file, named
    if storage_probe:
        check_storage(spec)


def check_files(spec: JobSpec) -> None:
    """The model and every data source exist: the quick part of preflight (no tokenizer), which
    the CLI runs before it starts Ray, so that a mistyped path fails at once."""
    check_model(spec)
    check_data(spec)


def check_model(spec: JobSpec) -> None:
    resolve_source(spec.model)
    if spec.model.tokenizer:
        resolve_source(ModelSpec(path=spec.model.tokenizer), field="model.tokenizer")


def check_data(spec: JobSpec) -> None:
    for split, sources in (("train", spec.data.train), ("eval", spec.data.eval or [])):
        for index, source in enumerate(sources):
            field = f"data.{split}.{index}.path"
            try:
                files = expand(source.path)
            except SpecError as exc:
                raise SpecError(str(exc).split(": ", 1)[-1], field=field) from None
            for file in files:
                if not file.startswith(HUB_PREFIX) and not storage.is_remote(file) and os.path.getsize(file) == 0:
                    raise SpecError(f"{file} is empty", field=field)


def check_template(spec: JobSpec) -> None:
    """A built-in or .jinja template is checked on its own; the tokenizer's own one when the
    tokenizer is on this machine already (a hub tokenizer, or a GGUF not yet converted, is
    checked when the job loads it)."""
    sources = spec.data.train + (spec.data.eval or [])
    if all((source.format or spec.data.format) == "text" for source in sources):
        return
    name = spec.data.template
    if name in BUILTIN_TEMPLATES or name.endswith((".jinja", ".j2")):
        resolve_template(name, SimpleNamespace(chat_template=None, bos_token="<s>", eos_token="</s>"))
        return
    if name not in ("auto", "tokenizer"):
        resolve_template(name, SimpleNamespace(chat_template=None))  # the error naming the choices
    local = _local_tokenizer_dir(spec)
    if local is not None:
        resolve_template(name, load_tokenizer(spec, local))


def _local_tokenizer_dir(spec: JobSpec) -> str | None:
    source = resolve_source(ModelSpec(path=spec.model.tokenizer) if spec.model.tokenizer else spec.model)
    if not source.local:
        return None
    if not source.gguf_file:
        return source.location
    converted = [p for p in _entries(local_models(spec)) if p.startswith(os.path.splitext(source.gguf_file)[0])]
    return os.path.join(local_models(spec), converted[0]) if converted else None


def _entries(directory: str) -> list[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def check_storage(spec: JobSpec) -> None:
    """Object storage answers (in STORAGE_PROBE_SECONDS), with the credentials at hand."""
    for field, location in (("run.storage_path", storage_root(spec)), ("data.cache_dir", prepared_base(spec))):
        if not location.remote:
            continue
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        probe = pool.submit(storage.exists, str(location))
        try:
            probe.result(timeout=STORAGE_PROBE_SECONDS)
        except concurrent.futures.TimeoutError:
            raise SpecError(
                f"{location} did not answer in {STORAGE_PROBE_SECONDS}s: check the endpoint "
                "(AWS_ENDPOINT_URL for S3-compatible stores) and the network",
                field=field,
            ) from None
        except Exception as exc:  # pyarrow raises OSError with the store's own message
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SpecError(
                f"cannot reach {location}: {reason}; check its credentials and endpoint (AWS_* / GOOGLE_* variables)",
                field=field,
            ) from None
        finally:
            pool.shutdown(wait=False)  # a probe that hangs is left behind, not waited for


def check_cluster_paths(spec: JobSpec, *, run_storage: bool = True) -> None:
    """On a cluster of several nodes (Ray connected): every node sees the run storage and the
    data cache (it writes there), the data files and the model (it reads them), as this node
    does. Object storage is the same everywhere; a hub model or dataset is fetched by each node."""
    spec = anchored(spec)  # what another node resolves a relative path against is not our directory
    writable = {"data.cache_dir": str(prepared_base(spec))}
    if run_storage:
        writable = {"run.storage_path": str(storage_root(spec)), **writable}
    readable: dict[str, str] = {}
    for split, sources in (("train", spec.data.train), ("eval", spec.data.eval or [])):
        for index, source in enumerate(sources):
            for file in expand(source.path):
                if not file.startswith(HUB_PREFIX):
                    readable.setdefault(f"data.{split}.{index}.path", file)
    model = resolve_source(spec.model)
    if model.local:
        readable["model.path"] = os.path.join(model.location, model.gguf_file or "config.json")
    check_shared(writable, readable)
