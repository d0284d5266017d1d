"""The driver-side services of a run, started together and ended together: the progress board
that rank 0 posts to (and the printer that polls it), and the W&B tracker (the driver's own, or a
sweep's, which outlives its trials)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from rayft.env import share_secrets
from rayft.train.progress import ProgressBoardActor, ProgressPrinter
from rayft.train.run import RunPlan
from rayft.train.tracking import run_settings, start_tracker


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
        self.started = time.time()

    def __enter__(self) -> RunServices:
        self.board = ProgressBoardActor.remote()
        notices = {}
        if self.tracker is not None:
            started = self.tracker.start.remote(self.plan.tracker_key, run_settings(self.plan), self.secrets)
            notices[started] = "wandb"
        self.printer = ProgressPrinter(self.board, self.log, waiting=self.plan.waiting, notices=notices).__enter__()
        return self

    @property
    def for_workers(self) -> WorkerServices:
        return WorkerServices(self.board, self.tracker, self.secrets)

    @property
    def first_step_at(self) -> float:
        return self.printer.first_step_at or self.started

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self.printer.__exit__(kind, error, traceback)
        ray.kill(self.board)
        if self.tracker is None or (error is not None and not self.owned):
            return
        self.wandb = ray.get(self.tracker.finish.remote(self.plan.tracker_key, 1 if error is not None else 0))
        if self.owned:
            ray.kill(self.tracker)
