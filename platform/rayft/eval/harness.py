"""EleutherAI's lm-evaluation-harness on trained models, when the `lm-eval` package is installed.

Tasks are the harness's own (their data must be reachable: on a machine without network, in
the HF datasets cache) or task YAML files in `include_path`, e.g. one that reads a local
JSONL with `dataset_path: json`. A LoRA adapter is evaluated on its base through the harness's
`peft` model argument; a full or merged model directly. Results are saved as lm_eval.json in
the run directory, where the report picks them up.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from typing import Any

from rayft import storage
from rayft.errors import RayftError
from rayft.eval.compare import run_models
from rayft.quiet import quiet_worker
from rayft.train.run import RunPlan


class HarnessError(RayftError):
    """lm-eval missing, or a task it does not know."""


def available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def run_tasks(
    model_dir: str,
    tasks: Sequence[str],
    *,
    adapter_dir: str | None = None,
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> dict[str, dict[str, float]]:
    """One model on the harness's tasks -> task -> metric -> value (no bootstrap stderr: it
    costs more than the evaluation of a small task)."""
    if not available():
        raise HarnessError("lm-eval is not installed: pip install lm-eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    quiet_worker()  # transformers' and datasets' progress bars and advisories

    manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else " (give --harness-include DIR for task YAML files)"
        raise HarnessError(f"lm-eval task(s) not found: {', '.join(unknown)}: not among the harness's tasks{where}")
    model_args: dict[str, Any] = {"pretrained": model_dir, "trust_remote_code": trust_remote_code}
    if adapter_dir:
        model_args["peft"] = adapter_dir
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        log_samples=False,
        bootstrap_iters=0,
    )
    return {task: _numbers(values) for task, values in results["results"].items()}


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """{"acc,none": 0.5, "alias": "x", "sample_len": 3, "acc_stderr,none": "N/A"} -> {"acc": 0.5}"""
    out = {}
    for key, value in values.items():
        if "," not in key:  # name, alias, sample_len: not metrics
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metric, _, filter_name = key.partition(",")
            out[metric if filter_name in ("", "none") else key] = float(value)
    return out


def compare_on_tasks(models: dict[str, tuple[str, str | None]], tasks: Sequence[str], **options: Any) -> dict[str, Any]:
    """label -> (model dir, LoRA adapter dir or None) -> label -> task -> metric -> value."""
    return {
        label: run_tasks(model_dir, tasks, adapter_dir=adapter, **options)
        for label, (model_dir, adapter) in models.items()
    }


def evaluate_run_on_tasks(
    plan: RunPlan, tasks: Sequence[str], checkpoint: str | None = None, **options: Any
) -> tuple[dict[str, Any], str]:
    """`rayft eval --harness-task`: base and tuned (as `rayft eval` picks them) on the tasks;
    saved as <run>/lm_eval.json (lm_eval-<checkpoint>.json for a checkpoint)."""
    models = {
        label: (_local(model_dir) or model_dir, _local(adapter))
        for label, (model_dir, adapter) in run_models(plan, checkpoint).items()
    }
    results = compare_on_tasks(models, tasks, trust_remote_code=plan.spec.model.trust_remote_code, **options)
    out = plan.run_dir.eval_result("lm_eval", checkpoint)
    storage.write_json(out, results)
    return results, out


def _local(path: str | None) -> str | None:
    """The harness reads local directories only: a model in object storage is downloaded."""
    if not path or not storage.is_remote(path):
        return path
    return storage.download_dir(path, tempfile.mkdtemp(prefix="rayft-harness-"))
