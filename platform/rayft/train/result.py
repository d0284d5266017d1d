"""What a training run hands back: the workers' result (rank 0's return value) and the run
summary the driver writes to <run>/summary.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunResult:
    """Returned by rank 0 when training ends; Ray Train passes it to the driver
    (`Result.return_value`). Times are this attempt's (a restart begins a new attempt)."""

    steps: int
    epochs: float
    train_loss: float | None  # the mean over every optimizer step of the run, resumed ones too
    eval_loss: float | None  # token-weighted over every trained token of the eval split
    tokens: int  # all workers, this attempt: what tokens_per_second is over
    trained_tokens: int
    train_seconds: float  # trainer.train(), evaluations and checkpoints during it included
    eval_seconds: float  # of that, evaluating
    checkpoint_seconds: float  # of that, writing and uploading checkpoints
    save_seconds: float  # the final model into storage, after training
    model_dir: str  # the final model in storage (adapter or weights)
    resumed_from_step: int
    peak_rss_bytes: int = 0  # rank 0's process, for the benchmarks' memory comparison

    @property
    def step_seconds(self) -> float:
        """Training proper: forward, backward and optimizer steps."""
        return max(self.train_seconds - self.eval_seconds - self.checkpoint_seconds, 0.0)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.step_seconds if self.step_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


@dataclass(frozen=True)
class Attempt:
    """One start of the worker group: the first, or a restart after a failure."""

    workers: int | None
    started: float  # wall clock, when its workers began loading the model
    first_step: float | None
    last_heard: float
    resumed_from_step: int | None


@dataclass(frozen=True)
class RunSummary:
    """summary.json: the result, where things went, and where the wall time went:
    total = start-up + training + evaluation + checkpointing + recovery + saving."""

    name: str
    run_dir: str
    train_loss: float | None
    eval_loss: float | None
    steps: int
    tokens: int
    trained_tokens: int
    tokens_per_second: float
    startup_seconds: float  # the command's start to the first training step
    train_seconds: float  # training proper (the last attempt's)
    eval_seconds: float
    checkpoint_seconds: float
    recovery_seconds: float  # failures to the next training step, and the work redone
    save_seconds: float
    total_seconds: float
    checkpoint: str | None
    model_dir: str
    base_model_dir: str
    prepared: str
    resumed_from_step: int = 0
    restarts: int = 0
    workers: list[int] = field(default_factory=list)  # per attempt
    wandb: str | None = None
    peak_rss_bytes: int = 0

    @classmethod
    def of(
        cls,
        result: RunResult,
        attempts: list[Attempt],
        *,
        name: str,
        run_dir: str,
        base_model_dir: str,
        prepared: str,
        checkpoint: str | None,
        started: float,
        finished: float,
        wandb: str | None,
    ) -> RunSummary:
        first_step = next((a.first_step for a in attempts if a.first_step), None) or started
        total = finished - started
        startup = first_step - started
        # between the first attempt's first step and the last attempt's: the earlier attempts'
        # work (redone from a checkpoint) and the restarts themselves
        last_start = attempts[-1].first_step if attempts and attempts[-1].first_step else first_step
        recovery = max(last_start - first_step, 0.0) if len(attempts) > 1 else 0.0
        return cls(
            name=name,
            run_dir=run_dir,
            train_loss=result.train_loss,
            eval_loss=result.eval_loss,
            steps=result.steps,
            tokens=result.tokens,
            trained_tokens=result.trained_tokens,
            tokens_per_second=result.tokens_per_second,
            startup_seconds=round(startup, 1),
            train_seconds=round(result.step_seconds, 1),
            eval_seconds=round(result.eval_seconds, 1),
            checkpoint_seconds=round(result.checkpoint_seconds, 1),
            recovery_seconds=round(recovery, 1),
            save_seconds=round(max(total - startup - recovery - result.train_seconds, 0.0), 1),
            total_seconds=round(total, 1),
            checkpoint=checkpoint,
            model_dir=result.model_dir,
            base_model_dir=base_model_dir,
            prepared=prepared,
            resumed_from_step=result.resumed_from_step,
            restarts=max(len(attempts) - 1, 0),
            workers=[a.workers or 0 for a in attempts],
            wandb=wandb,
            peak_rss_bytes=result.peak_rss_bytes,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


WALL_TIME_PARTS = (
    ("startup_seconds", "start-up"),
    ("train_seconds", "training"),
    ("eval_seconds", "evaluation"),
    ("checkpoint_seconds", "checkpoints"),
    ("recovery_seconds", "recovery"),
    ("save_seconds", "saving"),
)


def wall_time_line(summary: dict[str, Any]) -> str:
    """ "312s = 21s start-up + 270s training + 12s evaluation + ...", from summary.json's values
    (parts that took no time are left out)."""
    parts = [f"{summary[key]:.0f}s {label}" for key, label in WALL_TIME_PARTS if summary.get(key)]
    restarts = f" ({summary['restarts']} restart(s))" if summary.get("restarts") else ""
    return f"{summary.get('total_seconds', 0):.0f}s = " + " + ".join(parts) + restarts
