"""The layout of a job's storage: one home for every file name rayft writes.

<run.storage_path>/                 storage root (a local/NFS path or s3:// gs://)
  <run.name>/                       a run directory (RunDir)
    .rayft-run                      marks a directory rayft made (`--fresh` deletes only those)
    spec.yaml                       the resolved spec, secrets hidden
    command.json                    the rayft command that made the run (for the model card)
    summary.json                    the run summary (rayft.train.result.RunSummary)
    metrics.jsonl                   one line per trainer log: step, time, losses, tokens/s
    eval.json, eval-<ckpt>.json     held-out loss and base-vs-tuned answers
    lm_eval.json                    lm-evaluation-harness results
    model/, model-merged/           the trained model (adapter or weights), LoRA merged; each with README.md
    export/                         `rayft export RUN`'s default output (merged, GGUF, Modelfile, README.md)
    checkpoint_000040/checkpoint/   Ray Train checkpoints, each holding an HF checkpoint
    checkpoint_manager_snapshot.json  Ray Train's checkpoint registry (read to resume)
    samples/                        which samples each step trained on (run.log_samples)
    wandb/                          W&B run files (offline mode)
    report/                         report.md, report.html and the plots
  prepared/<key>/                   prepared data (unless data.cache_dir says elsewhere)
  .models/<name>-<digest>/          models converted once (GGUF -> safetensors)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rayft import __version__, storage
from rayft.errors import SpecError
from rayft.machine_cache import home
from rayft.spec import JobSpec
from rayft.storage import Location, is_remote

# Ray Train's name for the directory inside each of its checkpoints that holds the HF checkpoint
# (RayTrainReportCallback.CHECKPOINT_NAME); stated here so that readers need not import Ray.
HF_CHECKPOINT = "checkpoint"
RAY_CHECKPOINT_REGISTRY = "checkpoint_manager_snapshot.json"
RUN_MARKER, SWEEP_MARKER = ".rayft-run", ".rayft-sweep"


@dataclass(frozen=True)
class RunDir:
    """A run directory's named paths (strings: local absolute paths or URIs)."""

    path: str

    @classmethod
    def of(cls, spec: JobSpec) -> RunDir:
        return cls(str(storage_root(spec).join(spec.run_name)))

    @classmethod
    def at(cls, path: str) -> RunDir:
        return cls(str(Location.of(path)))

    def _file(self, name: str) -> str:
        return f"{self.path}/{name}"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def remote(self) -> bool:
        return is_remote(self.path)

    marker = property(lambda self: self._file(RUN_MARKER))
    spec = property(lambda self: self._file("spec.yaml"))
    command = property(lambda self: self._file("command.json"))
    summary = property(lambda self: self._file("summary.json"))
    metrics = property(lambda self: self._file("metrics.jsonl"))
    lm_eval = property(lambda self: self._file("lm_eval.json"))
    model = property(lambda self: self._file("model"))
    merged_model = property(lambda self: self._file("model-merged"))
    export = property(lambda self: self._file("export"))
    checkpoint_registry = property(lambda self: self._file(RAY_CHECKPOINT_REGISTRY))
    samples = property(lambda self: self._file("samples"))
    wandb = property(lambda self: self._file("wandb"))
    report = property(lambda self: self._file("report"))

    def eval_result(self, stem: str = "eval", checkpoint: str | None = None) -> str:
        """eval.json for the run's final model, eval-checkpoint_000040.json for a checkpoint."""
        return self._file(f"{stem}-{checkpoint_name(checkpoint)}.json" if checkpoint else f"{stem}.json")

    def checkpoint(self, step: int) -> str:
        return self._file(checkpoint_dir_name(step))

    def sample_log(self, rank: int, from_step: int) -> str:
        return f"{self.samples}/rank{rank}-from-step{from_step}.jsonl"


def mark(directory: str, marker: str = RUN_MARKER) -> None:
    """Say that rayft made `directory` (a run's, or a sweep's with SWEEP_MARKER)."""
    storage.write_text(f"{directory}/{marker}", f"made by rayft {__version__}\n")


def delete_for_fresh_start(directory: str, marker: str = RUN_MARKER) -> None:
    """`--fresh`: delete a run's (or sweep's) directory, only when rayft made it: a run name or
    storage path that points anywhere else deletes nothing."""
    if not storage.exists(directory):
        return
    if not storage.exists(f"{directory}/{marker}"):
        what = "sweep" if marker == SWEEP_MARKER else "run"
        raise SpecError(
            f"{directory} exists but holds no {what} of rayft's (no {marker} in it), so --fresh will not "
            f"delete it: choose another run.name, or remove the directory yourself",
            field="run.name",
        )
    storage.delete_dir(directory)


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:06d}"


# The metric Ray Train ranks checkpoints by (run.checkpoint_metric of the checkpoint's own
# weights, rayft.train.callbacks.checkpoint_metrics), and what a checkpoint without one scores:
# finite, so that it survives Ray's JSON snapshot of its checkpoint list (NaN comes back as null,
# which Ray cannot compare), and worse than any real value in either checkpoint_mode.
CHECKPOINT_SCORE = "checkpoint_score"
UNRANKED = 1e300


def checkpoint_name(path: str) -> str:
    """runs/x/checkpoint_000040[/checkpoint] -> checkpoint_000040 (safe as a file name part)."""
    parts = [p for p in str(path).rstrip("/").split("/") if p]
    if len(parts) > 1 and parts[-1] in (HF_CHECKPOINT, "model"):
        parts = parts[:-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", parts[-1]) if parts else "checkpoint"


def storage_root(spec: JobSpec) -> Location:
    return Location.of(spec.run.storage_path)


def prepared_base(spec: JobSpec) -> Location:
    """Where prepared datasets live: data.cache_dir, else <run.storage_path>/prepared."""
    if spec.data.cache_dir:
        return Location.of(spec.data.cache_dir)
    return storage_root(spec).join("prepared")


def models_cache(spec: JobSpec) -> Location:
    """Where converted models go, once per cluster: beside the runs, shared like them."""
    return storage_root(spec).join(".models")


def local_models(spec: JobSpec) -> str:
    """Where this node's from_pretrained reads converted models (it reads local directories):
    models_cache itself when that is a path, else this node's copy of what object storage holds."""
    shared = models_cache(spec)
    return str(home() / "models") if shared.remote else str(shared)
