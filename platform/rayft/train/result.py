"""What a training run hands back: the workers' result (rank 0's return value) and the run
summary the driver writes to <run>/summary.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RunResult:
    """Returned by rank 0 when training ends; Ray Train passes it to the driver
    (`Result.return_value`)."""

    steps: int
    epochs: float
    train_loss: float | None
    eval_loss: float | None
    tokens: int  # all workers, this attempt: what tokens_per_second is over
    trained_tokens: int
    train_seconds: float
    model_dir: str  # the final model in storage (adapter or weights)
    resumed_from_step: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


@dataclass(frozen=True)
class RunSummary:
    """summary.json: the result, where things went, and where the wall time went."""

    name: str
    run_dir: str
    train_loss: float | None
    eval_loss: float | None
    steps: int
    tokens: int
    trained_tokens: int
    tokens_per_second: float
    startup_seconds: float
    train_seconds: float
    total_seconds: float
    checkpoint: str | None
    model_dir: str
    base_model_dir: str
    prepared: str
    resumed_from_step: int = 0
    wandb: str | None = None

    @classmethod
    def of(
        cls,
        result: RunResult,
        *,
        name: str,
        run_dir: str,
        base_model_dir: str,
        prepared: str,
        checkpoint: str | None,
        startup_seconds: float,
        total_seconds: float,
        wandb: str | None,
    ) -> RunSummary:
        return cls(
            name=name,
            run_dir=run_dir,
            train_loss=result.train_loss,
            eval_loss=result.eval_loss,
            steps=result.steps,
            tokens=result.tokens,
            trained_tokens=result.trained_tokens,
            tokens_per_second=result.tokens_per_second,
            startup_seconds=round(startup_seconds, 1),
            train_seconds=round(result.train_seconds, 1),
            total_seconds=round(total_seconds, 1),
            checkpoint=checkpoint,
            model_dir=result.model_dir,
            base_model_dir=base_model_dir,
            prepared=prepared,
            resumed_from_step=result.resumed_from_step,
            wandb=wandb,
        )

    @property
    def saving_seconds(self) -> float:
        """What the wall time holds besides start-up and training: the final model's upload."""
        return max(self.total_seconds - self.startup_seconds - self.train_seconds, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
