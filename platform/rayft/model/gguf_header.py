"""The key-value metadata at the head of a GGUF file, read without parsing what it skips.

`gguf.GGUFReader` builds a numpy view of every field, the tokenizer's vocabulary included
(49,152 strings for SmolLM2): 5 s to learn a license. Here the header is walked with seeks and
only the wanted keys' values are decoded (milliseconds). Format: github.com/ggml-org/ggml,
docs/gguf.md: magic, version, tensor count, key-value count, then each key as a length-prefixed
UTF-8 string, a uint32 value type and the value.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, BinaryIO

# value type -> struct format of one item (8: string, 9: array are read apart)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


def read_metadata(path: str, wanted: Callable[[str], bool]) -> dict[str, Any]:
    """{key: value} of the header's keys for which `wanted(key)` is true. Arrays come back as
    lists. Raises ValueError on a file that is not GGUF, or ends inside its header."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version, _tensors, count = _unpack(handle, "<IQQ")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 and later are)")
        found = {}
        for _ in range(count):
            key = _string(handle)
            (kind,) = _unpack(handle, "<I")
            if wanted(key):
                found[key] = _value(handle, kind)
            else:
                _skip(handle, kind)
        return found


def _unpack(handle: BinaryIO, fmt: str) -> tuple[Any, ...]:
    size = struct.calcsize(fmt)
    data = handle.read(size)
    if len(data) != size:
        raise ValueError("the GGUF header ends early")
    return struct.unpack(fmt, data)


def _string(handle: BinaryIO) -> str:
    (length,) = _unpack(handle, "<Q")
    data = handle.read(length)
    if len(data) != length:
        raise ValueError("the GGUF header ends early")
    return data.decode("utf-8", errors="replace")


def _value(handle: BinaryIO, kind: int) -> Any:
    if kind == STRING:
        return _string(handle)
    if kind == ARRAY:
        item, count = _unpack(handle, "<IQ")
        return [_value(handle, item) for _ in range(count)]
    if kind not in SCALARS:
        raise ValueError(f"unknown GGUF value type {kind}")
    return _unpack(handle, SCALARS[kind])[0]


def _skip(handle: BinaryIO, kind: int) -> None:
    if kind == STRING:
        (length,) = _unpack(handle, "<Q")
        handle.seek(length, 1)
    elif kind == ARRAY:
        item, count = _unpack(handle, "<IQ")
        if item in SCALARS:
            handle.seek(count * struct.calcsize(SCALARS[item]), 1)
        else:  # strings (a vocabulary) or nested arrays: one length at a time
            for _ in range(count):
                _skip(handle, item)
    elif kind in SCALARS:
        handle.seek(struct.calcsize(SCALARS[kind]), 1)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")
