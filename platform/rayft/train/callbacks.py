"""Trainer callbacks that connect the HF/TRL trainer to Ray: checkpoints into Ray Train's
storage, and progress to the driver."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

from ray.train.huggingface.transformers import RayTrainReportCallback
from transformers import TrainerCallback


def post(board: Any, rank: int, **fields: Any) -> None:
    """Send progress to the driver's board (rank 0 only; fire and forget)."""
    if board is not None and rank == 0:
        board.update.remote(fields)


class CheckpointReporter(RayTrainReportCallback):
    """Ray's callback, with checkpoints named by step (`checkpoint_000040`) and the step in the
    metrics, so a user can find and compare them in storage."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import ray.train
        import transformers.trainer

        metrics: dict[str, Any] = {}
        for log in state.log_history:
            metrics.update(log)
        metrics["step"] = state.global_step
        source = transformers.trainer.get_last_checkpoint(args.output_dir)
        with tempfile.TemporaryDirectory() as staging:
            checkpoint = None
            if source is not None:
                shutil.copytree(source, os.path.join(staging, self.CHECKPOINT_NAME))
                checkpoint = ray.train.Checkpoint.from_directory(staging)
            ray.train.report(metrics=metrics, checkpoint=checkpoint,
                             checkpoint_dir_name=f"checkpoint_{state.global_step:06d}")


class ProgressReporter(TrainerCallback):
    """Rank 0 posts step, loss, throughput and ETA to the driver after every log."""

    def __init__(self, board: Any, trainer: Any):
        self.board, self.trainer = board, trainer
        self.started: float | None = None
        self.start_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started, self.start_step = time.time(), state.global_step
        post(self.board, 0, phase="training", step=state.global_step, max_steps=state.max_steps)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        elapsed = time.time() - (self.started or time.time())
        done = state.global_step - self.start_step
        fields: dict[str, Any] = {"step": state.global_step, "max_steps": state.max_steps,
                                  "epoch": round(state.epoch or 0, 3)}
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
            if key in logs:
                fields[key] = logs[key]
        if done > 0 and elapsed > 0:
            fields["tokens_per_second"] = self.trainer._tokens * _world() / elapsed
            fields["eta_seconds"] = (state.max_steps - state.global_step) * elapsed / done
        post(self.board, 0, **fields)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
