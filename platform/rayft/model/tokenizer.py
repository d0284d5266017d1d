"""The tokenizer of a job: from `model.tokenizer`, else the model's (converted) directory."""

from __future__ import annotations

from typing import Any

from rayft.errors import ModelError
from rayft.model.source import ModelSource, resolve_source
from rayft.spec import JobSpec, ModelSpec

# The generic fast tokenizer: where AutoTokenizer chose it, it loads without AutoTokenizer's own
# imports (transformers' configuration modules import torch: 3-4 s in every data worker).
GENERIC_CLASS = "TokenizersBackend"


def load_tokenizer(spec: JobSpec, model_dir: str | None = None, *, resolved_class: str | None = None) -> Any:
    """`resolved_class`: the class name AutoTokenizer chose for the same files in another process
    (the driver's tokenizer, passed to the data workers)."""
    if resolved_class == GENERIC_CLASS:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        loader: Any = TokenizersBackend
    else:
        from transformers import AutoTokenizer

        loader = AutoTokenizer

    if spec.model.tokenizer:
        source = resolve_source(ModelSpec(path=spec.model.tokenizer), field="model.tokenizer")
    else:
        source = ModelSource(model_dir) if model_dir else resolve_source(spec.model)
    try:
        tokenizer = loader.from_pretrained(
            source.location,
            revision=spec.model.revision,
            trust_remote_code=spec.model.trust_remote_code,
            **source.load_kwargs(),
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer from {source.location}: {exc}") from None
    return with_pad_token(tokenizer)


def with_pad_token(tokenizer: Any) -> Any:
    """Padding is masked out of the loss and attention, so any token works; EOS is the convention."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
