"""Trainer callbacks that connect the HF/TRL trainer to Ray and to the user: the token meter
the others read, checkpoints into Ray Train's storage, progress to the driver, the metrics
timeline, and the per-step sample log."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from typing import Any

import ray
from ray.train.huggingface.transformers import RayTrainReportCallback
from transformers import TrainerCallback

from rayft import storage
from rayft.data.tokenize import IGNORE
from rayft.rundir import CHECKPOINT_SCORE, UNRANKED, RunDir, checkpoint_dir_name


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class TokenMeter(TrainerCallback):
    """Counts the tokens this worker trains on, all and those with a loss (the trainer calls
    `count` for every micro-batch), and puts `tokens_per_second` (all workers, since this
    attempt's training began) into every train log. The progress line, the metrics timeline and
    W&B all read that one value: add the meter before them."""

    def __init__(self) -> None:
        self.tokens = 0
        self.trained = 0
        self.started = time.time()
        self.start_tokens = 0

    def count(self, inputs: dict[str, Any]) -> None:
        labels = inputs.get("labels")
        if labels is None:
            return
        mask = inputs.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(labels.numel())
        self.trained += int((labels != IGNORE).sum())

    def rate(self) -> float | None:
        """Tokens per second over all workers (each is assumed to train as many as this one)."""
        elapsed = time.time() - self.started
        return (self.tokens - self.start_tokens) * world_size() / elapsed if elapsed > 0 else None

    def totals(self) -> tuple[int, int]:
        """(tokens, trained tokens) of all workers: a collective, every rank must call it."""
        import torch
        import torch.distributed as dist

        counts = torch.tensor([self.tokens, self.trained], dtype=torch.float64)
        if world_size() > 1:
            backend = dist.get_backend()
            device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
            counts = counts.to(device)
            dist.all_reduce(counts)
        return int(counts[0]), int(counts[1])

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started, self.start_tokens = time.time(), self.tokens

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        rate = self.rate()
        if logs is not None and "loss" in logs and rate is not None:
            logs["tokens_per_second"] = rate


class LogAtCheckpoints(TrainerCallback):
    """Logs the train loss at every checkpoint and at the last step too (besides every
    train.log_every steps), so the log history in each checkpoint covers every step before it:
    the run's train loss then means the same after a resume as without one (run_train_loss)."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % args.save_steps == 0 or state.global_step >= state.max_steps:
            control.should_log = True


class CadenceOfThisRun(TrainerCallback):
    """A resumed run logs, evaluates and checkpoints at its own spec's cadence. transformers
    restores logging_steps, eval_steps and save_steps from the checkpoint's trainer_state.json
    with the rest of the state, so a run resumed with changes kept the first run's: the
    quickstart resumed from a 2-step run's checkpoint (saved and evaluated every step)
    evaluated after every one of its 25 steps, 199 s of a 403 s run, instead of every 14."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        state.compute_steps(args, state.max_steps)


def run_train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """The mean train loss over every optimizer step the log history covers: each logged loss
    is the mean over the steps since the log before it."""
    total = steps = previous = 0.0
    for entry in log_history:
        if "loss" in entry and "step" in entry and entry["step"] > previous:
            span = entry["step"] - previous
            total, steps, previous = total + entry["loss"] * span, steps + span, entry["step"]
    return total / steps if steps else None


def post(board: Any, rank: int, **fields: Any) -> None:
    """Send progress to the driver's board (rank 0 only; fire and forget)."""
    if board is not None and rank == 0:
        board.update.remote(fields)


SYNC_UPLOAD_HOOK = "RAYFT_TEST_SYNC_UPLOAD"  # benchmark hook: upload as before async uploads (CONTRIBUTING.md)


class CheckpointReporter(RayTrainReportCallback):
    """Ray's callback, with checkpoints named by step (`checkpoint_000040`) and the step in the
    metrics, so a user can find and compare them in storage.

    Uploads are asynchronous: the trainer's checkpoint directory is moved (a rename on the same
    disk, not a copy) into a staging directory of its own, out of reach of the trainer's rotation,
    and Ray uploads it in a background thread and deletes it after, while training goes on. Ray
    commits checkpoints in order and waits for the last upload before the worker ends. A
    checkpoint written because the node is being drained (`urgent`) uploads synchronously: it
    must be in storage before the node goes."""

    seconds = 0.0  # training time spent on checkpoints here (handing them to Ray; a sync upload too)
    urgent = False  # set by PreemptionCheckpoint for the next save

    def __init__(self, score_metric: str | None = None, mode: str = "min"):
        super().__init__()
        # run.checkpoint_metric and run.checkpoint_mode: Ray keeps the best checkpoints by them
        self.score_metric, self.mode = score_metric, mode

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import ray.train
        import transformers.trainer
        from ray.train import CheckpointUploadMode

        started = time.time()
        metrics = checkpoint_metrics(state.log_history, state.global_step, self.score_metric, self.mode)
        source = transformers.trainer.get_last_checkpoint(args.output_dir)
        # beside the trainer's checkpoints, so the move is a rename; not named checkpoint-N, so
        # neither the trainer's rotation nor get_last_checkpoint ever sees it
        staging, checkpoint = tempfile.mkdtemp(prefix="upload-", dir=args.output_dir), None
        if source is not None:
            os.rename(source, os.path.join(staging, self.CHECKPOINT_NAME))
            checkpoint = ray.train.Checkpoint.from_directory(staging)
        urgent = self.urgent or bool(os.environ.get(SYNC_UPLOAD_HOOK))
        mode = CheckpointUploadMode.SYNC if urgent else CheckpointUploadMode.ASYNC
        ray.train.report(
            metrics=metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=checkpoint_dir_name(state.global_step),
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=True,
        )
        if checkpoint is None or mode is CheckpointUploadMode.SYNC:
            shutil.rmtree(staging, ignore_errors=True)
        self.urgent = False
        self.seconds += time.time() - started


def checkpoint_metrics(
    log_history: list[dict[str, Any]], step: int, score_metric: str | None, mode: str = "min"
) -> dict[str, Any]:
    """The newest value of every logged metric, for the checkpoint of `step`, and its rank score
    (CHECKPOINT_SCORE: `score_metric`'s value). Evaluation metrics only from an evaluation of these
    weights: a checkpoint that was not evaluated (the default cadence skips some, rayft.spec.
    StepPlan) must not be ranked by an older checkpoint's loss; it scores UNRANKED, below every
    evaluated one (Ray keeps the latest checkpoint whatever its score)."""
    metrics: dict[str, Any] = {}
    for log in log_history:
        metrics.update(log)
    evaluation = next((log for log in reversed(log_history) if "eval_loss" in log), None)
    if evaluation is None or evaluation.get("step") != step:
        metrics = {key: value for key, value in metrics.items() if not key.startswith("eval_")}
    metrics["step"] = step
    if score_metric:
        value = metrics.get(score_metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics[CHECKPOINT_SCORE] = float(value)
        else:
            metrics[CHECKPOINT_SCORE] = -UNRANKED if mode == "max" else UNRANKED
    return metrics


class PreemptionCheckpoint(TrainerCallback):
    """Just-in-time checkpoints while a node of the group is being drained or preempted (`ray
    drain-node`, a spot reclaim notice): from the notice until the node goes, every worker saves
    after every step, and each checkpoint uploads before the next step begins, so no completed
    step is lost (at most the one whose checkpoint was being written). Ray then restarts the
    group from the last one, on the nodes that remain, against run.max_preemptions.

    `ray.train.get_preemption_info()` is a barrier over the workers; it is asked once per optimizer
    step, on every rank (a few milliseconds against steps of seconds)."""

    def __init__(self, reporter: CheckpointReporter, board: Any, rank: int):
        self.reporter, self.board, self.rank = reporter, board, rank
        self.saved_for: frozenset[str] = frozenset()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return
        control.should_save = True
        self.reporter.urgent = True
        if frozenset(info.preempted_node_ids) <= self.saved_for:
            return
        self.saved_for = frozenset(info.preempted_node_ids)
        if self.rank == 0 and self.board is not None:
            nodes = ", ".join(node[:12] for node in info.preempted_node_ids)
            left = (
                f", {max(0.0, info.deadline_ms / 1000 - time.time()):.0f} s before it goes" if info.deadline_ms else ""
            )
            self.board.note.remote(
                f"node {nodes} (ranks {info.preempted_ranks}) is being drained{left}: a checkpoint after every "
                f"step from step {state.global_step} until it goes"
            )


class HangWatchdog(TrainerCallback):
    """Ends this worker when it makes no progress (no step, evaluation batch, log or checkpoint)
    for run.hang_timeout_s, as a collective that never returns would: Ray then restarts the group
    from the last checkpoint (against run.max_failures). A stuck thread cannot be interrupted
    from Python, so the process exits; the cause reaches the terminal first.

    Armed from the first step to the end of training: loading the model and the final save are
    not watched."""

    def __init__(self, timeout_s: float, board: Any, rank: int):
        self.timeout_s, self.board, self.rank = timeout_s, board, rank
        self.last = time.monotonic()
        self.armed = False
        self.stopped = False

    def beat(self) -> None:
        self.last = time.monotonic()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import threading

        self.beat()
        self.armed = True
        threading.Thread(target=self._watch, name="rayft-hang-watchdog", daemon=True).start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.beat()

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.beat()

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.beat()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.beat()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stopped = True

    def _watch(self) -> None:
        while not self.stopped:
            time.sleep(min(5.0, self.timeout_s / 4))
            idle = time.monotonic() - self.last
            if idle > self.timeout_s and not self.stopped:
                message = (
                    f"rank {self.rank} made no progress for {idle:.0f} s (run.hang_timeout_s={self.timeout_s:g}): "
                    "a hung collective or a stuck worker; ending it so the group restarts from the last checkpoint"
                )
                print(f"rayft: {message}", flush=True)
                if self.board is not None:
                    with contextlib.suppress(Exception):  # the driver may be unreachable too: exit anyway
                        ray.get(self.board.note.remote(message), timeout=10)
                os._exit(70)  # EX_SOFTWARE; Ray reports the worker as died


class ProgressReporter(TrainerCallback):
    """Rank 0 posts step, loss, throughput and ETA to the driver after every log."""

    def __init__(self, board: Any, meter: TokenMeter):
        self.board, self.meter = board, meter
        self.started = time.time()
        self.start_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started, self.start_step = time.time(), state.global_step
        post(self.board, 0, phase="training", step=state.global_step, max_steps=state.max_steps)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        elapsed = time.time() - self.started
        done = state.global_step - self.start_step
        fields: dict[str, Any] = {
            "step": state.global_step,
            "max_steps": state.max_steps,
            "epoch": round(state.epoch or 0, 3),
        }
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
            if key in logs:
                fields[key] = logs[key]
        rate = self.meter.rate()
        if done > 0 and rate is not None:
            fields["tokens_per_second"] = rate
            fields["eta_seconds"] = (state.max_steps - state.global_step) * elapsed / done
        post(self.board, 0, **fields)


class MetricsTimeline(TrainerCallback):
    """Rank 0 keeps `metrics.jsonl` in the run directory: one line per log (train or eval) with
    step, wall time, tokens and tokens/s, for reports and plots. Rewritten at every checkpoint
    and at the end, so storage holds it even when a run dies; a resumed run keeps the lines up
    to the step it resumed from."""

    def __init__(self, run_dir: RunDir, meter: TokenMeter, resumed_from_step: int):
        self.path, self.meter = run_dir.metrics, meter
        previous = storage.read_text(self.path) or ""
        self.lines = [
            line
            for line in previous.splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= resumed_from_step
        ]
        self.started = time.time()
        self.offset = json.loads(self.lines[-1])["time"] if self.lines else 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.time()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        record = {
            "step": state.global_step,
            "time": round(self.offset + time.time() - self.started, 3),
            "epoch": state.epoch,
            "tokens_per_second": self.meter.rate(),
            **{k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))},
        }
        self.lines.append(json.dumps(record))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.flush()

    def flush(self) -> None:
        storage.write_text(self.path, "\n".join(self.lines) + "\n")


class SampleLog(TrainerCallback):
    """Which samples each optimizer step trained on, per rank and attempt, as JSON lines in
    `<run_dir>/samples/` (run.log_samples): proof that a resumed epoch neither repeats nor skips
    a sample, and a way to find the data behind a loss spike.

    The collator passes the rows' sample ids through the batch; the trainer pops them before the
    forward and records them against the step they belong to."""

    def __init__(self, run_dir: RunDir, rank: int, attempt_step: int):
        self.path = run_dir.sample_log(rank, attempt_step)
        self.lines: list[str] = []

    def record(self, step: int, sample_ids: list[int]) -> None:
        self.lines.append(json.dumps({"step": step, "sample_ids": sample_ids}))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.flush()  # what a crash after this checkpoint would otherwise lose

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.flush()

    def flush(self) -> None:
        storage.write_text(self.path, "\n".join(self.lines) + "\n")


class WithSampleIds:
    """A collator that also puts the rows' sample ids into the batch (as a plain list)."""

    def __init__(self, collator: Any):
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [i for feature in features for i in feature.get("sample_ids", [])]
        batch = self.collator([{k: v for k, v in f.items() if k != "sample_ids"} for f in features])
        batch["sample_ids"] = ids
        return batch


class InjectedHang(TrainerCallback):
    """Test hook (RAYFT_TEST_HANG_AT_STEP): the last rank stops for good after that step, in the
    run's first attempt only, as a worker stuck in a collective would."""

    def __init__(self, step: int, rank: int, first_attempt: bool):
        self.step, self.hangs = step, first_attempt and rank == world_size() - 1

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.hangs and state.global_step == self.step:
            while True:
                time.sleep(3600)


class StepThrottle(TrainerCallback):
    """Sleeps after every optimizer step (RAYFT_TEST_STEP_SECONDS), and holds steps for as long
    as the file `hold_file` exists (RAYFT_TEST_HOLD_FILE): every step, or, if the file names a
    step, that one and the ones after it. The fault-tolerance tests use it to kill a worker at a
    known point of a run that is otherwise over in a second, and to keep a run from finishing
    while a node takes its time to come back."""

    def __init__(self, seconds: float, hold_file: str | None = None):
        self.seconds, self.hold_file = seconds, hold_file

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        time.sleep(self.seconds)
        while self._holds(state.global_step):
            time.sleep(0.2)

    def _holds(self, step: int) -> bool:
        if not self.hold_file:
            return False
        try:
            with open(self.hold_file) as held:
                named = held.read().strip()
        except FileNotFoundError:
            return False
        # a file caught half-written holds (empty, or the first digits of a larger step)
        return not named.isdigit() or step >= int(named)


class MetricsToTracker(TrainerCallback):
    """Rank 0: every trainer log goes to the run's tracker (fire and forget: training does not
    wait for W&B); `flush` waits until all of them have arrived."""

    def __init__(self, tracker: Any, key: str):
        self.tracker, self.key = tracker, key

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not logs:
            return
        values = {_metric_name(k): v for k, v in logs.items() if isinstance(v, (int, float))}
        values["train/epoch"] = state.epoch or 0
        self.tracker.log.remote(self.key, values, state.global_step)

    def flush(self, summary: dict[str, Any]) -> None:
        # Calls from one process run in order: once this returns, every log above has landed.
        ray.get(self.tracker.summarize.remote(self.key, summary))


def _metric_name(key: str) -> str:
    if key.startswith("eval_"):
        return f"eval/{key[5:]}"
    return key if "/" in key else f"train/{key}"
