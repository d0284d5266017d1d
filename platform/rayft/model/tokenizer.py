"""The tokenizer of a job: from `model.tokenizer`, else the model's (converted) directory."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from rayft.errors import ModelError
from rayft.machine_cache import MachineCache
from rayft.model.source import ModelSource, resolve_source
from rayft.spec import JobSpec, ModelSpec

# The generic fast tokenizer: where AutoTokenizer chose it, it loads without AutoTokenizer's own
# imports (transformers' configuration modules import torch: 5 CPU-s of the 6.7 s that loading
# SmolLM2's tokenizer took, in the driver while Ray starts and in every data worker).
GENERIC_CLASS = "TokenizersBackend"
# The class AutoTokenizer chose for a tokenizer directory, by the digest of the files it decides
# from and transformers' version: every later process on the machine skips the decision.
CHOSEN = MachineCache("tokenizer_classes.json")
DECIDING_FILES = ("tokenizer_config.json", "config.json", "tokenizer.json", "special_tokens_map.json")


def load_tokenizer(spec: JobSpec, model_dir: str | None = None, *, resolved_class: str | None = None) -> Any:
    """`resolved_class`: the class name AutoTokenizer chose for the same files in another process
    (the driver's tokenizer, passed to the data workers)."""
    if spec.model.tokenizer:
        source = resolve_source(ModelSpec(path=spec.model.tokenizer), field="model.tokenizer")
    else:
        source = ModelSource(model_dir) if model_dir else resolve_source(spec.model)
    key = None if source.load_kwargs() or spec.model.revision else _files_key(source.location)
    remembered = CHOSEN.get(key) if key else None
    deciding = (resolved_class or remembered) != GENERIC_CLASS  # AutoTokenizer decides, as it would
    if not deciding:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        loader: Any = TokenizersBackend
    else:
        from transformers import AutoTokenizer

        loader = AutoTokenizer
    try:
        tokenizer = loader.from_pretrained(
            source.location,
            revision=spec.model.revision,
            trust_remote_code=spec.model.trust_remote_code,
            **source.load_kwargs(),
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer from {source.location}: {exc}") from None
    if key and deciding and remembered != type(tokenizer).__name__:
        CHOSEN.put(key, type(tokenizer).__name__)
    return with_pad_token(tokenizer)


def _files_key(location: str) -> str | None:
    """transformers' version and the digest of the files AutoTokenizer decides from, for a local
    directory; None for anything else (a hub id: its files are not here to read)."""
    if not os.path.isdir(location):
        return None
    from transformers import __version__ as transformers_version

    digest = hashlib.blake2b(digest_size=16)
    for name in DECIDING_FILES:
        path = os.path.join(location, name)
        if os.path.isfile(path):
            digest.update(name.encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return f"transformers {transformers_version}|{digest.hexdigest()}"


def with_pad_token(tokenizer: Any) -> Any:
    """Padding is masked out of the loss and attention, so any token works; EOS is the convention."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
