"""Held-out loss and perplexity, for the base and the tuned model, on the same tokens.

Both models are scored on every row of the prepared eval split, exactly as the trainer saw
them: the same input_ids, and loss only where labels are not -100 (labels are shifted inside
the model, so a row's first label never counts). The result is the token-weighted mean over
all trained tokens of the split, not a mean of batch means, so it does not depend on batch
size or on how the rows were split over tasks: each task returns per-row sums of token losses
and token counts, and the driver adds them up. Perplexity is exp of that mean.

Each model runs as Ray tasks (several per model when the split is large), so base and tuned
are scored in parallel and a large eval set spreads over the cluster.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rayft.data.prepared import Prepared, load_split
from rayft.data.tokenize import IGNORE
from rayft.env import share_secrets
from rayft.eval.tasks import ModelRef, load_on_this_node, shard_count, shard_ranges, task_options
from rayft.spec import JobSpec

MIN_ROWS_PER_SHARD = 256  # loading a model costs more than scoring fewer rows than this


@dataclass
class RowLoss:
    nll: float  # sum of the token losses of the row's trained tokens (natural log)
    tokens: int  # trained tokens that the loss counts
    digest: str  # of the row's input_ids and labels: proves two models saw the same tokens


@dataclass
class HeldOutLoss:
    loss: float  # token-weighted mean cross-entropy over the trained tokens of the split
    perplexity: float
    rows: int  # samples scored (an eval row holds one; a packed row would count each)
    tokens: int  # trained tokens the mean is over
    tokens_digest: str
    shards: int = 1

    @classmethod
    def combine(cls, rows: Sequence[RowLoss], shards: int = 1) -> HeldOutLoss:
        tokens = sum(row.tokens for row in rows)
        # fsum: the exact sum of the row sums, whatever their order or grouping in shards
        loss = math.fsum(row.nll for row in rows) / tokens if tokens else float("nan")
        digest = hashlib.sha256("".join(row.digest for row in rows).encode()).hexdigest()[:16]
        return cls(loss, perplexity(loss), len(rows), tokens, digest, shards)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def row_losses(model: Any, rows: Sequence[dict[str, Any]], batch_size: int = 4) -> list[RowLoss]:
    """Sum of token losses and trained-token count per row, in right-padded batches. A packed
    row is scored sample by sample (eval rows are not packed, but a packed one must not let
    its samples attend to each other)."""
    import torch

    samples = [(ids, labels) for row in rows for ids, labels in _samples_of(row)]
    device = next(model.parameters()).device
    out: list[RowLoss] = []
    model.eval()
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, row_labels) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.tensor(row_labels)
            attention[i, : len(ids)] = 1
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        # position t predicts token t+1, as in the models' own causal LM loss
        targets = labels[:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
        )
        sums = losses.double().sum(dim=1).tolist()
        counts = (targets != IGNORE).sum(dim=1).tolist()
        for (ids, row_labels), nll, count in zip(batch, sums, counts):
            out.append(RowLoss(nll, int(count), _digest(ids, row_labels)))
    return out


def _samples_of(row: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    ids, labels = list(row["input_ids"]), list(row["labels"])
    lengths = list(row.get("seq_lengths") or [len(ids)])
    pieces, start = [], 0
    for length in lengths:
        pieces.append((ids[start : start + length], labels[start : start + length]))
        start += length
    return pieces


def _digest(ids: Sequence[int], labels: Sequence[int]) -> str:
    return hashlib.sha256(repr((list(ids), list(labels))).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------- Ray tasks
def _loss_task(
    model: ModelRef, spec: JobSpec, prepared: Prepared, start: int, end: int, batch_size: int, secrets: Any
) -> list[RowLoss]:
    loaded, _ = load_on_this_node(model, spec, secrets)
    rows = load_split(prepared, "eval").select(range(start, end))
    return row_losses(loaded, rows, batch_size)


def submit_held_out_loss(
    spec: JobSpec, models: dict[str, ModelRef], prepared: Prepared, shards: int | None = None
) -> dict[str, list[Any]]:
    """Start the loss tasks (label -> (model dir, LoRA adapter dir or None)); returns their
    futures for `collect_held_out_loss`, so generation can run meanwhile."""
    import ray

    rows = prepared.eval_rows
    if not rows:
        return {}
    batch_size = spec.train.micro_batch_size  # what training fit in memory, with activations
    shards = shards or shard_count(rows, MIN_ROWS_PER_SHARD, len(models), spec)
    ranges = shard_ranges(rows, shards, batch_size)
    task = ray.remote(**task_options(spec))(_loss_task)
    secrets = share_secrets(spec)
    return {
        label: [task.remote(model, spec, prepared, start, end, batch_size, secrets) for start, end in ranges]
        for label, model in models.items()
    }


def collect_held_out_loss(futures: dict[str, list[Any]]) -> dict[str, HeldOutLoss]:
    import ray

    return {
        label: HeldOutLoss.combine([row for part in ray.get(refs) for row in part], shards=len(refs))
        for label, refs in futures.items()
    }


def held_out_loss(
    spec: JobSpec, models: dict[str, ModelRef], prepared: Prepared, shards: int | None = None
) -> dict[str, HeldOutLoss]:
    """Eval loss and perplexity of each model on the prepared eval split, on Ray tasks."""
    return collect_held_out_loss(submit_held_out_loss(spec, models, prepared, shards))
