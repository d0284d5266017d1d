"""The run plan: everything a training run needs decided before a worker starts, derived once
from the spec and handed whole to the workers, the sweep and evaluation.

    plan_run(spec) -> RunPlan(spec, run_dir, model_dir, prepared (with its chat template),
                              steps, has_eval, resume_from)

Building it checks that the cluster can hold the worker group, materializes the base model (a
GGUF is converted once), runs (or reuses) the data pipeline on Ray Data, and finds the checkpoint
a rerun resumes from. It deletes nothing: with `fresh`, the driver clears the run directory
before training.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import yaml

from rayft import storage
from rayft.data.prepared import Prepared
from rayft.errors import SpecError
from rayft.model import load_tokenizer, materialized_dir
from rayft.rundir import RunDir
from rayft.spec import JobSpec, StepPlan, anchored
from rayft.spec.yamlfile import differences
from rayft.train.precision import model_width, resolve_precision
from rayft.train.preflight import check_cluster_paths, preflight
from rayft.train.resources import capacity_wait

Log = Callable[[str], None]

# A checkpoint only fits the model, method and data it was trained with. Scaling may change:
# the global batch is constant, so resuming on another number of workers continues exactly.
RESUME_MUST_MATCH = ("model", "method", "data")
# ... except the kernels that compute the same function on the same weights: a resume may switch
# them (and a spec written before `auto` existed, with sdpa, resumes under the new default).
RESUME_MAY_CHANGE = ("model.attn_implementation", "method.liger")


@dataclass(frozen=True)
class Trial:
    """A sweep trial's identity: W&B groups its run under the sweep and records its params."""

    name: str
    group: str
    params: dict


@dataclass(frozen=True)
class RunPlan:
    spec: JobSpec
    run_dir: RunDir
    model_dir: str  # the base model, as `from_pretrained` loads it (a converted GGUF, say)
    prepared: Prepared  # the data, and the chat template its conversations were rendered with
    steps: StepPlan
    resume_from: str | None  # the Ray checkpoint a rerun continues from (its directory name)
    precision: str = "fp32"  # method.precision, `auto` decided on this machine (rayft.train.precision)
    fresh: bool = False  # start over: the run directory is cleared before training
    waiting: str | None = None  # what the cluster still lacks, when an autoscaler can add it
    started_at: float = 0.0  # when planning began: the run's wall time counts from here
    trial: Trial | None = None

    @property
    def has_eval(self) -> bool:
        return self.prepared.eval_rows > 0

    @property
    def checkpoint_metric(self) -> str | None:
        """What Ray keeps the best checkpoints by: run.checkpoint_metric, unless it is eval_loss
        and there is nothing to evaluate (then the latest are kept)."""
        metric = self.spec.run.checkpoint_metric
        return metric if self.has_eval or metric != "eval_loss" else None

    @property
    def tracker_key(self) -> str:
        """Names this run's W&B run in the tracker (a sweep's tracker holds one per trial)."""
        return f"{self.run_dir.path}#{self.trial.name if self.trial else ''}"


def plan_run(
    spec: JobSpec,
    *,
    log: Log = print,
    fresh: bool = False,
    resume: bool = True,
    trial: Trial | None = None,
    checked: bool = False,
) -> RunPlan:
    """The plan of `spec`'s run. Unless `fresh` (or `resume` is off, as for evaluating a run), a
    run directory holding checkpoints of the same model, method and data is continued (another
    one is an error naming what changed). `checked`: this process ran preflight(spec) already
    (the CLI does, while Ray starts)."""
    started_at = time.time()
    spec = anchored(spec)  # workers run elsewhere: relative paths mean relative to here
    if not checked:
        preflight(spec)  # files, template, storage: what can fail without Ray fails now
    waiting = capacity_wait(spec)  # a job that can never fit fails before anything starts
    check_cluster_paths(spec)  # a path some node cannot see fails now, not as missing data later
    run_dir = RunDir.of(spec)
    resume_from = latest_checkpoint(run_dir) if resume and not fresh else None
    if resume_from:
        check_resumable(spec, run_dir, log)
    from rayft.data.prepare import prepare  # the driver's: workers unpickle plans without Ray Data

    model_dir = materialized_dir(spec)
    prepared = prepare(spec, load_tokenizer(spec, model_dir), log=log)
    precision, why = resolve_precision(spec, model_width(model_dir))
    log(f"train: precision {precision} ({why})")
    return RunPlan(
        spec,
        run_dir,
        model_dir,
        prepared,
        spec.step_plan(
            prepared.train_rows,
            prepared.split("train")["tokens"],
            prepared.split("eval")["tokens"],
            sweep_trial=trial is not None,
        ),
        resume_from,
        precision=precision,
        fresh=fresh,
        waiting=waiting,
        started_at=started_at,
        trial=trial,
    )


def latest_checkpoint(run_dir: RunDir) -> str | None:
    """The checkpoint a rerun resumes from: the latest one Ray Train registered for this run.
    Ray keeps no public API for this; its registry file is read (CONTRIBUTING.md: private APIs)."""
    registry = storage.read_json(run_dir.checkpoint_registry) or {}
    latest = registry.get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name")


def check_resumable(spec: JobSpec, run_dir: RunDir, log: Log) -> None:
    text = storage.read_text(run_dir.spec)
    if not text:
        return
    changed = differences(_with_todays_defaults(yaml.safe_load(text)), spec.to_dict())
    blocking = [c for c in changed if c[0].split(".")[0] in RESUME_MUST_MATCH and c[0] not in RESUME_MAY_CHANGE]
    if blocking:
        path, old, new = blocking[0]
        more = f", and {len(blocking) - 1} more" if len(blocking) > 1 else ""
        raise SpecError(
            f"run {spec.run_name!r} in {run_dir.path} has checkpoints of a different {path.split('.')[0]} "
            f"({path}: {old!r} -> {new!r}{more}); rerun with --fresh to start over, or give the new job "
            "its own run.name",
            field=path,
        )
    if changed:
        log("train: resuming with changes: " + ", ".join(f"{p}: {o!r} -> {n!r}" for p, o, n in changed[:6]))


def _with_todays_defaults(saved: dict) -> dict:
    """A run's saved spec with the fields a newer rayft added filled in at their defaults: a
    field the run's version did not have is not a change (the new default is what it did). A
    saved spec the schema no longer accepts is compared as it is."""
    try:
        return JobSpec.model_validate(saved).to_dict()
    except Exception:  # pydantic's ValidationError, or a redacted value the schema refuses
        return saved
