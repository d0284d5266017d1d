"""Progress of a run as the user sees it: rank 0 posts to a tiny actor, and the driver prints
from it, so worker logs can stay off the terminal (and out of `ray job logs`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import ray


class ProgressBoard:
    """The latest progress fields, and the run's attempts: each start of the worker group (the
    first, and every restart after a failure) with when it began, when its first step came and
    when it was last heard from; the summary's start-up and recovery times come from these."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.version = 0
        self.attempts: list[dict[str, Any]] = []
        self.notes: list[str] = []  # said once each: restarts and why

    def update(self, fields: dict[str, Any]) -> None:
        now = time.time()
        if fields.get("phase") == "loading model":
            self.attempts.append(
                {
                    "started": now,
                    "first_step": None,
                    "last": now,
                    "workers": fields.get("workers"),
                    "resumed_from_step": None,
                }
            )
        elif self.attempts:
            attempt = self.attempts[-1]
            attempt["last"] = now
            if fields.get("phase") == "training" and attempt["first_step"] is None:
                attempt["first_step"] = now
                attempt["resumed_from_step"] = fields.get("resumed_from_step")
        self.state.update(fields)
        self.version += 1

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.version += 1

    def read(self) -> tuple[int, dict[str, Any]]:
        return self.version, {**self.state, "notes": list(self.notes)}

    def history(self) -> list[dict[str, Any]]:
        return [dict(attempt) for attempt in self.attempts]


ProgressBoardActor = ray.remote(num_cpus=0)(ProgressBoard)


def describe(state: dict[str, Any]) -> str:
    """One line: phase, step/total, losses, throughput, ETA."""
    workers = f" on {state['workers']} worker(s)" if state.get("workers") else ""
    if state.get("phase") != "training" or "max_steps" not in state:
        return f"train: {state.get('phase', 'starting workers')}{workers}..."
    parts = [f"step {state.get('step', 0)}/{state['max_steps']}"]
    if "epoch" in state:
        parts.append(f"epoch {state['epoch']:.2f}")
    if "loss" in state:
        parts.append(f"loss {state['loss']:.4f}")
    if "eval_loss" in state:
        parts.append(f"eval_loss {state['eval_loss']:.4f}")
    if "tokens_per_second" in state:
        parts.append(f"{state['tokens_per_second']:.0f} tok/s")
    if "eta_seconds" in state:
        parts.append(f"ETA {_duration(state['eta_seconds'])}")
    if state.get("resumed_from_step"):
        parts.append(f"(resumed from step {state['resumed_from_step']}{workers})")
    return "train: " + ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressPrinter:
    """Polls the board and prints a line whenever something changed (and at most every
    `every` seconds); quiet while nothing happens."""

    def __init__(
        self,
        board: Any,
        log: Callable[[str], None],
        every: float = 1.0,
        waiting: str | None = None,
        notices: dict[Any, str] | None = None,
    ):
        """`notices`: object refs whose values are printed, after their label, once ready
        (things started alongside training, such as the W&B run, that training need not wait for)."""
        self.board, self.log, self.every, self.waiting = board, log, every, waiting
        self.notices = dict(notices or {})
        self.done = threading.Event()
        self.first_step_at: float | None = None
        self.notes_seen = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressPrinter:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        self._print_ready_notices()  # a run shorter than one poll still says where it was tracked

    def _print_ready_notices(self) -> None:
        if not self.notices:
            return
        ready, _ = ray.wait(list(self.notices), num_returns=len(self.notices), timeout=0)
        for ref in ready:
            label = self.notices.pop(ref)
            try:
                self.log(f"{label}: {ray.get(ref)}")
            except Exception as exc:  # noqa: BLE001 - a tracker failure must not stop training
                self.log(f"{label}: not tracking this run: {str(exc).strip().splitlines()[-1]}")

    def _run(self) -> None:
        seen, last_line, last_wait = -1, "", 0.0
        while not self.done.wait(self.every):
            self._print_ready_notices()
            try:
                version, state = ray.get(self.board.read.remote(), timeout=5)
            except Exception:
                continue
            if state.get("phase") == "training" and self.first_step_at is None:
                self.first_step_at = time.time()
            notes = state.pop("notes", [])
            for note in notes[self.notes_seen :]:
                self.log(f"train: {note}")
            self.notes_seen = len(notes)
            if version != seen:
                seen, line = version, describe(state)
                if line != last_line:
                    self.log(line)
                    last_line = line
            elif version == 0 and self.waiting and time.time() - last_wait > 30:
                self.log(f"train: {self.waiting}")  # e.g. "waiting for the autoscaler to add 2 more CPU"
                last_wait = time.time()
