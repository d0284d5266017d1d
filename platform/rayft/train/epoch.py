"""An epoch of whole optimizer steps, so that every sample is trained exactly once per epoch.

Accelerate shards the trainer's batches over the workers with `even_batches`: when an epoch's
micro-batches do not divide evenly among the workers, or the last one is short, it fills them
with samples from the start of the epoch, which are then trained twice (21 samples per epoch on
the quickstart). rayft instead tops the training split up to a whole number of global batches
with rows that carry no loss: one padding token, no trained label, no sample id. TRL normalizes
each step's loss by the trained tokens of the whole global batch, so these rows change neither the
loss nor the gradient, and a short final step weighs its real samples as a full one would.

The padded length depends on the global batch only, not on the worker count, so the sampler's
order (a permutation of the padded split) is the same on 1 or N workers, before and after an
elastic resize or a resume.
"""

from __future__ import annotations

from typing import Any

from rayft.data.tokenize import IGNORE


def whole_steps(dataset: Any, rows_per_step: int, pad_token_id: int) -> Any:
    """`dataset` with rows that carry no loss appended, up to a multiple of `rows_per_step`."""
    missing = -len(dataset) % rows_per_step
    if missing == 0:
        return dataset
    import datasets

    filler = {
        "input_ids": [[pad_token_id]] * missing,
        "labels": [[IGNORE]] * missing,
        "seq_lengths": [[1]] * missing,
        "sample_ids": [[]] * missing,
    }
    extra = datasets.Dataset.from_dict({name: filler[name] for name in dataset.column_names}, features=dataset.features)
    return datasets.concatenate_datasets([dataset, extra])
