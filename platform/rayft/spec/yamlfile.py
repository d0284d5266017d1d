"""Reading spec files: YAML with the file:line of every key, overlays and dotted overrides.
Pure data (no pydantic): rayft.spec.load turns the result into a JobSpec."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from rayft.errors import SpecError

# A spec is a few hundred nodes; YAML aliases can make a small file expand to billions (the
# "billion laughs"), which would keep every later step busy for minutes. Refused above this.
MAX_EXPANDED_NODES = 100_000


class SpecLoader(yaml.SafeLoader):
    """Safe YAML (no python tags), with two fixes for specs: `1e-5` (no dot) is a float, which
    YAML 1.1 reads as a string, and a key given twice in one mapping is an error naming both
    lines (YAML itself lets the later one win, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` merges, by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a mapping key must be a plain value, not {type(key).__name__}", key_node.start_mark
                ) from None
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice, on lines {first} and {key_node.start_mark.line + 1}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*(?:[eE][-+]?\d+)?$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, origin: str = "command line") -> Any:
    """One YAML document (an override's value, say) with the spec file's rules and limits."""
    loader = SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, origin)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, origin) from None
    finally:
        loader.dispose()


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
    """A spec or profile file: parsed once, with the file:line of every key in `origins`."""
    if not path.is_file():
        raise SpecError(f"no such file: {path}" if not path.exists() else f"{path} is not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a BOM (Windows editors write one) is not part of the spec
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(
            f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8", origin=f"{path}:{line}"
        ) from None
    loader = SpecLoader(text)
    try:
        node = loader.get_single_node()
        origins.set((), str(path))
        if node is None:
            return {}
        _check_size(node, str(path))
        _record_lines(node, (), path, origins)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, str(path)) from None
    finally:
        loader.dispose()


def _yaml_error(exc: yaml.YAMLError, origin: str) -> SpecError:
    mark = getattr(exc, "problem_mark", None)
    where = f"{origin}:{mark.line + 1}" if mark is not None and origin != "command line" else origin
    problem = getattr(exc, "problem", None) or str(exc)
    if "could not determine a constructor for the tag" in problem:
        problem = f"{problem.split('tag ', 1)[-1]} is not allowed: a spec holds plain YAML values only"
    if isinstance(exc, yaml.constructor.ConstructorError) and not problem.startswith("found"):
        return SpecError(problem, origin=where)  # ours: a duplicated key, a list as a key
    return SpecError(f"not valid YAML: {problem}", origin=where)


def _check_size(node: yaml.Node, origin: str) -> None:
    """Refuse a document whose aliases expand it past MAX_EXPANDED_NODES (counted without
    expanding: each node's size is memoized, so this is linear in the file)."""
    sizes: dict[int, int] = {}

    def size(current: yaml.Node, depth: int = 0) -> int:
        if id(current) in sizes:
            return sizes[id(current)]
        if depth > 100:
            raise SpecError("nested more than 100 levels deep", origin=origin)
        sizes[id(current)] = 1  # a cycle (a recursive alias) counts once
        if isinstance(current, yaml.MappingNode):
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in current.value)
        elif isinstance(current, yaml.SequenceNode):
            total = 1 + sum(size(v, depth + 1) for v in current.value)
        else:
            total = 1
        if total > MAX_EXPANDED_NODES:
            raise SpecError(
                f"the document expands to more than {MAX_EXPANDED_NODES:,} values through YAML "
                "aliases (&anchor / *alias); a job spec needs a few hundred",
                origin=origin,
            )
        sizes[id(current)] = total
        return total

    size(node)


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
        value = parse_yaml(raw, origin=f"override {key.strip()}") if raw.strip() else None
    except SpecError as exc:
        if "expands to more than" in str(exc) or "levels deep" in str(exc):
            raise
        value = raw  # not YAML: the text itself (a path with a colon, say)
    data = deep_merge(data, {})
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise SpecError(f"cannot set {key}: {'.'.join(parts[:depth])} is not a section", origin="command line")
        child = node.get(part)
        if child is None:  # a section the override creates: an error in it is the override's
            origins.set(tuple(parts[: depth + 1]), f"override {key}")
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
