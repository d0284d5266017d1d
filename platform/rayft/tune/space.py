"""What a sweep explores: the search space from the spec's dotted paths, each trial's spec, the
data variants prepared before the trials start, and Tune's scheduler and search algorithm."""

from __future__ import annotations

import itertools
import json
from typing import Any

from rayft.errors import SpecError
from rayft.spec import JobSpec, TuneSpec, validate_spec
from rayft.spec.yamlfile import Origins, apply_override
from rayft.train.resources import required_resources


def search_space(tune_spec: TuneSpec) -> dict[str, Any]:
    from ray import tune

    make = {
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
        "randint": lambda v: tune.randint(v[0], v[1] + 1),  # the spec's bounds are inclusive
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    return {
        path: make[kind](values) for path, domain in tune_spec.search_space.items() for kind, values in domain.items()
    }


def with_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    data = dict(base)
    for path, value in params.items():
        data = apply_override(data, f"{path}={json.dumps(value)}", Origins())
    return data


def trial_spec(
    base: dict[str, Any], params: dict[str, Any], *, sweep: str, trial: str, trial_storage: str, prepared: str
) -> JobSpec:
    """The base spec with a trial's values at their dotted paths, run in the sweep's trials/ dir
    and reading the data the sweep prepared."""
    data = with_params(base, params)
    data["run"] = {**data["run"], "name": trial, "storage_path": trial_storage}
    data["data"] = {**data["data"], "cache_dir": prepared}
    wandb = data["tracking"]["wandb"]
    data["tracking"] = {**data["tracking"], "wandb": {**wandb, "group": wandb.get("group") or sweep}}
    data["eval"] = {**data["eval"], "before_after": False}  # generation is for the best model, not every trial
    data["tune"] = None
    return validate_spec(data)


def data_variants(spec: JobSpec) -> list[dict[str, Any]]:
    """Every combination of the swept data.* values (one prepared dataset each); [{}] if none.
    A trial runs inside Tune's placement group, where Ray Data's tasks could not be scheduled,
    so the data must be prepared before the trials start: data.* values must be enumerable."""
    swept = {path: domain for path, domain in spec.sweep.search_space.items() if path.startswith("data.")}
    for path, domain in swept.items():
        if not {"grid", "choice"} & set(domain):
            raise SpecError(
                f"sweeping {path} needs grid or choice values: each data variant is prepared before the trials start",
                field=f"tune.search_space.{path}",
            )
    values = [next(iter(domain.values())) for domain in swept.values()]
    return [dict(zip(swept, combo)) for combo in itertools.product(*values)] or [{}]


def default_concurrency(spec: JobSpec) -> int:
    """As many trials at once as the cluster holds whole trials (each is a worker group)."""
    import ray

    have = ray.cluster_resources()
    return max(1, min(int(have.get(k, 0) // v) for k, v in required_resources(spec).items() if v))


def scheduler(spec: JobSpec) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    choice = spec.sweep.scheduler
    # Time is counted in reports (one per evaluation/checkpoint), so grace_period reads as
    # "evaluations a trial always gets".
    if choice.kind == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=10_000,
            grace_period=choice.grace_period,
            reduction_factor=choice.reduction_factor,
        )
    if choice.kind == "median":
        return MedianStoppingRule(
            time_attr="training_iteration", grace_period=choice.grace_period, min_samples_required=2
        )
    return FIFOScheduler()


def search_algorithm(spec: JobSpec) -> Any:
    if spec.sweep.search_alg == "random":
        return None  # Tune's default: random sampling, grid values expanded
    if any("grid" in domain for domain in spec.sweep.search_space.values()):
        raise SpecError(
            "grid values need tune.search_alg=random (Optuna samples; it does not enumerate grids)",
            field="tune.search_alg",
        )
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=spec.train.seed)
