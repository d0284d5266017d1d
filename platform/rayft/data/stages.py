"""The stages of the preprocessing pipeline, as Ray Data pieces.

read (SampleSource) -> normalize + filter + dedup + split -> tokenize + mask + truncate (Encoder),
all inside the read tasks: each record is parsed once, keeps its file:line, and never crosses the
object store (or JSON) before it is tokenized; as many tasks run as there are chunks and CPUs
-> pack (pack_rows) -> parquet.
Counts of everything dropped go to one `Ledger` actor, per source file and reason, which also
holds the hashes for de-duplication across all tasks.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from rayft.data.fidelity import FidelityCheck
from rayft.data.formats import detect_format, to_sample
from rayft.data.packing import pack
from rayft.data.quality import content_hash, drop_reason
from rayft.data.sources import Chunk, read_chunk
from rayft.data.templates import ChatTemplate
from rayft.data.tokenize import (
    Encoded,
    RecordError,
    Rendered,
    control_tokens,
    encode_texts,
    fit_system_turns,
    render_sample,
    tokenize_rendered,
    truncate,
)
from rayft.env import adopt_secrets
from rayft.errors import DataError
from rayft.model.tokenizer import load_tokenizer
from rayft.spec import DataSpec

TOKENS_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("seq_lengths", pa.list_(pa.int32())),
        ("sample_ids", pa.list_(pa.int64())),
        ("n_tokens", pa.int32()),
        ("n_trained", pa.int32()),
        ("messages", pa.string()),
    ]
)
BLOCK_ROWS = 2048
MAX_ERRORS_KEPT = 20


def sample_id(source: int, file: int, index: int, copy: int = 0) -> int:
    """Unique and stable per record (and per copy when a source is up-weighted): 7 bits of
    source, 16 of file, 4 of copy and 36 of record index fill a non-negative int64."""
    if source >= 1 << 7 or file >= 1 << 16 or copy >= 1 << 4 or index >= 1 << 36:
        raise DataError(
            f"too many sources, files, copies or records for sample ids "
            f"(source {source}, file {file}, copy {copy}, record {index})"
        )
    return (source << 56) | (file << 40) | (copy << 36) | index


def sample_origin(sample: int) -> tuple[int, int, int]:
    """(source, file, copy) of a sample id (sample_id's inverse, less the record index)."""
    return sample >> 56, (sample >> 40) & 0xFFFF, (sample >> 36) & 0xF


FileKey = tuple[int, int]  # (source index, file index within the source)
Row = tuple[tuple[int, int, int], str, str, str, dict]  # (key, split, kind, where, sample) as read


class Tally:
    """Counts by reason, per source file of the record each is about (read from its sample id).
    A record that a source weight copies is counted once (its first copy): the copies are the
    same record and meet the same fate."""

    def __init__(self) -> None:
        self.files: dict[FileKey, Counter[str]] = {}

    def add(self, row: dict[str, Any], reason: str) -> bool:
        """Count `reason` for the row's record; False for a further copy (not counted)."""
        sample = row.get("sample_id")
        source, file, copy = sample_origin(sample) if sample is not None else (0, 0, 0)
        if copy:
            return False
        self.files.setdefault((source, file), Counter())[reason] += 1
        return True

    def totals(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for counts in self.files.values():
            out.update(counts)
        return out

    def __bool__(self) -> bool:
        return bool(self.files)


class Ledger:
    """Counts per reason, in all and per source file (the prepare summary, stats.json and the
    model card name the file a record was dropped from), examples of skipped records, and
    seen-hashes for dedup."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.by_file: dict[FileKey, Counter[str]] = {}
        self.errors: list[str] = []
        self.seen: set[int] = set()

    def first_seen(self, hashes: list[int]) -> list[bool]:
        fresh = []
        for value in hashes:
            fresh.append(value not in self.seen)
            self.seen.add(value)
        return fresh

    def add(self, by_file: dict[FileKey, dict[str, int]], errors: tuple[str, ...] | list[str] = ()) -> None:
        for key, counts in by_file.items():
            self.counts.update(counts)
            self.by_file.setdefault(key, Counter()).update(counts)
        room = MAX_ERRORS_KEPT - len(self.errors)
        self.errors.extend(list(errors)[: max(room, 0)])

    def summary(self) -> dict[str, Any]:
        """counts: in all; files: per (source, file); sources: per source, its files summed."""
        sources: dict[int, Counter[str]] = {}
        for (source, _), counts in self.by_file.items():
            sources.setdefault(source, Counter()).update(counts)
        return {
            "counts": dict(self.counts),
            "errors": list(self.errors),
            "files": {key: dict(counts) for key, counts in sorted(self.by_file.items())},
            "sources": {index: dict(counts) for index, counts in sorted(sources.items())},
        }


LedgerActor = ray.remote(num_cpus=0)(Ledger)  # one per pipeline run, on the driver's node


@dataclass(frozen=True)
class SourceOptions:
    """What a read task needs to know about each source, by source index."""

    format: str
    columns: dict[str, str]
    weight: float
    is_eval: bool
    max_samples: int | None
    eval_fraction: float  # of this train source held out; 0 when data.eval names eval files


@dataclass(frozen=True)
class EncoderSource:
    """Where a read task's Encoder loads its tokenizer from (as the driver loaded it)."""

    spec: Any  # the JobSpec
    model_dir: str
    template: ChatTemplate | None
    tokenizer_class: str | None = None  # the class AutoTokenizer chose in the driver


class SampleSource(Datasource):
    """Reads every source chunk and emits its records as token rows: canonical samples with
    split and sample id, encoded in the same task (a record is parsed once and never crosses the
    object store, or JSON, before it is tokenized)."""

    def __init__(
        self,
        chunks: list[Chunk],
        sources: list[SourceOptions],
        encoder: EncoderSource,
        ledger: Any,
        secrets: Any = None,
    ):
        super().__init__()
        self.chunks, self.sources, self.encoder, self.ledger = chunks, sources, encoder, ledger
        self.data: DataSpec = encoder.spec.data
        self.secrets = secrets  # rayft.env.share_secrets: storage credentials for remote sources

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        tasks = []
        for chunk in self.chunks:
            metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=(chunk.path,), exec_stats=None)
            tasks.append(
                ReadTask(
                    lambda c=chunk: self._read(c),
                    metadata,
                    schema=TOKENS_SCHEMA,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks

    def _read(self, chunk: Chunk) -> Iterator[pa.Table]:
        adopt_secrets(self.secrets)
        options, data = self.sources[chunk.source], self.data
        rows: list[Row] = []
        counts: Counter[str] = Counter()
        errors: list[str] = []
        taken = 0
        fmt = options.format
        for index, line, record in read_chunk(chunk):
            if options.max_samples is not None and taken >= options.max_samples:
                break
            taken += 1
            counts["records"] += 1
            try:
                if isinstance(record, DataError):
                    raise record
                if fmt == "auto" and isinstance(record, dict):
                    # One format per source, from its first record: later records then get
                    # precise errors ("missing field output") instead of "cannot tell the format".
                    fmt = detect_format(record, options.columns) or "auto"
                sample = to_sample(record, fmt, options.columns, data.system_prompt, chunk.path, line)
            except DataError as exc:
                if data.on_error == "raise":
                    raise
                counts["malformed"] += 1
                errors.append(str(exc))
                continue
            reason = drop_reason(sample, data.filters)
            if reason:
                counts[reason] += 1
                continue
            key = (chunk.source, chunk.file, index)
            split = "eval" if options.is_eval else _split_of(key, options.eval_fraction)
            kind = "text" if "text" in sample else "chat"
            rows.append((key, split, kind, f"{chunk.path}:{line}", sample))
            if len(rows) >= BLOCK_ROWS:
                yield self._block(rows, counts, errors, chunk)
                rows, counts, errors = [], Counter(), []
        yield self._block(rows, counts, errors, chunk)

    def _block(
        self,
        rows: list[Row],
        counts: Counter,
        errors: list[str],
        chunk: Chunk,
    ) -> pa.Table:
        options, filters = self.sources[chunk.source], self.data.filters
        if rows and (filters.dedup or filters.near_dedup):
            read = [row[4] for row in rows]
            keep: np.ndarray = np.ones(len(rows), dtype=bool)
            if filters.dedup:
                keep &= ray.get(self.ledger.first_seen.remote([content_hash(s) for s in read]))
                counts["duplicate"] += int((~keep).sum())
            if filters.near_dedup:
                fresh = np.array(
                    ray.get(self.ledger.first_seen.remote([content_hash(s, near=True) ^ 0x5A5A for s in read]))
                )
                counts["near_duplicate"] += int((keep & ~fresh).sum())
                keep &= fresh
            rows = [row for row, kept in zip(rows, keep) if kept]
        batch: list[dict[str, Any]] = []
        samples: list[dict[str, Any]] = []
        for key, split, kind, where, sample in rows:
            copies = 1 if split == "eval" else _copies(options.weight, key)
            for copy in range(copies):
                batch.append({"sample_id": sample_id(*key, copy), "split": split, "kind": kind, "where": where})
                samples.append(sample)  # the copies share it: encoding never changes a sample in place
        counts["kept"] += len(rows)
        ray.get(self.ledger.add.remote({(chunk.source, chunk.file): dict(counts)}, errors))
        return _encoder(self.encoder, self.ledger, self.secrets).encode(batch, samples)


def _unit_hash(*parts: int) -> float:
    """A deterministic number in [0, 1) from integers (stable across processes and runs)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _split_of(key: tuple[int, int, int], eval_fraction: float) -> str:
    return "eval" if eval_fraction and _unit_hash(7, *key) < eval_fraction else "train"


def _copies(weight: float, key: tuple[int, int, int]) -> int:
    """weight 2.0 -> every record twice; 0.5 -> a seeded half; 1.5 -> once, half of them twice."""
    whole, fraction = int(weight), weight - int(weight)
    return whole + (1 if fraction and _unit_hash(11, *key) < fraction else 0)


class Encoder:
    """Canonical samples -> token rows, a block of a read task at a time (one per worker
    process: _encoder).

    A record the template cannot render, or cannot render as inference would, is rejected with
    its file:line and counted by reason (`rejected:<reason>`); the pipeline stops before training
    on any rejection unless data.on_error is skip (rayft.data.prepare)."""

    def __init__(
        self,
        spec: Any,
        model_dir: str,
        template: ChatTemplate | None,
        ledger: Any,
        secrets: Any = None,
        tokenizer_class: str | None = None,
    ):
        adopt_secrets(secrets)  # a hub tokenizer may need HF_TOKEN
        tokenizer = load_tokenizer(spec, model_dir, resolved_class=tokenizer_class)
        self.records = RecordEncoder(spec.data, template, tokenizer)
        self.data, self.ledger = spec.data, ledger

    def encode(self, rows: list[dict[str, Any]], samples: list[dict[str, Any]]) -> pa.Table:
        """Token rows of `rows` (sample_id, split, kind, where) and their canonical samples."""
        counts = Tally()
        errors: list[str] = []
        encoded = self.records.encode(rows, samples, counts, errors)  # samples: as rendered (system turns placed)
        out: dict[str, list] = {name: [] for name in TOKENS_SCHEMA.names}
        limit, data = self.data.filters.max_tokens, self.data
        for index, sample in encoded:
            row = rows[index]
            if limit and len(sample.input_ids) > limit:
                counts.add(row, "too_long")
                continue
            fitted = truncate(sample, data.max_length, data.truncation)
            if fitted is None:
                counts.add(row, "over_max_length")
                continue
            if fitted is not sample:
                counts.add(row, "truncated")
            if fitted.n_trained == 0:
                counts.add(row, "no_trained_tokens")  # truncation cut every reply (the sample itself has some)
                continue
            out["split"].append(row["split"])
            out["input_ids"].append(fitted.input_ids)
            out["labels"].append(fitted.labels)
            out["seq_lengths"].append([len(fitted.input_ids)])
            out["sample_ids"].append([row["sample_id"]])
            out["n_tokens"].append(len(fitted.input_ids))
            out["n_trained"].append(fitted.n_trained)
            is_eval_chat = row["split"] == "eval" and row["kind"] == "chat"
            out["messages"].append(json.dumps(samples[index]["messages"], ensure_ascii=False) if is_eval_chat else None)
        if counts or errors:
            ray.get(self.ledger.add.remote({key: dict(c) for key, c in counts.files.items()}, errors))
        return pa.table(out, schema=TOKENS_SCHEMA)


class RecordEncoder:
    """Canonical records -> training sequences, rejecting (with file:line and a reason) each
    record that the template cannot render as inference would; no Ray in here."""

    def __init__(self, data: DataSpec, template: ChatTemplate | None, tokenizer: Any):
        self.data, self.template, self.tokenizer = data, template, tokenizer
        self.controls = () if data.allow_control_tokens else control_tokens(tokenizer)
        self.checker = FidelityCheck(template, tokenizer) if template is not None else None

    def encode(
        self, rows: list[dict[str, Any]], samples: list[dict[str, Any]], counts: Tally, errors: list[str]
    ) -> list[tuple[int, Encoded]]:
        """(row index, sequence) for every record that renders, tokenizes and passes the
        fidelity check; the others counted (per source file, from the row's sample id) and
        named. A conversation whose system turns data.system_turns folds or drops replaces its
        entry in `samples` (and is counted): what was rendered is what the check compares with
        apply_chat_template, and what evaluation prompts with."""
        items: list[tuple[int, Rendered]] = []
        texts: list[int] = []
        placed: dict[int, str] = {}  # row index -> what was done to its system turns
        for index, (row, sample) in enumerate(zip(rows, samples)):
            if row["kind"] == "text":
                texts.append(index)
                continue
            assert self.template is not None, "conversations are rendered with the job's chat template"
            try:
                sample, change = fit_system_turns(sample, self.template, self.data.system_turns)
                samples[index] = sample
                rendered = render_sample(
                    sample, self.template, self.data.train_on, controls=self.controls, split_turns=self.data.split_turns
                )
            except RecordError as exc:
                self._reject(row, exc, counts, errors)
                continue
            if change:
                placed[index] = change
            items.extend((index, item) for item in rendered)
        out: list[tuple[int, Encoded]] = []
        failed: set[int] = set()
        if items:
            for (index, item), result in zip(items, self._tokenize([item for _, item in items])):
                if isinstance(result, RecordError):
                    failed.add(index)
                    self._reject(rows[index], result, counts, errors)
                    continue
                problem = self.checker.problem(samples[index], item, result) if self.checker else None
                if problem is not None:
                    failed.add(index)
                    self._reject(rows[index], problem, counts, errors)
                    continue
                out.append((index, result))
        # A record is used whole or not at all (a split conversation loses no turn silently).
        out = [(index, sample) for index, sample in out if index not in failed]
        for index in sorted({index for index, _ in out} & set(placed)):
            counts.add(rows[index], placed[index])
        if texts:
            raw = encode_texts(
                [samples[i]["text"] for i in texts], self.tokenizer, allow_control_tokens=self.data.allow_control_tokens
            )
            out.extend(zip(texts, raw))
            out.sort(key=lambda pair: pair[0])
        return out

    def _tokenize(self, rendered: list[Rendered]) -> list[Encoded | RecordError]:
        try:
            return list(tokenize_rendered(rendered, self.tokenizer, self.controls))
        except RecordError:  # find the record(s): one at a time
            results: list[Encoded | RecordError] = []
            for item in rendered:
                try:
                    results.append(tokenize_rendered([item], self.tokenizer, self.controls)[0])
                except RecordError as exc:
                    results.append(exc)
            return results

    def _reject(self, row: dict[str, Any], exc: RecordError, counts: Tally, errors: list[str]) -> None:
        if counts.add(row, f"rejected:{exc.reason}") and len(errors) < MAX_ERRORS_KEPT:
            errors.append(f"{row.get('where') or 'record'}: {exc}")


_ENCODERS: dict[str, Encoder] = {}  # per worker process: tasks reuse the tokenizer it loaded


def _encoder(source: EncoderSource, ledger: Any, secrets: Any = None) -> Encoder:
    """This process's Encoder for `source`, loaded by its first read task (a tokenizer is
    megabytes: loaded from the model directory rather than shipped)."""
    key = json.dumps(
        [
            source.model_dir,
            source.template.source if source.template else None,
            source.spec.data.model_dump(mode="json"),
        ]
    )
    encoder = _ENCODERS.get(key)
    if encoder is None:
        if _ENCODERS:  # one job's encoder at a time in a worker process; the last one's garbage
            _ENCODERS.clear()  # was frozen with it (below): back within the collector's reach
            gc.unfreeze()
            gc.collect()
        encoder = _ENCODERS[key] = Encoder(
            source.spec, source.model_dir, source.template, ledger, secrets, source.tokenizer_class
        )
        # What this process holds from here on (Ray's, Ray Data's and the tokenizer's objects)
        # leaves the collector's reach: every full collection walked it again while records were
        # encoded (a tenth of a read task's CPU in a profile), as in the training workers.
        gc.freeze()
    encoder.ledger = ledger  # this run's ledger (a cached encoder may have served an earlier run)
    return encoder


def pack_rows(batch: pa.Table, max_length: int) -> pa.Table:
    """Packing of the train rows of a window (rayft.data.packing.pack); eval rows pass unchanged.
    The token lists are regrouped by Arrow offsets, never as Python lists (a token costs one int
    object each way: a tenth of preparation)."""
    batch = batch.combine_chunks()
    is_train = pc.equal(batch.column("split"), "train")
    rest, train = batch.filter(pc.invert(is_train)), batch.filter(is_train)
    rest = rest.select(TOKENS_SCHEMA.names).cast(TOKENS_SCHEMA)
    if not train.num_rows:
        return rest
    bins = pack(train.column("n_tokens").to_numpy().tolist(), max_length)
    members = train.take(pa.array([i for b in bins for i in sorted(b)], pa.int64())).combine_chunks()
    firsts = np.concatenate([[0], np.cumsum([len(b) for b in bins])]).astype(np.int64)  # each bin's first member

    def joined(name: str) -> pa.Array:
        """Each bin's members' lists of column `name`, concatenated in member order."""
        column = members.column(name).chunk(0)
        ends = np.concatenate([[0], np.cumsum(pc.list_value_length(column).to_numpy())])
        return pa.ListArray.from_arrays(pa.array(ends[firsts], pa.int32()), pc.list_flatten(column))

    def summed(name: str) -> pa.Array:
        values = members.column(name).to_numpy()
        return pa.array(np.add.reduceat(values, firsts[:-1]), pa.int32())

    n_tokens = members.column("n_tokens").chunk(0)
    packed = pa.table(
        {
            "split": pa.array(["train"] * len(bins), pa.string()),
            "input_ids": joined("input_ids"),
            "labels": joined("labels"),
            "seq_lengths": pa.ListArray.from_arrays(pa.array(firsts, pa.int32()), n_tokens),
            "sample_ids": joined("sample_ids"),
            "n_tokens": summed("n_tokens"),
            "n_trained": summed("n_trained"),
            "messages": pa.nulls(len(bins), pa.string()),
        },
        schema=TOKENS_SCHEMA,
    )
    return pa.concat_tables([rest, packed])
