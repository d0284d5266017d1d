"""Reading spec files: YAML with the file:line of every key, overlays and dotted overrides.
Pure data (no pydantic): rayft.spec.load turns the result into a JobSpec."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from rayft.errors import SpecError


class SpecLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-5` (no dot) as a string; specs are full of learning rates like that."""


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*(?:[eE][-+]?\d+)?$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=SpecLoader)


class Origins:
    """Where each dotted key of the merged spec was last set: 'file:line' or 'override'."""

    def __init__(self) -> None:
        self._where: dict[tuple[str, ...], str] = {}

    def set(self, path: tuple[str, ...], where: str) -> None:
        self._where[path] = where

    def where(self, loc: list[str]) -> str:
        path = tuple(loc)
        while path:  # the nearest key that we know, e.g. the section of a missing field
            if path in self._where:
                return self._where[path]
            path = path[:-1]
        return self._where.get((), "")


def read_yaml(path: Path, origins: Origins) -> Any:
    if not path.is_file():
        raise SpecError(f"no such file: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=SpecLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(f"not valid YAML: {getattr(exc, 'problem', exc)}", origin=where) from None
    origins.set((), str(path))
    if node is None:
        return {}
    _record_lines(node, (), path, origins)
    return parse_yaml(text)


def _record_lines(node: yaml.Node, prefix: tuple[str, ...], path: Path, origins: Origins) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*prefix, str(key.value))
            origins.set(child, f"{path}:{key.start_mark.line + 1}")
            _record_lines(value, child, path, origins)
    elif isinstance(node, yaml.SequenceNode):
        for index, value in enumerate(node.value):
            child = (*prefix, str(index))
            origins.set(child, f"{path}:{value.start_mark.line + 1}")
            _record_lines(value, child, path, origins)


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Overlay wins; mappings merge key by key, anything else (lists included) is replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(data: dict[str, Any], override: str, origins: Origins) -> dict[str, Any]:
    """`train.learning_rate=1e-4` or `data.train.0.path=x.jsonl`; the value is parsed as YAML."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"override {override!r} is not of the form key.path=value", origin="command line")
    parts = key.strip().split(".")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    data = deep_merge(data, {})
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise SpecError(f"cannot set {key}: {'.'.join(parts[:depth])} is not a section", origin="command line")
        child = node.get(part)
        if child is not None and not isinstance(child, (dict, list)):
            raise SpecError(
                f"cannot set {key}: {'.'.join(parts[: depth + 1])} is a value ({child!r}), not a section",
                origin="command line",
            )
        node[part] = child = dict(child) if isinstance(child, dict) else (child if isinstance(child, list) else {})
        node = child
    last = parts[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise SpecError(f"cannot set {key}", origin="command line")
    origins.set(tuple(parts), f"override {key}")
    return data


def differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, old value, new value) for every leaf that differs between two spec dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in sorted(set(old) | set(new), key=str):
            out += differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if old == new else [(path, old, new)]
