"""The driver: a TorchTrainer from the spec (ScalingConfig, RunConfig with storage, checkpoints
and failures), run on whatever cluster `ray.init` connected to, and a summary at the end."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import yaml

from rayft import storage
from rayft.errors import ClusterError, RayftError, user_error_in
from rayft.spec import JobSpec
from rayft.storage import FINAL_METRICS


@dataclass
class TrainSummary:
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
    model_dir: str | None
    resumed_from_step: int = 0
    wandb: str | None = None
    base_model_dir: str | None = None
    prepared: str | None = None
    chat_template: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def step_plan(spec: JobSpec, train_rows: int) -> dict[str, int]:
    """Optimizer steps per epoch and in total, as the HF trainer will count them, and the
    default checkpoint interval (four checkpoints a run)."""
    batches_per_worker = math.ceil(math.ceil(train_rows / spec.train.micro_batch_size) / spec.scaling.num_workers)
    per_epoch = max(1, math.ceil(batches_per_worker / spec.gradient_accumulation_steps))
    total = spec.train.max_steps or max(1, math.ceil(spec.train.epochs * per_epoch))
    save_every = spec.train.save_every or max(1, math.ceil(total / 4))
    return {"steps_per_epoch": per_epoch, "total_steps": total, "save_every": save_every}


def required_resources(spec: JobSpec) -> dict[str, float]:
    scaling = spec.scaling
    needed = {"CPU": scaling.num_workers * scaling.cpus_per_worker}
    if scaling.use_gpu:
        needed["GPU"] = scaling.num_workers * scaling.gpus_per_worker
    return needed


def check_resources(spec: JobSpec) -> str | None:
    """Raise if the cluster can never run the job; return a 'waiting' note if an autoscaler
    can add what is missing."""
    import ray
    from ray._private.state import state

    have = ray.cluster_resources()
    missing = {k: v - have.get(k, 0) for k, v in required_resources(spec).items() if have.get(k, 0) < v}
    if not missing:
        return None
    scaling = spec.scaling
    what = ", ".join(f"{v:g} more {k}" for k, v in missing.items())
    asked = (f"scaling.num_workers={scaling.num_workers} x "
             + (f"scaling.gpus_per_worker={scaling.gpus_per_worker:g} GPU" if "GPU" in missing
                else f"scaling.cpus_per_worker={scaling.cpus_per_worker:g} CPU"))
    try:
        ceiling = state.get_max_resources_from_cluster_config() or {}
    except Exception:
        ceiling = {}
    if ceiling and all(ceiling.get(k, 0) >= v for k, v in required_resources(spec).items()):
        return f"waiting for the autoscaler to add {what} ({asked})"
    have_text = ", ".join(f"{have.get(k, 0):g} {k}" for k in required_resources(spec))
    raise ClusterError(f"the job needs {what} than the cluster has ({asked}; the cluster has {have_text}). "
                       "Lower the scaling section or add nodes.")


def scaling_config(spec: JobSpec) -> Any:
    from ray.train import ScalingConfig

    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources,
                         accelerator_type=scaling.accelerator_type, placement_strategy=scaling.placement_strategy)


def run_config(spec: JobSpec, callbacks: list[Any] | None = None, has_eval: bool = True) -> Any:
    import os

    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from rayft.train.logs import quiet_env

    metric = spec.run.checkpoint_metric if has_eval or spec.run.checkpoint_metric != "eval_loss" else None
    forwarded = [*spec.run.forward_env, *(name for name in os.environ if name.startswith("RAYFT_"))]
    env = {**quiet_env(), **storage.credential_env(spec.run.storage_path),
           **{name: os.environ[name] for name in forwarded if name in os.environ}}
    return RunConfig(
        name=spec.run_name, storage_path=storage.storage_root(spec),
        checkpoint_config=CheckpointConfig(num_to_keep=spec.run.checkpoints_to_keep,
                                           checkpoint_score_attribute=metric,
                                           checkpoint_score_order=spec.run.checkpoint_mode),
        failure_config=FailureConfig(max_failures=spec.run.max_failures),
        worker_runtime_env={"env_vars": env},
        callbacks=callbacks or None,
    )


def train(spec: JobSpec, *, fresh: bool = False, log: Callable[[str], None] = print,
          trial: dict[str, Any] | None = None, callbacks: list[Any] | None = None,
          tracker: Any | None = None) -> TrainSummary:
    """Prepare the data (or reuse it), train on `scaling.num_workers` workers, save the model.
    A sweep passes its trial's identity, Tune's report callback and its W&B tracker."""
    import ray
    from ray.train.torch import TorchTrainer

    from rayft.data.prepare import prepare
    from rayft.data.templates import resolve_template
    from rayft.model import load_tokenizer, materialized_dir
    from rayft.train.progress import ProgressBoard, ProgressPrinter
    from rayft.train.tracking import run_settings, start_tracker
    from rayft.train.worker import train_loop_per_worker

    started = time.time()
    waiting = check_resources(spec)
    run_dir = storage.run_dir(spec)
    if fresh:
        storage.delete_dir(run_dir)
    else:
        storage.delete_file(f"{run_dir}/{FINAL_METRICS}")  # a resumed run writes a new one
        latest = latest_checkpoint(run_dir)
        if latest:
            check_resumable(spec, run_dir, log)
            log(f"train: resuming {spec.run_name} from {latest} (--fresh starts over)")
    model_dir = materialized_dir(spec)
    tokenizer = load_tokenizer(spec, model_dir)
    prepared = prepare(spec, tokenizer, log=log)
    template = resolve_template(spec.data.template, tokenizer)
    storage.write_text(f"{run_dir}/spec.yaml", yaml.safe_dump(spec.to_dict(), sort_keys=False))
    steps = step_plan(spec, prepared.stats["splits"]["train"]["rows"])
    has_eval = prepared.stats["splits"]["eval"]["rows"] > 0
    log(f"train: {spec.scaling.num_workers} worker(s), global batch {spec.train.global_batch_size} = "
        f"{spec.train.micro_batch_size} x {spec.scaling.num_workers} workers x "
        f"{spec.gradient_accumulation_steps} accumulation, {steps['total_steps']} steps, "
        f"checkpoint every {steps['save_every']} -> {run_dir}")
    if waiting:
        log(f"train: {waiting}")

    board = ProgressBoard.remote()
    owned_tracker = tracker is None
    tracker = start_tracker(spec, tracker)
    tracker_key = f"{run_dir}#{(trial or {}).get('name', '')}"
    notices = {}
    if tracker is not None:  # W&B starts while the workers do: its location is printed when ready
        notices[tracker.start.remote(tracker_key, run_settings(spec, run_dir, trial))] = "wandb"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "model_dir": model_dir,
                           "prepared": {"root": prepared.root, "key": prepared.key, "stats": prepared.stats},
                           "run_dir": run_dir, "steps": steps, "board": board, "trial": trial,
                           "chat_template": template.source, "tracker": tracker, "tracker_key": tracker_key},
        scaling_config=scaling_config(spec),
        run_config=run_config(spec, callbacks, has_eval),
    )
    with ProgressPrinter(board, log, waiting=(lambda: waiting) if waiting else None, notices=notices) as printer:
        try:
            result = trainer.fit()
        except Exception as exc:
            if owned_tracker:  # keep what was logged; a sweep's trial is finished by the sweep,
                # which knows whether Tune stopped it (an early stop is no failure) or it failed
                _finish_tracking(tracker, tracker_key, owned_tracker, exit_code=1)
            raise (user_error_in(exc) or _training_failed(exc)) from None
    first_step_at = printer.first_step_at or started
    ray.kill(board)
    wandb_location = _finish_tracking(tracker, tracker_key, owned_tracker, exit_code=0)
    final = json.loads(storage.read_text(f"{run_dir}/{FINAL_METRICS}") or "{}")
    summary = TrainSummary(
        name=spec.run_name, run_dir=run_dir, train_loss=final.get("train_loss"), eval_loss=final.get("eval_loss"),
        steps=int(final.get("steps", final.get("step", 0))), tokens=int(final.get("tokens", 0)),
        trained_tokens=int(final.get("trained_tokens", 0)),
        tokens_per_second=float(final.get("tokens_per_second", 0.0)),
        startup_seconds=round(first_step_at - started, 1),
        train_seconds=round(float(final.get("train_seconds", 0.0)), 1),
        total_seconds=round(time.time() - started, 1),
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        model_dir=final.get("model_dir"), resumed_from_step=int(final.get("resumed_from_step", 0)),
        wandb=wandb_location, base_model_dir=model_dir, prepared=prepared.root,
        chat_template=template.source,
    )
    storage.write_json(f"{run_dir}/summary.json", summary.to_dict())
    return summary


# A checkpoint only fits the model, method and data it was trained with. Scaling may change:
# the global batch is constant, so resuming on another number of workers continues exactly.
RESUME_MUST_MATCH = ("model", "method", "data")


def check_resumable(spec: JobSpec, run_dir: str, log: Callable[[str], None]) -> None:
    from rayft.errors import SpecError
    from rayft.specfile import differences

    text = storage.read_text(f"{run_dir}/spec.yaml")
    if not text:
        return
    changed = differences(yaml.safe_load(text), spec.to_dict())
    blocking = [c for c in changed if c[0].split(".")[0] in RESUME_MUST_MATCH]
    if blocking:
        path, old, new = blocking[0]
        raise SpecError(f"run {spec.run_name!r} in {run_dir} has checkpoints of a different {path.split('.')[0]} "
                        f"({path}: {old!r} -> {new!r}{f', and {len(blocking) - 1} more' if len(blocking) > 1 else ''}); "
                        "rerun with --fresh to start over, or give the new job its own run.name", field=path)
    if changed:
        log("train: resuming with changes: " + ", ".join(f"{p}: {o!r} -> {n!r}" for p, o, n in changed[:6]))


def _finish_tracking(tracker: Any, key: str, owned: bool, exit_code: int) -> str | None:
    if tracker is None:
        return None
    import ray

    location = ray.get(tracker.finish.remote(key, exit_code))
    if owned:
        ray.kill(tracker)
    return location


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint a rerun resumes from: the latest one Ray Train registered for this run."""
    text = storage.read_text(f"{run_dir}/checkpoint_manager_snapshot.json")
    if not text:
        return None
    latest = json.loads(text).get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name")


def _training_failed(exc: Exception) -> RayftError:
    """A worker crashed for a reason that is not ours to explain: keep its message short."""
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    tail = "\n".join(lines[-12:])
    return RayftError(f"training failed: {tail}")
