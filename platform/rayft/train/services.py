"""The driver-side services of a run, started together and ended together: the progress board
that rank 0 posts to (and the printer that polls it), and the W&B tracker (the driver's own, or a
sweep's, which outlives its trials)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.train import UserCallback

from rayft.env import share_secrets
from rayft.nodes import on_this_node
from rayft.train.progress import ProgressBoardActor, ProgressPrinter
from rayft.train.result import Attempt
from rayft.train.run import RunPlan
from rayft.train.tracking import run_settings, start_tracker, stop_tracker, wandb_archive


class FailureNotes(UserCallback):
    def __init__(self, board: Any, max_failures: int):
        self.board, self.max_failures, self.failures = board, max_failures, 0

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        what = "; ".join(f"rank {rank}: {_first_line(error)}" for rank, error in sorted(worker_exceptions.items()))
        budget = (
            "without limit" if self.max_failures < 0 else f"{self.failures} of run.max_failures={self.max_failures}"
        )
        if self.max_failures >= 0 and self.failures > self.max_failures:
            self.board.note.remote(f"worker failure ({what}); no restarts left (run.max_failures={self.max_failures})")
        else:
            self.board.note.remote(f"worker failure ({what}); restarting from the last checkpoint ({budget})")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1][:200]}" if lines else type(error).__name__


@dataclass(frozen=True)
class WorkerServices:
    """What workers get of the services: the actors they talk to."""

    board: Any
    tracker: Any | None
    secrets: Any | None  # rayft.env.share_secrets: None where workers inherit the driver's environment


class RunServices:
    """`with RunServices(plan, log) as services:` around `trainer.fit()`.

    W&B starts while the workers do (its location is printed when ready); on the way out the
    tracker's run is finished with the outcome (exit code 1 if the fit raised), unless a sweep
    owns the tracker: the sweep finishes its trials' runs, since it knows whether Tune stopped
    a trial (an early stop is no failure) or it failed."""

    def __init__(self, plan: RunPlan, log: Callable[[str], None], *, tracker: Any | None = None):
        self.plan, self.log = plan, log
        self.owned = tracker is None
        self.tracker = start_tracker(plan.spec, tracker)
        self.secrets = share_secrets(plan.spec)
        self.wandb: str | None = None
        self.attempts: list[Attempt] = []

    def __enter__(self) -> RunServices:
        self.board = ProgressBoardActor.options(**on_this_node()).remote()
        notices = {}
        if self.tracker is not None:
            started = self.tracker.start.remote(
                self.plan.tracker_key, run_settings(self.plan), self.secrets, wandb_archive(self.plan)
            )
            notices[started] = "wandb"
        self.printer = ProgressPrinter(self.board, self.log, waiting=self.plan.waiting, notices=notices).__enter__()
        return self

    @property
    def for_workers(self) -> WorkerServices:
        return WorkerServices(self.board, self.tracker, self.secrets)

    def failure_notes(self) -> Any:
        """A Ray Train callback (it runs in the controller) that says on the terminal when the
        worker group restarts, and why."""
        return FailureNotes(self.board, self.plan.spec.run.max_failures)

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self.printer.__exit__(kind, error, traceback)
        self.attempts = [
            Attempt(a["workers"], a["started"], a["first_step"], a["last"], a["resumed_from_step"])
            for a in ray.get(self.board.history.remote())
        ]
        ray.kill(self.board)
        if self.tracker is None or (error is not None and not self.owned):
            return
        self.wandb = ray.get(self.tracker.finish.remote(self.plan.tracker_key, 1 if error is not None else 0))
        if self.owned:
            stop_tracker(self.tracker)
