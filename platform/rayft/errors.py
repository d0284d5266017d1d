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

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.file = file
        self.line = line
        self.field = field
        where = f"{file}:{line}" if file and line is not None else (file or "")
        prefix = ": ".join(part for part in (where, f'field "{field}"' if field else "") if part)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ModelError(RayftError):
    """A model or tokenizer that cannot be found or loaded."""


class ClusterError(RayftError):
    """The cluster cannot run the job as specified (missing resources, unreachable address)."""


def user_error_in(exc: BaseException) -> RayftError | None:
    """The RayftError inside Ray's wrappers (RayTaskError, UserCodeException, causes)."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, RayftError):
            return current
        stack.extend([getattr(current, "cause", None), current.__cause__, current.__context__,
                      getattr(current, "controller_failure", None)])
        stack.extend((getattr(current, "worker_failures", None) or {}).values())
        if hasattr(current, "as_instanceof_cause"):
            try:
                stack.append(current.as_instanceof_cause())
            except Exception:
                pass
    text = str(exc)
    for marker in ("DataError: ", "SpecError: "):  # last resort: the message survived as text
        if marker in text:
            message = text.rsplit(marker, 1)[1].strip().splitlines()[0]
            return DataError(message)
    return None
