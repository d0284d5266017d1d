"""Errors a user sees. Each one says where the problem is (a spec field, a file and line) and
what to do, so the CLI can print it without a traceback."""

from __future__ import annotations

from typing import Any


class RayftError(Exception):
    """Base class: the message is complete and meant for the user as is."""


class SpecError(RayftError):
    """A job spec that cannot be loaded or is inconsistent. Names the field and the file."""

    def __init__(self, message: str, *, field: str | None = None, origin: str | None = None):
        self.field = field
        self.origin = origin
        where = ": ".join(part for part in (origin, field) if part)
        super().__init__(f"{where}: {message}" if where else message)


class DataError(RayftError):
    """A data record or file that cannot be used. Names file:line and the field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None):
        self.file = file
        self.line = line
        self.field = field
        where = f"{file}:{line}" if file and line is not None else (file or "")
        prefix = ": ".join(part for part in (where, f'field "{field}"' if field else "") if part)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ModelError(RayftError):
    """A model or tokenizer that cannot be found or loaded."""


class RunNotFound(RayftError):
    """A path that holds none of a run's files."""


class ClusterError(RayftError):
    """The cluster cannot run the job as specified (missing resources, unreachable address)."""


def user_error_in(exc: BaseException) -> RayftError | None:
    """The RayftError inside Ray's wrappers (RayTaskError, UserCodeException, worker failures).

    Ray re-raises a task's DataError as a class deriving from both RayTaskError and DataError,
    whose message carries the remote traceback; the original (its `cause`) is what a user should
    read, so wrappers are unwrapped before a rayft error is accepted."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    wrapped: RayftError | None = None
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, RayftError):
            if type(current).__module__.startswith("rayft."):
                return _without_ray_annotations(current)
            wrapped = wrapped or current
        stack.extend(
            [
                current.__context__,
                current.__cause__,
                getattr(current, "controller_failure", None),
                getattr(current, "cause", None),
            ]
        )
        stack.extend((getattr(current, "worker_failures", None) or {}).values())
    if wrapped is not None:  # only Ray's subclass was found: keep its first line, not the traceback
        return _without_ray_annotations(DataError(str(wrapped).strip().splitlines()[-1]))
    text = str(exc)
    for marker in ("DataError: ", "SpecError: "):  # last resort: the message survived as text
        if marker in text:
            message = text.rsplit(marker, 1)[1].strip().splitlines()[0]
            return DataError(message)
    return None


def _without_ray_annotations(error: RayftError) -> RayftError:
    """Ray Data appends retry advice to a failed task's exception message ("Failed to apply UDF
    transform after 1/1 attempts ..."); it does not apply to bad data, so it is cut off."""
    text = str(error)
    cut = text.find("\nFailed to ")
    return type(error)(text[:cut]) if cut >= 0 else error
