"""The driver: plan the run, then fit a TorchTrainer on whatever cluster `ray.init` connected
to, as Ray Train's own examples do, and write the run summary.

    plan = plan_run(spec)          # model, data, steps, resume point: rayft.train.run
    summary = fit(plan)            # ScalingConfig + RunConfig + TorchTrainer(...).fit()
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import yaml

from rayft import storage
from rayft.env import Target, runtime_env
from rayft.errors import RayftError, user_error_in
from rayft.rundir import CHECKPOINT_SCORE, delete_for_fresh_start, mark, storage_root
from rayft.spec import JobSpec
from rayft.train.result import RunSummary
from rayft.train.run import RunPlan, Trial, plan_run
from rayft.train.services import RunServices
from rayft.train.worker import packages_unused_by, train_loop_per_worker

Log = Callable[[str], None]


def train(
    spec: JobSpec,
    *,
    fresh: bool = False,
    log: Log = print,
    trial: Trial | None = None,
    callbacks: list[Any] | None = None,
    tracker: Any | None = None,
) -> RunSummary:
    """Prepare the data (or reuse it), train on `scaling.num_workers` workers, save the model.
    A sweep passes its trial's identity, Tune's report callback and its W&B tracker."""
    return fit(plan_run(spec, log=log, fresh=fresh, trial=trial), log=log, callbacks=callbacks, tracker=tracker)


def fit(
    plan: RunPlan, *, log: Log = print, callbacks: list[Any] | None = None, tracker: Any | None = None
) -> RunSummary:
    """Train as `plan` says and write <run>/summary.json."""
    from rayft.train.controller import RayftTorchTrainer

    started = plan.started_at or time.time()
    _begin(plan, log)
    with RunServices(plan, log, tracker=tracker) as services:
        trainer = RayftTorchTrainer(
            train_loop_per_worker,
            train_loop_config={"plan": plan, "services": services.for_workers},
            scaling_config=scaling_config(plan.spec),
            run_config=run_config(plan, [services.failure_notes(), *(callbacks or [])]),
            unused_packages=packages_unused_by(plan.spec),
        )
        try:
            result = trainer.fit()
        except Exception as exc:
            raise (user_error_in(exc) or _training_failed(exc)) from None
        if isinstance(result.return_value, RayftError):  # refused in setup: no restart would help
            raise result.return_value
    summary = RunSummary.of(
        result.return_value,
        services.attempts,
        name=plan.spec.run_name,
        run_dir=plan.run_dir.path,
        base_model_dir=plan.model_dir,
        prepared=plan.prepared.root,
        checkpoint=storage.with_scheme(plan.run_dir.path, result.checkpoint.path) if result.checkpoint else None,
        started=started,
        finished=time.time(),
        wandb=services.wandb,
    )
    storage.write_json(plan.run_dir.summary, summary.to_dict())
    return summary


def _begin(plan: RunPlan, log: Log) -> None:
    spec, run_dir = plan.spec, plan.run_dir
    if plan.fresh:
        delete_for_fresh_start(run_dir.path)
    elif plan.resume_from:
        log(f"train: resuming {spec.run_name} from {plan.resume_from} (--fresh starts over)")
    mark(run_dir.path)
    storage.write_text(run_dir.spec, yaml.safe_dump(spec.to_dict(), sort_keys=False))
    scaling = spec.scaling
    if scaling.elastic:
        sizes = ", ".join(f"{n} x {spec.accumulation_at(n)}" for n in scaling.worker_counts)
        layout = (
            f"elastic {scaling.min_workers}-{scaling.num_workers} workers, global batch "
            f"{spec.train.global_batch_size} = {spec.train.micro_batch_size} x workers x accumulation ({sizes})"
        )
    else:
        layout = (
            f"{scaling.num_workers} worker(s), global batch {spec.train.global_batch_size} = "
            f"{spec.train.micro_batch_size} x {scaling.num_workers} workers x "
            f"{spec.gradient_accumulation_steps} accumulation"
        )
    log(f"train: {layout}, {plan.steps.total_steps} steps, checkpoint every {plan.steps.save_every} -> {run_dir.path}")
    if plan.has_eval:
        log(f"train: evaluation {plan.steps.eval_why}")
    if plan.waiting:
        log(f"train: {plan.waiting}")


def scaling_config(spec: JobSpec) -> Any:
    from ray.train import ScalingConfig

    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return ScalingConfig(
        # elastic: Ray starts with what fits between the bounds and resizes as nodes come and go
        num_workers=(scaling.min_workers, scaling.num_workers) if scaling.elastic else scaling.num_workers,
        elastic_resize_monitor_interval_s=scaling.resize_check_s,
        use_gpu=scaling.use_gpu,
        resources_per_worker=resources,
        accelerator_type=scaling.accelerator_type,
        placement_strategy=scaling.placement_strategy,
    )


def run_config(plan: RunPlan, callbacks: list[Any] | None = None) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    spec = plan.spec
    metric = plan.checkpoint_metric
    root, filesystem = storage.for_ray(str(storage_root(spec)))
    return RunConfig(
        name=spec.run_name,
        storage_path=root,
        storage_filesystem=filesystem,
        checkpoint_config=CheckpointConfig(
            num_to_keep=spec.run.checkpoints_to_keep,
            checkpoint_score_attribute=CHECKPOINT_SCORE if metric else None,  # metric's value (CheckpointReporter)
            checkpoint_score_order=spec.run.checkpoint_mode,
        ),
        failure_config=FailureConfig(
            max_failures=spec.run.max_failures, max_preemption_failures=spec.run.max_preemptions
        ),
        worker_runtime_env=runtime_env(spec, Target.WORKERS) or {},
        callbacks=callbacks or None,
    )


def _training_failed(exc: Exception) -> RayftError:
    """A worker crashed for a reason that is not ours to explain: keep its message short."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return RayftError("training failed: " + "\n".join(lines[-12:]))
