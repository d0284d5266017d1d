"""W&B tracking: one run per training job (or sweep trial), written by rank 0 only.

Mode `auto` is online when WANDB_API_KEY is set and offline otherwise, so a laptop run with no
account still leaves a complete run directory that `wandb sync` can upload later. The run is
finished explicitly: an unfinished offline run loses its data.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from transformers import TrainerCallback

from rayft.specfile import redact
from rayft.spec import JobSpec


def wandb_mode(spec: JobSpec) -> str:
    mode = spec.tracking.wandb.mode
    if mode == "auto":
        if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
            return os.environ["WANDB_MODE"]
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def wandb_dir(spec: JobSpec, run_dir: str) -> str:
    if spec.tracking.wandb.dir:
        return os.path.abspath(spec.tracking.wandb.dir)
    if "://" in run_dir:  # object storage: wandb writes local files; keep them in a local cache
        return os.path.expanduser("~/.cache/rayft/wandb")
    return run_dir


def run_id(run_dir: str, trial: str | None) -> str:
    """Stable per run (and trial): a restarted or resumed run continues the same W&B run."""
    return hashlib.sha256(f"{run_dir}:{trial or ''}".encode()).hexdigest()[:16]


class WandbTracker(TrainerCallback):
    def __init__(self, spec: JobSpec, run_dir: str, trial: dict[str, Any] | None = None):
        self.spec, self.run_dir, self.trial = spec, run_dir, trial or {}
        self.mode = wandb_mode(spec)
        self.run: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.mode == "disabled" or self.run is not None:
            return
        import wandb

        settings = self.spec.tracking.wandb
        directory = wandb_dir(self.spec, self.run_dir)
        os.makedirs(directory, exist_ok=True)
        name = self.trial.get("name") or self.spec.run_name
        config = redact(self.spec.to_dict())
        if self.trial.get("params"):
            config["trial_params"] = self.trial["params"]
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, name=name,
            group=self.trial.get("group") or settings.group, tags=settings.tags or None,
            dir=directory, mode=self.mode, config=config,
            id=run_id(self.run_dir, self.trial.get("name")), resume="allow",
            settings=wandb.Settings(console="off", silent=True, x_disable_meta=False),
        )

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.run is None or not logs:
            return
        values = {_metric_name(key): value for key, value in logs.items() if isinstance(value, (int, float))}
        values["train/epoch"] = state.epoch or 0
        self.run.log(values, step=state.global_step)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        for key, value in summary.items():
            if isinstance(value, (int, float, str)) and value is not None:
                self.run.summary[f"final/{key}"] = value
        location = self.run.url if self.mode == "online" else self.run.dir
        summary["wandb"] = location
        self.run.finish()
        self.run = None


def _metric_name(key: str) -> str:
    if key.startswith("eval_"):
        return f"eval/{key[5:]}"
    return key if "/" in key else f"train/{key}"
