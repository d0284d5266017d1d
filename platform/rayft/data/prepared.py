"""Prepared data as the rest of rayft sees it: where it is, what it holds (its statistics and
the chat template it was rendered with), and how a worker reads a split.

Workers, restarts and sweep trials read a split as a map-style dataset, so the trainer's
distributed sampler and exact mid-epoch resume keep working.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from rayft import storage
from rayft.errors import DataError
from rayft.machine_cache import home

STATS_FILE = "stats.json"  # written last: a prepared directory without it is incomplete
TOKEN_COLUMNS = ["input_ids", "labels", "seq_lengths", "sample_ids"]
# Counts in stats.json of records that were used, changed: every other count but records and kept
# (and a source's number of files) is a reason records were dropped.
KEPT_CHANGED = ("truncated", "system_folded", "system_dropped")
NOT_DROPPED = ("records", "kept", "files", *KEPT_CHANGED)


def dropped(counts: dict[str, Any]) -> dict[str, int]:
    """The drop reasons among a stats.json count dict (totals, a source's or a file's) with their
    non-zero counts."""
    return {key: value for key, value in counts.items() if isinstance(value, int) and value and key not in NOT_DROPPED}


@dataclass(frozen=True)
class Prepared:
    """A prepared dataset: its directory, cache key, statistics (stats.json) and the source of
    the chat template its conversations were rendered with (None for raw text)."""

    root: str
    key: str
    stats: dict[str, Any] = field(default_factory=dict)
    template: str | None = None

    @classmethod
    def read(cls, root: str) -> Prepared | None:
        """The prepared dataset at `root`, or None when it is missing or incomplete."""
        stats = read_stats(root)
        if stats is None:
            return None
        return cls(root, stats.get("key", os.path.basename(root)), stats, stats.get("template"))

    def files(self, split: str) -> list[str]:
        return sorted(self.stats.get("files", {}).get(split, []))

    def split(self, split: str) -> dict[str, Any]:
        """The statistics of one split (rows, samples, tokens, ...); zeros when it is empty."""
        return self.stats.get("splits", {}).get(split) or {"rows": 0, "samples": 0, "tokens": 0, "trained_tokens": 0}

    @property
    def train_rows(self) -> int:
        return int(self.split("train")["rows"])

    @property
    def eval_rows(self) -> int:
        return int(self.split("eval")["rows"])


def read_stats(root: str) -> dict[str, Any] | None:
    return storage.read_json(f"{root}/{STATS_FILE}")


def load_split(prepared: Prepared, split: str) -> Any:
    """A prepared split as a map-style `datasets.Dataset` (what the HF trainer samples from),
    memory-mapped: the parquet is streamed once per node into an Arrow file, so a dataset larger
    than RAM is paged in as the sampler reaches it, and the workers on a node share one copy."""
    import datasets
    import pyarrow as pa

    paths = prepared.files(split)
    if not paths:
        return None
    # Named by the files themselves (Ray's file names are unique per write; local ones add size
    # and mtime): a re-prepared dataset never reads a stale local copy.
    identity = [
        p if storage.is_remote(p) else f"{os.path.abspath(p)}:{os.path.getsize(p)}:{os.path.getmtime(p)}" for p in paths
    ]
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]
    local = str(home() / "prepared" / f"{digest}-{split}.arrow")  # this node's copy, as its HOME says now
    if not os.path.isfile(local):
        _stream_to_arrow(paths, local)
    return datasets.Dataset(pa.ipc.open_file(pa.memory_map(local)).read_all())


def _stream_to_arrow(paths: list[str], local: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(local), exist_ok=True)
    staging = f"{local}.{os.getpid()}.tmp"
    writer = None
    try:
        for path in paths:
            fs, inner = storage.filesystem(path)
            for batch in pq.ParquetFile(inner, filesystem=fs).iter_batches(batch_size=1024, columns=TOKEN_COLUMNS):
                if writer is None:
                    writer = pa.ipc.new_file(staging, batch.schema)
                writer.write_batch(batch)
    except BaseException:
        if writer is not None:
            writer.close()
        if os.path.exists(staging):
            os.remove(staging)
        raise
    if writer is None:
        raise DataError(f"prepared data {paths[0]} has no rows")
    writer.close()
    os.replace(staging, local)  # atomic: workers converting at once all end with one whole file
