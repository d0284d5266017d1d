"""What a machine measured or resolved once, kept for every later process on it (a rerun, a
restart, a sweep trial, a data worker): small JSON files under ~/.cache/rayft, the home of all of
rayft's per-machine caches. Any process may write one; each write replaces the file whole, so a
reader never sees half of it. A home that cannot be written just means paying again next time."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def home() -> Path:
    """~/.cache/rayft, resolved at each use: what HOME says now (a test stands in for another node
    by changing it)."""
    return Path(os.path.expanduser("~/.cache/rayft"))


class MachineCache:
    """`name` in `directory` (default: home())."""

    def __init__(self, name: str, directory: Path | None = None):
        self.name, self.directory = name, directory

    @property
    def path(self) -> Path:
        return (self.directory or home()) / self.name

    def get(self, key: str) -> Any:
        return self.read().get(key)

    def read(self) -> dict[str, Any]:
        try:
            values = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return values if isinstance(values, dict) else {}

    def put(self, key: str, value: Any) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging = self.path.with_suffix(f".{os.getpid()}.tmp")
            staging.write_text(json.dumps({**self.read(), key: value}, indent=1))
            staging.replace(self.path)
        except OSError:
            pass
