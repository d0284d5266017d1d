"""Where a spec's prepared data lives: a cache key over everything that affects the pipeline's
output (the data section, the files' sizes and times, the tokenizer, the chat template), under
data.cache_dir or <run.storage_path>/prepared. Training, `rayft prepare` and `rayft plan` all
find the data through `locate`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from rayft.data.sources import expand, fingerprint
from rayft.data.templates import ChatTemplate, resolve_template
from rayft.rundir import prepared_base
from rayft.spec import JobSpec, anchored

PIPELINE_VERSION = 4  # bump when the output of the pipeline changes for the same inputs


@dataclass(frozen=True)
class CacheEntry:
    """The prepared data a spec and tokenizer would produce: where, under which key, from
    which files, rendered with which template."""

    root: str
    key: str
    files: list[list[str]]  # per source, the files it expands to
    template: ChatTemplate | None


def locate(spec: JobSpec, tokenizer: Any) -> CacheEntry:
    # Keyed on the anchored spec: `rayft prepare` with `train: data/x.jsonl` and a run planned
    # from the same spec (anchored before its workers start) must find the same prepared data.
    spec = anchored(spec)
    sources = spec.data.train + (spec.data.eval or [])
    files = [expand(source.path) for source in sources]
    needs_template = any((source.format or spec.data.format) != "text" for source in sources)
    template = resolve_template(spec.data.template, tokenizer) if needs_template else None
    key = cache_key(spec, tokenizer, template, files)
    return CacheEntry(str(prepared_base(spec).join(key)), key, files, template)


def cache_key(spec: JobSpec, tokenizer: Any, template: ChatTemplate | None, files: list[list[str]]) -> str:
    data = spec.data.model_dump(mode="json")
    data.pop("cache", None)
    data.pop("cache_dir", None)
    identity = {
        "version": PIPELINE_VERSION,
        "data": data,
        "files": [[fingerprint(f) for f in group] for group in files],
        "tokenizer": hashlib.sha256(_tokenizer_identity(tokenizer).encode()).hexdigest(),
        "template": template.source if template else None,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _tokenizer_identity(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return vocab + json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token])
