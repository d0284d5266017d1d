"""Models: where a base model comes from (source), its tokenizer, loading it for training
(dtype, 4-bit, LoRA), and trained models out of a run (load, merge, export)."""

from rayft.model.loading import load_model, torch_dtype, weight_dtype
from rayft.model.source import ModelSource, materialized_dir, resolve_source
from rayft.model.tokenizer import load_tokenizer

__all__ = [
    "ModelSource",
    "load_model",
    "load_tokenizer",
    "materialized_dir",
    "resolve_source",
    "torch_dtype",
    "weight_dtype",
]
