"""Reading an offline W&B run back from its `run-<id>.wandb` transaction log.

wandb 0.31 reads these files in its Go core only; the Python package still ships the protobuf
messages (`wandb.proto.wandb_internal_pb2.Record`). The file is a 7-byte W&B header followed by
the LevelDB log format: 32 KiB blocks of chunks, each with a 7-byte header (CRC32C, length,
type: full, first, middle, last)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7  # ":W&B" + 0xBEE1 + version
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    position, pending = HEADER, b""
    while position + 7 <= len(data):
        room = BLOCK - position % BLOCK
        if room < 7:  # a block's tail too short for a chunk header is padding
            position += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            position += room - 7
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {position}")


def read_run(path: Path) -> dict[str, Any]:
    """The run's identity, config, history rows and summary, decoded with wandb's protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "group": None, "name": None, "exit_code": None}
    for raw in raw_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["group"], run["name"], run["id"] = record.run.run_group, record.run.display_name, record.run.run_id
            for item in record.run.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            run["history"].append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    for key in list(run["config"]):  # wandb stores config values as {"value": ...}
        if isinstance(run["config"][key], dict) and set(run["config"][key]) <= {"value", "desc"}:
            run["config"][key] = run["config"][key].get("value")
    return run


def find_runs(directory: Path) -> list[Path]:
    return sorted(directory.rglob("run-*.wandb"))
