"""Loading a job spec: a YAML file (or a dict), profile overlays (`-p gpu.yaml`) and dotted
overrides (`train.learning_rate=1e-4`) -> a validated JobSpec. Any problem raises a SpecError
that names the field and the file:line it came from, with a suggestion for a misspelt key."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from rayft.errors import SpecError
from rayft.spec.schema import JobSpec
from rayft.spec.yamlfile import Origins, apply_override, deep_merge, read_yaml


def load_spec(
    path: str | Path | None = None,
    *,
    profiles: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    data: dict[str, Any] | None = None,
) -> JobSpec:
    """YAML file (or a dict) + profile overlays + `a.b=c` overrides -> a validated JobSpec."""
    origins = Origins()
    if path is not None:
        merged = read_yaml(Path(path), origins)
        if not isinstance(merged, dict):
            raise SpecError("a job spec must be a mapping of sections (model, data, train, ...)", origin=str(path))
        merged.setdefault("run", {})
        if isinstance(merged["run"], dict):
            merged["run"].setdefault("name", Path(path).stem)
    else:
        merged = dict(data or {})
    for profile in profiles:
        overlay = read_yaml(Path(profile), origins)
        if not isinstance(overlay, dict):
            raise SpecError("a profile must be a mapping of sections", origin=str(profile))
        merged = deep_merge(merged, overlay)
    for override in overrides:
        merged = apply_override(merged, override, origins)
    return validate_spec(merged, origins)


def validate_spec(data: dict[str, Any], origins: Origins | None = None) -> JobSpec:
    origins = origins or Origins()
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_describe(exc, origins)) from None


def _suggest(loc: list[str]) -> str:
    """' (did you mean ...?)' for a misspelt key, from the fields of the section it sits in."""
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        if part.isdigit():  # a list index: the element type was found at the list's own key
            continue
        annotation = getattr(model.model_fields.get(part), "annotation", None)
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        found = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if found is None:
            return ""
        model = found
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(model.model_fields)})"


def _describe(exc: ValidationError, origins: Origins) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        field = ".".join(loc) or "(spec)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown key {loc[-1]!r}" + _suggest(loc)
        elif error["type"] == "missing":
            message = "required field is missing"
        where = origins.where(loc)
        lines.append(f"{where + ': ' if where else ''}{field}: {message}")
    return "invalid job spec\n  " + "\n  ".join(lines)
