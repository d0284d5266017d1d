"""Where records come from: local or remote .jsonl/.json/.parquet/.csv files, globs and
directories, and hub datasets (`hf:org/name`). Every record comes with the line (or row) it
sits on, so any error can point at it.

Readers yield (index, line, record): the index (1-based, per file) identifies the record, the
line says where it is for error messages (a minified JSON array has all records on line 1).

Large JSONL files are cut into byte ranges at line boundaries; each range is read by its own
task and streamed, so a file larger than memory is never held whole.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rayft.errors import DataError, SpecError
from rayft.storage import filesystem, is_remote, scheme

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz")
BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark
HUB_PREFIX = "hf:"
CHUNK_BYTES = 64 << 20
MIN_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Chunk:
    """A piece of one source that one read task handles."""

    source: int  # index of the source in data.train + data.eval
    path: str
    file: int = 0  # index of the file among the files the source expands to
    start: int = 0  # byte offset (jsonl), else 0
    end: int = -1  # byte offset, -1 = end of file
    first_line: int = 1
    split: str = "train"  # the split of a hub dataset


def expand(path: str) -> list[str]:
    """A source path -> the files it names (sorted; local ones absolute, so that read tasks on
    any node, or a job started elsewhere, read the same files), or [path] for a hub dataset."""
    if path.startswith(HUB_PREFIX):
        return [path]
    if is_remote(path):
        return _expand_remote(path)
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if f.endswith(SUFFIXES))
    elif os.path.isdir(path):
        files = sorted(
            os.path.join(root, name) for root, _, names in os.walk(path) for name in names if name.endswith(SUFFIXES)
        )
    elif os.path.isfile(path):
        files = [path]
    else:
        raise SpecError(f"no such file or directory: {path}", field="data")
    if not files:
        raise SpecError(f"{path} matches no data files ({', '.join(SUFFIXES)})", field="data")
    return [os.path.abspath(file) for file in files]


def _expand_remote(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        raise SpecError(f"no such object: {uri}", field="data")
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(
        f"{scheme(uri)}://{e.path}" for e in entries if e.type == pafs.FileType.File and e.path.endswith(SUFFIXES)
    )


def fingerprint(path: str) -> str:
    """What identifies a file's content cheaply: size and modification time."""
    if path.startswith(HUB_PREFIX):
        return path
    if is_remote(path):
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(path)
        info = fs.get_file_info(root)
        return f"{path}:{info.size}:{info.mtime_ns}"
    stat = os.stat(path)
    return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def chunk_size(paths: list[str], cpus: int) -> int:
    """Bytes per read task: the local JSONL files split into about one task per CPU (each task
    reads and tokenizes its chunk, so the chunks are the pipeline's parallelism), no chunk under
    MIN_CHUNK_BYTES (a small file stays one task) or over CHUNK_BYTES. One per CPU, not two:
    each task's first block waits for its worker's imports and tokenizer, and 50,000 Alpaca
    records on 2 CPUs were prepared 1.1-2.7 s sooner in 2 tasks than in 4 (3 pairs of 19-25 s)."""
    total = sum(os.path.getsize(p) for p in paths if p.endswith(".jsonl") and not is_remote(p) and os.path.isfile(p))
    return max(MIN_CHUNK_BYTES, min(CHUNK_BYTES, total // max(cpus, 1) + 1))


def plan_chunks(
    source: int, path: str, file: int = 0, split: str = "train", chunk_bytes: int = CHUNK_BYTES
) -> list[Chunk]:
    """Split a local JSONL file into line-aligned byte ranges with their first line numbers."""
    if not path.endswith(".jsonl") or is_remote(path) or os.path.getsize(path) <= chunk_bytes:
        return [Chunk(source, path, file, split=split)]
    chunks, start, line = [], 0, 1
    with open(path, "rb") as handle:
        while True:
            handle.seek(start + chunk_bytes)
            handle.readline()  # finish the line the cut fell into
            end = handle.tell()
            handle.seek(start)
            lines_inside = handle.read(end - start).count(b"\n")
            at_eof = end >= os.path.getsize(path)
            chunks.append(Chunk(source, path, file, start, -1 if at_eof else end, line, split))
            if at_eof:
                return chunks
            start, line = end, line + lines_inside


def read_chunk(chunk: Chunk) -> Iterator[tuple[int, int, Any]]:
    """(index, line, record) for each record; one that cannot be parsed comes as a DataError."""
    path = chunk.path
    if path.startswith(HUB_PREFIX):
        yield from _read_hub(path[len(HUB_PREFIX) :], chunk.split)
    elif path.endswith((".jsonl", ".jsonl.gz")):
        yield from _read_jsonl(chunk)
    elif path.endswith(".json"):
        yield from _read_json_array(path)
    elif path.endswith(".parquet"):
        yield from _read_parquet(path)
    elif path.endswith(".csv"):
        yield from _read_csv(path)
    else:
        raise DataError(f"unsupported file type; expected one of {', '.join(SUFFIXES)}", file=path)


def _open(path: str) -> io.BufferedIOBase:
    if is_remote(path):
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(path)
        return fs.open_input_stream(root, compression="gzip" if path.endswith(".gz") else None)
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


def _read_jsonl(chunk: Chunk) -> Iterator[tuple[int, int, Any]]:
    with _open(chunk.path) as handle:
        if chunk.start:
            handle.seek(chunk.start)
        position, line = chunk.start, chunk.first_line
        try:
            for raw in handle:
                if chunk.end >= 0 and position >= chunk.end:
                    return
                position += len(raw)
                if line == 1:
                    raw = raw.removeprefix(BOM)  # Windows editors start a file with one
                if raw.strip():
                    yield line, line, _parse_json_line(raw, chunk.path, line)
                line += 1
        except (OSError, EOFError) as exc:  # a .gz that is not gzip, or is cut short
            raise DataError(f"cannot read the file: {exc}", file=chunk.path, line=line) from None


def _parse_json_line(raw: bytes, path: str, line: int) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return DataError(
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})", file=path, line=line
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return DataError(f"not valid JSON: {exc.msg} (column {exc.colno})", file=path, line=line)


def _read_json_array(path: str) -> Iterator[tuple[int, int, Any]]:
    """A JSON file holding a list of records; each record's line is where it starts."""
    with _open(path) as handle:
        raw = handle.read().removeprefix(BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})", file=path, line=line) from None
    decoder = json.JSONDecoder()
    index = _skip_space(text, 0)
    if index >= len(text) or text[index] != "[":
        # Not a list: one record, or JSON-lines content in a .json file.
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            yield from _read_jsonl(Chunk(0, path))
            return
        if isinstance(value, dict) and any(isinstance(v, list) for v in value.values()) and "messages" not in value:
            raise DataError("expected a list of records (or JSON lines), got an object of lists", file=path, line=1)
        yield 1, 1, value
        return
    index, line, last, number = _skip_space(text, index + 1), 1, 0, 0
    while index < len(text) and text[index] != "]":
        line += text.count("\n", last, index)
        last = index
        try:
            record, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as exc:
            bad_line = text.count("\n", 0, exc.pos) + 1
            raise DataError(f"not valid JSON: {exc.msg}", file=path, line=bad_line) from None
        number += 1
        yield number, line, record
        index = _skip_space(text, end)
        if index < len(text) and text[index] == ",":
            index = _skip_space(text, index + 1)


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _read_parquet(path: str) -> Iterator[tuple[int, int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = filesystem(path)
    row = 1
    try:
        for batch in pq.ParquetFile(root, filesystem=fs).iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                yield row, row, record
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"not a readable parquet file: {exc}", file=path, line=row if row > 1 else None) from None


def _read_csv(path: str) -> Iterator[tuple[int, int, Any]]:
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark
    with _open(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")  # type: ignore[type-var]
        reader = csv.DictReader(text)
        try:
            for number, record in enumerate(reader, start=1):
                yield number, reader.line_num, record
        except UnicodeDecodeError as exc:  # decoded in blocks: find the bad byte's own line
            raise _bad_utf8(path, exc.reason) from None


def _bad_utf8(path: str, reason: str) -> DataError:
    with _open(path) as raw:
        data = raw.read().removeprefix(BOM)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return DataError(f"not valid UTF-8 (byte 0x{data[exc.start]:02x})", file=path, line=line)
    return DataError(f"not valid UTF-8: {reason}", file=path)


def _read_hub(name: str, split: str) -> Iterator[tuple[int, int, Any]]:
    """A hub dataset (or a local dataset directory) through `datasets`, streamed."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as exc:  # datasets raises many types; the user needs the name and reason
        raise DataError(f"cannot load dataset: {exc}", file=f"hf:{name}") from None
    for row, record in enumerate(dataset, start=1):
        yield row, row, record
