"""W&B tracking: one run per training job (or sweep trial), never one per worker rank.

The W&B runs live in a small `Tracker` actor owned by the process that outlives the training:
the `rayft train` driver, or the sweep's driver. wandb keeps a run's data in its core process
until `finish()`, so a run held by a training process dies with it: a worker killed by a fault,
or a trial stopped early by ASHA, would leave an empty run. Rank 0 sends its logs to the tracker;
the owner finishes every run, stopped trials included.

Mode `auto` is online when WANDB_API_KEY is set and offline otherwise: a laptop run with no
account still leaves a complete run directory that `wandb sync` uploads later.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import TYPE_CHECKING, Any

import ray

from rayft import storage
from rayft.env import Target, adopt_secrets, runtime_env
from rayft.machine_cache import home
from rayft.nodes import on_this_node
from rayft.spec import JobSpec
from rayft.spec.secrets import redact, redact_text

if TYPE_CHECKING:
    from rayft.train.run import RunPlan


def wandb_mode(spec: JobSpec) -> str:
    mode = spec.tracking.wandb.mode
    if mode == "auto":
        if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
            return os.environ["WANDB_MODE"]
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def wandb_dir(plan: RunPlan) -> str:
    """Where wandb writes its files (it writes local files only): wandb.dir, else the run
    directory (wandb adds its own wandb/ folder there); a local cache for object storage."""
    if plan.spec.tracking.wandb.dir:
        return os.path.abspath(os.path.expanduser(plan.spec.tracking.wandb.dir))
    if plan.run_dir.remote:
        return str(home() / "wandb")
    return plan.run_dir.path


def wandb_archive(plan: RunPlan) -> str | None:
    """Where an offline run's files are copied when it finishes, when wandb could not write them
    into the run directory itself (object storage): `<run>/wandb/`, so that they outlive the node
    the tracker ran on and `wandb sync` can find them beside the checkpoints."""
    if plan.spec.tracking.wandb.dir or not plan.run_dir.remote:
        return None
    return f"{plan.run_dir.path}/wandb"


def run_id(run_dir: str, trial: str | None) -> str:
    """Stable per run (and trial): a restarted or resumed run continues the same W&B run."""
    return hashlib.sha256(f"{run_dir}:{trial or ''}".encode()).hexdigest()[:16]


def run_settings(plan: RunPlan) -> dict[str, Any]:
    """What `wandb.init` gets: the resolved spec, grouping, identity; every string redacted as
    the saved spec is (a secret pasted into a tag or a group never reaches W&B)."""
    spec, trial = plan.spec, plan.trial
    config = spec.to_dict()
    if trial and trial.params:
        config["trial_params"] = trial.params
    names = spec.run.forward_env
    return {
        **{
            key: redact(value) if not isinstance(value, str) else redact_text(value, names)
            for key, value in _wandb_identity(plan).items()
        },
        "dir": wandb_dir(plan),
        "mode": wandb_mode(spec),
        "config": redact(config),
        "id": run_id(plan.run_dir.path, trial.name if trial else None),
    }


def _wandb_identity(plan: RunPlan) -> dict[str, Any]:
    spec, trial, settings = plan.spec, plan.trial, plan.spec.tracking.wandb
    return {
        "project": settings.project,
        "entity": settings.entity,
        "name": trial.name if trial else spec.run_name,
        "group": (trial.group if trial else None) or settings.group,
        "tags": settings.tags or None,
    }


class Tracker:
    """Holds W&B runs by key; each is finished exactly once, by `finish` or `finish_all`."""

    def __init__(self) -> None:
        self.runs: dict[str, Any] = {}
        self.archives: dict[str, str] = {}  # key -> where its offline files go when it finishes
        # Training does not wait for `start`; a worker's log that overtakes it waits here.
        self.early: dict[str, list[tuple[dict[str, Any], int]]] = {}

    def start(self, key: str, settings: dict[str, Any], secrets: Any = None, archive: str | None = None) -> str:
        import wandb

        adopt_secrets(secrets)  # WANDB_API_KEY, where this actor does not inherit it
        if archive and settings.get("mode") == "offline":
            self.archives[key] = archive
        if key not in self.runs:
            os.makedirs(settings["dir"], exist_ok=True)
            self.runs[key] = wandb.init(
                **settings, resume="allow", reinit="create_new", settings=wandb.Settings(console="off", silent=True)
            )
            for values, step in self.early.pop(key, []):
                self.runs[key].log(values, step=step)
        return self._location(self.runs[key])

    def log(self, key: str, values: dict[str, Any], step: int) -> None:
        run = self.runs.get(key)
        if run is not None:
            run.log(values, step=step)
        else:
            self.early.setdefault(key, []).append((values, step))

    def summarize(self, key: str, summary: dict[str, Any]) -> None:
        run = self.runs.get(key)
        if run is not None:
            for name, value in summary.items():
                if isinstance(value, (int, float, str)):
                    run.summary[f"final/{name}"] = value

    def finish(self, key: str, exit_code: int = 0) -> str | None:
        run = self.runs.pop(key, None)
        if run is None:
            return None
        location = self._location(run)
        run.finish(exit_code=exit_code)
        archive = self.archives.pop(key, None)
        if archive:  # the offline run directory (offline-run-<time>-<id>/), with its .wandb file
            local = os.path.dirname(run.dir.rstrip("/"))
            target = f"{archive}/{os.path.basename(local)}"
            storage.upload_dir(local, target)
            location = f"{target}/files"
        return location

    def finish_all(self, status_by_trial: dict[str, str], default: str) -> list[str]:
        """Finish the runs a sweep's trials left open: a trial that Tune stopped is killed, or
        interrupted mid-fit, before it can finish its own run. Each run gets its trial's final
        status ("stopped early", "failed", ...; `default` for trials Tune did not report);
        only a failed one exits non-zero."""
        finished = []
        for key in list(self.runs):
            status = status_by_trial.get(key.rsplit("#", 1)[-1], default)
            self.runs[key].summary["status"] = status
            finished.append(self.finish(key, exit_code=1 if status == "failed" else 0))
        return [location for location in finished if location]

    def close(self) -> None:
        """Stop wandb's service once it has written every run's files. `run.finish()` returns
        while the service may still hold a run's records in memory; killing this actor right
        after left an offline run file with no history and no exit record (seen in a test)."""
        import wandb

        wandb.teardown()

    @staticmethod
    def _location(run: Any) -> str:
        return run.url if getattr(run, "url", None) else run.dir


TrackerActor = ray.remote(num_cpus=0, max_restarts=0)(Tracker)
CLOSE_TIMEOUT_S = 120  # wandb's service flushing its files; online, uploading what is left


def stop_tracker(tracker: Any) -> None:
    """End a tracker actor after its runs are finished, and after wandb has written them (a
    tracker that cannot close in time is ended anyway: tracking never holds a run up)."""
    with contextlib.suppress(Exception):  # GetTimeoutError, or the actor died: nothing left to flush
        ray.get(tracker.close.remote(), timeout=CLOSE_TIMEOUT_S)
    ray.kill(tracker)


def start_tracker(spec: JobSpec, tracker: Any | None = None) -> Any | None:
    """A tracker for this driver to own (or the one given by a sweep); None when disabled."""
    if wandb_mode(spec) == "disabled":
        return None
    if tracker is not None:
        return tracker
    return TrackerActor.options(runtime_env=runtime_env(spec, Target.TRACKER), **on_this_node()).remote()
