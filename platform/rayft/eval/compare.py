"""What the fine-tune did: base and tuned models on the held-out split (loss and perplexity on
the same tokens, rayft.eval.loss) and on held-out prompts (answers side by side, scored).

One path for both callers: the end of `rayft train` (`before_after`: the run just trained) and
`rayft eval` (`evaluate_run`: a finished run's model, or any checkpoint). Generation and loss run
as Ray tasks (one per model and shard), so base and tuned are evaluated in parallel and a large
eval set spreads over the cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rayft import storage
from rayft.env import share_secrets
from rayft.errors import ModelError
from rayft.eval.generation import Prompt, generate, held_out_prompts
from rayft.eval.loss import HeldOutLoss, collect_held_out_loss, submit_held_out_loss
from rayft.eval.scoring import mean_scores
from rayft.eval.tasks import ModelRef, load_on_this_node, shard_count, task_options
from rayft.rundir import HF_CHECKPOINT
from rayft.spec import JobSpec
from rayft.train.result import RunSummary
from rayft.train.run import RunPlan

MIN_PROMPTS_PER_SHARD = 32  # below this, loading the model again costs more than it saves


@dataclass
class Comparison:
    prompts: list[Prompt]
    answers: dict[str, list[str]]  # model label -> answers
    stopped: dict[str, list[bool]]  # ended on their own end-of-turn token
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> metric -> mean
    loss: dict[str, HeldOutLoss] = field(default_factory=dict)  # label -> held-out loss, perplexity

    def to_dict(self) -> dict[str, Any]:
        rows = [
            {
                "prompt": p.messages[-1]["content"],
                "reference": p.reference,
                **{label: answers[i] for label, answers in self.answers.items()},
            }
            for i, p in enumerate(self.prompts)
        ]
        return {
            "scores": self.scores,
            "rows": rows,
            "loss": {label: result.to_dict() for label, result in self.loss.items()},
        }


# ------------------------------------------------------------------------------ callers
def before_after(plan: RunPlan, summary: RunSummary) -> Comparison:
    """Base vs the model the run just trained; saved as <run>/eval.json."""
    tuned = (plan.model_dir, summary.model_dir) if plan.spec.method.kind != "full" else (summary.model_dir, None)
    comparison = evaluate_models(plan, {"base": (plan.model_dir, None), "tuned": tuned})
    storage.write_json(plan.run_dir.eval_result(), comparison.to_dict())
    return comparison


def evaluate_run(plan: RunPlan, checkpoint: str | None = None) -> tuple[Comparison, str]:
    """`rayft eval`: the spec's base model vs its finished run's final model (or `checkpoint`:
    any run, checkpoint or model directory), on the plan's held-out data. Writes
    <run>/eval.json, or <run>/eval-<checkpoint>.json for a checkpoint, and returns the
    comparison and that path."""
    comparison = evaluate_models(plan, run_models(plan, checkpoint))
    out = plan.run_dir.eval_result("eval", checkpoint)
    storage.write_json(out, comparison.to_dict())
    return comparison, out


def run_models(plan: RunPlan, checkpoint: str | None = None) -> dict[str, ModelRef]:
    """ "base" (the spec's model) and "tuned" (the run's final model, or `checkpoint`), where
    they are in storage (evaluation tasks may run on other nodes)."""
    source = str(checkpoint) if checkpoint else plan.run_dir.model
    where, adapter = locate_trained(
        source, hint="check --checkpoint" if checkpoint else "train it first (rayft train) or pass --checkpoint PATH"
    )
    # An adapter goes on the spec's base (the model it was trained from), wherever it was trained.
    tuned = (plan.model_dir, where) if adapter else (where, None)
    return {"base": (plan.model_dir, None), "tuned": tuned}


def locate_trained(source: str, hint: str) -> tuple[str, bool]:
    """(the model directory inside `source` (a run's model/, a checkpoint, or a model
    directory), whether it is a LoRA adapter), looked up in storage without downloading it."""
    if not storage.exists(source):
        raise ModelError(f"{source} does not exist: {hint}")
    for candidate in (f"{source}/model", f"{source}/{HF_CHECKPOINT}", source):
        if storage.exists(f"{candidate}/adapter_config.json"):
            return candidate, True
        if storage.exists(f"{candidate}/config.json"):
            return candidate, False
    raise ModelError(
        f"{source} holds no trained model: expected a run directory (with model/), a checkpoint, "
        "or a directory with adapter_config.json or config.json"
    )


# --------------------------------------------------------------------------- evaluation
def evaluate_models(plan: RunPlan, models: dict[str, ModelRef]) -> Comparison:
    """Each model's loss on the held-out split and, when `eval.num_prompts`, its answers to the
    held-out prompts. The loss tasks start first and run while the models generate."""
    spec = plan.spec
    losses = submit_held_out_loss(spec, models, plan.prepared)
    prompts = held_out_prompts(plan.prepared, spec.eval.num_prompts) if spec.eval.num_prompts else []
    comparison = compare(spec, models, prompts, plan.prepared.template) if prompts else Comparison([], {}, {})
    comparison.loss = collect_held_out_loss(losses)
    return comparison


def compare(
    spec: JobSpec,
    models: dict[str, ModelRef],
    prompts: list[Prompt],
    chat_template: str | None,
    shards: int | None = None,
) -> Comparison:
    """Generate with each model on Ray tasks, `shards` tasks per model (default: from the
    number of prompts and the cluster's CPUs or GPUs), then score."""
    import ray

    options = {
        "max_new_tokens": spec.eval.max_new_tokens,
        "do_sample": spec.eval.do_sample,
        "temperature": spec.eval.temperature,
        "top_p": spec.eval.top_p,
    }
    task = ray.remote(**task_options(spec))(_generate_task)
    shards = shards or shard_count(len(prompts), MIN_PROMPTS_PER_SHARD, len(models), spec)
    size = max(1, math.ceil(len(prompts) / shards))
    pieces = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    secrets = share_secrets(spec)
    futures = {
        label: [task.remote(model, spec, chat_template, piece, options, secrets) for piece in pieces]
        for label, model in models.items()
    }
    answers, stopped = {}, {}
    for label, refs in futures.items():
        results = ray.get(refs)
        answers[label] = [a for r in results for a in r[0]]
        stopped[label] = [s for r in results for s in r[1]]
    comparison = Comparison(prompts, answers, stopped)
    references = [p.reference for p in prompts]
    comparison.scores = {
        label: mean_scores(answers[label], references, spec.eval.metrics, stopped[label]) for label in answers
    }
    return comparison


def _generate_task(
    model: ModelRef,
    spec: JobSpec,
    chat_template: str | None,
    prompts: list[Prompt],
    options: dict[str, Any],
    secrets: Any,
) -> tuple[list[str], list[bool]]:
    loaded, tokenizer = load_on_this_node(model, spec, secrets)
    if chat_template and not model[1]:
        tokenizer.chat_template = chat_template  # the base is prompted exactly like the tuned model
    return generate(loaded, tokenizer, prompts, **options)
