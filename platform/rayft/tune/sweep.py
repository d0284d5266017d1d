"""Sweeps: a Ray Tune experiment whose every trial is a multi-worker training run.

Ray Train V2's pattern: a Tune function builds and fits a TorchTrainer per trial, with
TuneReportCallback so the scheduler sees every evaluation and can stop a trial mid-run. The data
is prepared once before the sweep; every trial reuses it. Rerunning the same command resumes an
interrupted sweep: finished trials stay finished, the running ones resume from their checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from rayft import storage
from rayft.data.prepare import prepare
from rayft.env import adopt_secrets, share_secrets
from rayft.errors import user_error_in
from rayft.model import load_tokenizer, materialized_dir
from rayft.rundir import SWEEP_MARKER, delete_for_fresh_start, mark, prepared_base, storage_root
from rayft.spec import JobSpec, anchored, validate_spec
from rayft.spec.yamlfile import Origins, apply_override
from rayft.train.driver import train
from rayft.train.preflight import preflight
from rayft.train.run import Trial
from rayft.train.tracking import start_tracker, stop_tracker
from rayft.tune.plots import plot_sweep
from rayft.tune.space import (
    data_variants,
    default_concurrency,
    scheduler,
    search_algorithm,
    search_space,
    trial_spec,
    with_params,
)

PARAMS = "params"  # the trial config holds the sampled values under this key, by dotted spec path
# What a trial's function asks for itself: no CPU, so its workers can have every CPU of the
# cluster (with 0.01 CPU a 2-CPU cluster could never place 2 one-CPU workers). Tune refuses an
# empty request, and one byte of memory costs nothing.
TRIAL_DRIVER_RESOURCES = {"memory": 1}


@dataclass
class TrialOutcome:
    name: str
    params: dict[str, Any]
    status: str  # finished | stopped early | failed | running
    metric: float | None
    iterations: int
    steps: int
    error: str | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) at each report


@dataclass
class SweepResult:
    name: str
    directory: str
    metric: str
    mode: str
    trials: list[TrialOutcome]
    best: TrialOutcome | None
    best_spec_path: str | None
    plot_path: str | None
    seconds: float
    resumed: bool


def run_trial(
    config: dict[str, Any],
    *,
    base: dict[str, Any],
    sweep: str,
    trial_storage: str,
    prepared: str,
    tracker: Any,
    secrets: Any,
) -> None:
    """One trial: a TorchTrainer over `scaling.num_workers` workers, reporting to Tune. The
    trial runs in a Ray process of its own: it takes the sweep driver's secrets first, and
    shares them on with its workers."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    adopt_secrets(secrets)
    name = tune.get_context().get_trial_name()
    params = config[PARAMS]
    spec = trial_spec(base, params, sweep=sweep, trial=name, trial_storage=trial_storage, prepared=prepared)
    train(spec, log=lambda _: None, trial=Trial(name, sweep, params), callbacks=[TuneReportCallback()], tracker=tracker)


def sweep(spec: JobSpec, *, fresh: bool = False, log: Callable[[str], None] = print) -> SweepResult:
    tune_spec = spec.sweep  # a SpecError without a search space, before anything starts
    spec = anchored(spec)  # trials run in directories of their own
    preflight(spec)
    started = time.time()
    directory = str(storage_root(spec).join(spec.run_name))
    if fresh:
        delete_for_fresh_start(directory, SWEEP_MARKER)
    mark(directory, SWEEP_MARKER)
    _prepare_variants(spec, log)
    # The sweep's driver owns the W&B runs: a trial stopped early is killed, its run is not.
    tracker = start_tracker(spec)
    tuner, resumed = _tuner(spec, directory, tracker, log)
    try:
        results = tuner.fit()
    except BaseException:
        _finish_tracking(tracker, {}, default="interrupted")
        raise
    trials = [summarize(result, spec.sweep.metric) for result in results]
    _finish_tracking(tracker, {trial.name: trial.status for trial in trials}, default="stopped early")
    best = pick_best(trials, spec.sweep.mode)
    best_path = write_best_spec(spec, best, directory) if best else None
    plot = plot_sweep(trials, spec, directory)
    storage.write_json(
        f"{directory}/sweep.json",
        {
            "metric": spec.sweep.metric,
            "mode": spec.sweep.mode,
            "trials": [asdict(t) for t in trials],
            "best": best.name if best else None,
        },
    )
    return SweepResult(
        spec.run_name,
        directory,
        tune_spec.metric,
        tune_spec.mode,
        trials,
        best,
        best_path,
        plot,
        time.time() - started,
        resumed,
    )


def _prepare_variants(spec: JobSpec, log: Callable[[str], None]) -> None:
    """Every data variant, once, for every trial: a trial runs inside Tune's placement group,
    where Ray Data's tasks could not be scheduled."""
    base = spec.model_dump(mode="json")
    tokenizer = load_tokenizer(spec, materialized_dir(spec))
    for variant in data_variants(spec):
        prepare(validate_spec(with_params(base, variant)), tokenizer, log=log)


def _tuner(spec: JobSpec, directory: str, tracker: Any, log: Callable[[str], None]) -> tuple[Any, bool]:
    """A new Tuner, or the interrupted sweep's restored (and whether it was restored)."""
    from ray import tune

    name = spec.run_name
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=spec.model_dump(mode="json"),
            sweep=name,
            trial_storage=f"{directory}/trials",
            prepared=str(prepared_base(spec)),
            tracker=tracker,
            secrets=share_secrets(spec),
        ),
        TRIAL_DRIVER_RESOURCES,
    )
    root, filesystem = storage.for_ray(str(storage_root(spec)))
    experiment = f"{root}/{name}" if filesystem is not None else directory
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        log(f"tune: resuming sweep {name} from {directory} (--fresh starts over)")
        restored = tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=False, storage_filesystem=filesystem
        )
        return restored, True
    concurrency = spec.sweep.max_concurrent_trials or default_concurrency(spec)
    log(
        f"tune: {spec.sweep.num_samples} sample(s) of {len(spec.sweep.search_space)} parameter(s), "
        f"{concurrency} trial(s) at a time, {spec.sweep.scheduler.kind} scheduler -> {directory}"
    )
    tuner = tune.Tuner(
        trainable,
        param_space={PARAMS: search_space(spec.sweep)},
        tune_config=tune.TuneConfig(
            metric=spec.sweep.metric,
            mode=spec.sweep.mode,
            scheduler=scheduler(spec),
            search_alg=search_algorithm(spec),
            num_samples=spec.sweep.num_samples,
            max_concurrent_trials=concurrency,
            trial_name_creator=lambda t: f"trial-{t.trial_id}",
            trial_dirname_creator=lambda t: f"trial-{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=filesystem,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    return tuner, False


def _finish_tracking(tracker: Any, status_by_trial: dict[str, str], default: str) -> None:
    import ray

    if tracker is not None:
        ray.get(tracker.finish_all.remote(status_by_trial, default))
        stop_tracker(tracker)


def summarize(result: Any, metric: str) -> TrialOutcome:
    history = result.metrics_dataframe
    records = history.to_dict("records") if history is not None else []
    curve = [
        (int(r["step"]), float(r[metric]))
        for r in records
        if r.get(metric) is not None and not _nan(r.get(metric)) and r.get("step") is not None
    ]
    last = result.metrics or {}
    if result.error is not None:
        status, error = "failed", _first_line(result.error)
    elif last.get("final"):
        status, error = "finished", None
    else:
        status, error = "stopped early", None
    value = last.get(metric)
    # Named as in run_trial (the trial name); a restored trial's directory may carry a suffix.
    name = f"trial-{last['trial_id']}" if last.get("trial_id") else result.path.rstrip("/").rsplit("/", 1)[-1]
    return TrialOutcome(
        name=name,
        params=(result.config or {}).get(PARAMS, {}),
        status=status,
        metric=None if value is None or _nan(value) else float(value),
        iterations=int(last.get("training_iteration", len(records))),
        steps=int(last.get("step", 0) or 0),
        error=error,
        curve=curve,
    )


def pick_best(trials: list[TrialOutcome], mode: str) -> TrialOutcome | None:
    """The best final metric among trials that ran to the end (a stopped trial's last value is
    from an earlier step, and not what its spec trains to)."""
    finished = [t for t in trials if t.status == "finished" and t.metric is not None]
    if not finished:
        return None

    def metric(trial: TrialOutcome) -> float:
        return trial.metric if trial.metric is not None else math.nan

    return (min if mode == "min" else max)(finished, key=metric)


def write_best_spec(spec: JobSpec, best: TrialOutcome, directory: str) -> str:
    """The best trial's full job spec, ready for `rayft train`: the sweep's spec with the
    trial's values, no tune section, and a run name of its own."""
    data = spec.model_dump(mode="json")
    for path, value in best.params.items():
        data = apply_override(data, f"{path}={json.dumps(value)}", Origins())
    data["tune"] = None
    data["run"]["name"] = f"{spec.run_name}-best"
    best_spec = validate_spec(data)
    header = (
        f"# The best trial of sweep {spec.run_name}: {best.name}, {spec.sweep.metric} = {best.metric:.6g}\n"
        f"# with {', '.join(f'{k}={v!r}' for k, v in best.params.items())}.\n"
        f"# Train it: rayft train {directory}/best.yaml\n"
    )
    path = f"{directory}/best.yaml"
    storage.write_text(path, header + yaml.safe_dump(best_spec.to_dict(), sort_keys=False))
    return path


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _first_line(error: BaseException) -> str:
    found = user_error_in(error)
    if found is not None:  # e.g. "invalid job spec\n  train.learning_rate: ..." -> one line
        return "; ".join(line.strip() for line in str(found).splitlines() if line.strip())
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
