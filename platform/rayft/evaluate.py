"""What the fine-tune did: base and tuned answers to held-out prompts, side by side, scored,
and both models' loss and perplexity on the held-out split (see `rayft.eval_loss`).

Generation runs as Ray tasks (one per model and shard of prompts), so base and tuned generate
in parallel and a large eval set spreads over the cluster.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from rayft.errors import ModelError
from rayft.eval_loss import HeldOutLoss
from rayft.spec import JobSpec

SCORERS = ("exact_match", "contains", "rouge_l", "token_f1")


@dataclass
class Prompt:
    messages: list[dict[str, str]]  # the conversation up to the reply to generate
    reference: str | None


@dataclass
class Comparison:
    prompts: list[Prompt]
    answers: dict[str, list[str]]  # model label -> answers
    stopped: dict[str, list[bool]]  # ended on their own end-of-turn token
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> metric -> mean
    loss: dict[str, HeldOutLoss] = field(default_factory=dict)  # label -> held-out loss, perplexity

    def to_dict(self) -> dict[str, Any]:
        rows = [{"prompt": p.messages[-1]["content"], "reference": p.reference,
                 **{label: answers[i] for label, answers in self.answers.items()}}
                for i, p in enumerate(self.prompts)]
        return {"scores": self.scores, "rows": rows,
                "loss": {label: result.to_dict() for label, result in self.loss.items()}}


def held_out_prompts(prepared: Any, limit: int) -> list[Prompt]:
    """The first `limit` eval conversations, cut before their last assistant reply."""
    import pyarrow.parquet as pq

    prompts: list[Prompt] = []
    for path in prepared.files("eval"):
        for value in pq.read_table(path, columns=["messages"]).column("messages").to_pylist():
            if value is None:
                continue
            messages = json.loads(value)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompts.append(Prompt(messages[:last], messages[last]["content"]))
            if len(prompts) >= limit:
                return prompts
    return prompts


# ---------------------------------------------------------------------------------- scoring
def normalize(text: str) -> str:
    """Lowercase, no punctuation, articles or extra spaces (SQuAD-style answer normalization)."""
    text = text.lower().strip()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over normalized tokens (longest common subsequence)."""
    a, b = normalize(prediction).split(), normalize(reference).split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    from collections import Counter

    a, b = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(a) & Counter(b)).values())
    if not a or not b or not common:
        return float(a == b)
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, reference: str, metric: str) -> float:
    if metric == "exact_match":
        return float(normalize(prediction) == normalize(reference))
    if metric == "contains":
        return float(normalize(reference) in normalize(prediction))
    if metric == "rouge_l":
        return rouge_l(prediction, reference)
    if metric == "token_f1":
        return token_f1(prediction, reference)
    raise ValueError(f"unknown metric {metric!r}; expected one of {SCORERS}")


def mean_scores(answers: Sequence[str], prompts: Sequence[Prompt], metrics: Sequence[str],
                stopped: Sequence[bool]) -> dict[str, float]:
    pairs = [(a, p.reference) for a, p in zip(answers, prompts) if p.reference is not None]
    out = {m: sum(score(a, r, m) for a, r in pairs) / len(pairs) for m in metrics} if pairs else {}
    out["stop_rate"] = sum(stopped) / len(stopped) if stopped else 0.0
    return out


# ------------------------------------------------------------------------------- generation
def generate(model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
             batch_size: int = 8) -> tuple[list[str], list[bool]]:
    """Answers to chat prompts with the tokenizer's chat template, in left-padded batches.
    Returns the answers and whether each stopped on an end-of-turn token by itself."""
    import torch

    stop_ids = end_of_turn_ids(tokenizer)
    tokenizer.padding_side = "left"
    answers, stopped = [], []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    temperature=temperature if do_sample else None,
                                    top_p=top_p if do_sample else None, eos_token_id=stop_ids,
                                    pad_token_id=tokenizer.pad_token_id)
        for row in output[:, inputs["input_ids"].shape[1]:].tolist():
            ended = next((i for i, t in enumerate(row) if t in stop_ids), None)
            stopped.append(ended is not None)
            answers.append(tokenizer.decode(row[:ended], skip_special_tokens=True).strip())
    return answers, stopped


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """EOS plus the template's end-of-turn token when it is a single token (e.g. <|im_end|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if tokenizer.chat_template:
        from rayft.data.templates import ChatTemplate

        marker = ChatTemplate("tokenizer", tokenizer.chat_template, tokenizer.bos_token or "",
                              tokenizer.eos_token or "").end_of_turn().strip()
        encoded = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
        if len(encoded) == 1:
            ids.add(encoded[0])
    return sorted(ids)


def load_for_generation(model_dir: str, adapter_dir: str | None = None, spec: JobSpec | None = None) -> tuple[Any, Any]:
    """A model directory, optionally with a LoRA adapter on top -> (model, tokenizer). A QLoRA
    adapter goes on the dequantized 4-bit base it was trained against (see export.load_base).
    With a spec, a plain model loads in the dtype an adapter's base gets, so that base and
    tuned models of one run compute alike."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.export import load_base

    trust = bool(spec and spec.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir or model_dir, trust_remote_code=trust)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base(spec, model_dir), adapter_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust, dtype=_dtype(spec))
    return model, tokenizer


def _dtype(spec: JobSpec | None) -> Any:
    import torch

    if spec is None:
        return "auto"
    return torch.float32 if spec.model.dtype == "auto" else getattr(torch, spec.model.dtype)


def load_trained(path: str) -> tuple[Any, Any]:
    """Whatever `rayft export` accepts (run, checkpoint, model dir) -> (model, tokenizer)."""
    from rayft.export import resolve_trained

    trained = resolve_trained(path)
    if trained.adapter:
        return load_for_generation(trained.base_dir, trained.model_dir, trained.spec)
    return load_for_generation(trained.model_dir, None, trained.spec)


def task_device() -> str:
    """Inside a Ray task: the GPU Ray gave it (CUDA_VISIBLE_DEVICES), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_on_this_node(model_dir: str, adapter_dir: str | None, spec: dict[str, Any]) -> tuple[Any, Any]:
    """load_for_generation inside a Ray task, which may run on another node than the driver: a
    model in object storage is downloaded here, and a base that the driver converted into its
    local cache (e.g. from GGUF) is converted here too, as training workers do."""
    import os
    import tempfile

    from rayft import storage
    from rayft.model import materialized_dir, model_cache_root

    job = JobSpec.model_validate(spec)
    if not os.path.isdir(model_dir) and model_dir.startswith(model_cache_root(job)):
        model_dir = materialized_dir(job)
    if adapter_dir and "://" in adapter_dir:
        adapter_dir = storage.download_dir(adapter_dir, tempfile.mkdtemp(prefix="rayft-adapter-"))
    elif "://" in model_dir:
        model_dir = storage.download_dir(model_dir, tempfile.mkdtemp(prefix="rayft-model-"))
    return load_for_generation(model_dir, adapter_dir, job)


def _generate_task(model_dir: str, adapter_dir: str | None, spec: dict[str, Any], chat_template: str | None,
                   prompts: list[Prompt], options: dict[str, Any]) -> tuple[list[str], list[bool]]:
    import torch

    from rayft.train.logs import quiet_worker

    quiet_worker()
    torch.set_num_threads(1)
    model, tokenizer = load_on_this_node(model_dir, adapter_dir, spec)
    model.to(task_device())
    if chat_template and not adapter_dir:
        tokenizer.chat_template = chat_template  # the base is prompted exactly like the tuned model
    return generate(model, tokenizer, prompts, **options)


MIN_PROMPTS_PER_SHARD = 32  # below this, loading the model again costs more than it saves


def compare(spec: JobSpec, models: dict[str, tuple[str, str | None]], prompts: list[Prompt],
            chat_template: str | None, shards: int | None = None) -> Comparison:
    """Generate with each model (label -> (model dir, LoRA adapter dir or None)) on Ray tasks,
    `shards` tasks per model (default: from the number of prompts and the cluster's CPUs or
    GPUs), then score."""
    import ray

    from rayft.eval_loss import shard_count, task_options

    options = {"max_new_tokens": spec.eval.max_new_tokens, "do_sample": spec.eval.do_sample,
               "temperature": spec.eval.temperature, "top_p": spec.eval.top_p}
    task = ray.remote(**task_options(spec))(_generate_task)
    shards = shards or shard_count(len(prompts), MIN_PROMPTS_PER_SHARD, len(models), spec)
    size = max(1, -(-len(prompts) // shards))
    pieces = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    spec_dict = spec.model_dump(mode="json")
    futures = {label: [task.remote(b, a, spec_dict, chat_template, piece, options) for piece in pieces]
               for label, (b, a) in models.items()}
    answers, stopped = {}, {}
    for label, refs in futures.items():
        results = ray.get(refs)
        answers[label] = [a for r in results for a in r[0]]
        stopped[label] = [s for r in results for s in r[1]]
    comparison = Comparison(prompts, answers, stopped)
    comparison.scores = {label: mean_scores(answers[label], prompts, spec.eval.metrics, stopped[label])
                         for label in answers}
    return comparison


def evaluate_models(spec: JobSpec, models: dict[str, tuple[str, str | None]], prepared_root: str,
                    chat_template: str | None) -> Comparison:
    """Each model's loss on the held-out split and, when `eval.num_prompts`, its answers to the
    held-out prompts. The loss tasks start first and run while the models generate."""
    from rayft.data.prepare import Prepared, read_stats
    from rayft.eval_loss import collect_held_out_loss, submit_held_out_loss

    losses = submit_held_out_loss(spec, models, prepared_root)
    prepared = Prepared(prepared_root, "", read_stats(prepared_root) or {})
    prompts = held_out_prompts(prepared, spec.eval.num_prompts) if spec.eval.num_prompts else []
    comparison = compare(spec, models, prompts, chat_template) if prompts else Comparison([], {}, {})
    comparison.loss = collect_held_out_loss(losses)
    return comparison


def before_after(spec: JobSpec, summary: Any) -> Comparison:
    """Base vs tuned on the held-out split and prompts of a finished run; saved as eval.json
    beside it."""
    from rayft import storage

    # the model's storage path, not a local copy: the tasks may run on other nodes
    tuned_dir = summary.model_dir
    tuned = (summary.base_model_dir, tuned_dir) if spec.method.kind != "full" else (tuned_dir, None)
    comparison = evaluate_models(spec, {"base": (summary.base_model_dir, None), "tuned": tuned},
                                 summary.prepared, summary.chat_template)
    storage.write_json(f"{summary.run_dir}/eval.json", comparison.to_dict())
    return comparison


def evaluate_run(spec: JobSpec, checkpoint: str | None = None, *,
                 log: Callable[[str], None] = print) -> tuple[Comparison, str]:
    """`rayft eval`: the spec's base model vs its finished run's final model (or `checkpoint`:
    any run, checkpoint or model directory), on the spec's held-out data (prepared, or reused
    from the cache). Writes <run>/eval.json, or <run>/eval-<checkpoint>.json for a checkpoint,
    and returns the comparison and that path."""
    from rayft import storage
    from rayft.data.prepare import prepare
    from rayft.data.templates import resolve_template
    from rayft.model import load_tokenizer

    models = run_models(spec, checkpoint)
    tokenizer = load_tokenizer(spec, models["base"][0])
    prepared = prepare(spec, tokenizer, log=log)
    template = resolve_template(spec.data.template, tokenizer).source
    comparison = evaluate_models(spec, models, prepared.root, template)
    out = result_path(spec, "eval", checkpoint)
    storage.write_json(out, comparison.to_dict())
    return comparison, out


def run_models(spec: JobSpec, checkpoint: str | None = None) -> dict[str, tuple[str, str | None]]:
    """"base" (the spec's model) and "tuned" (the run's final model, or `checkpoint`), each as
    (model dir, LoRA adapter dir or None)."""
    import os
    import tempfile

    from rayft import storage
    from rayft.export import resolve_trained
    from rayft.model import materialized_dir

    source = str(checkpoint) if checkpoint else f"{storage.run_dir(spec)}/model"
    if not storage.exists(source):
        hint = "check --checkpoint" if checkpoint else "train it first (rayft train) or pass --checkpoint PATH"
        raise ModelError(f"{source} does not exist: {hint}")
    local = storage.download_dir(source, tempfile.mkdtemp(prefix="rayft-tuned-"))
    trained = resolve_trained(local)
    # The tasks get the model's path in storage (they may run on other nodes), the directory
    # that resolve_trained found inside the local copy.
    inside = os.path.relpath(trained.model_dir, local)
    where = source.rstrip("/") if inside == "." else f"{source.rstrip('/')}/{inside}"
    base_dir = materialized_dir(spec)
    # An adapter goes on the spec's base (the model it was trained from), wherever it was trained.
    tuned = (base_dir, where) if trained.adapter else (where, None)
    return {"base": (base_dir, None), "tuned": tuned}


def result_path(spec: JobSpec, stem: str, checkpoint: str | None = None) -> str:
    """<run>/eval.json for the run's final model, <run>/eval-checkpoint_000040.json for a checkpoint."""
    from rayft import storage

    suffix = f"-{_checkpoint_name(str(checkpoint))}" if checkpoint else ""
    return f"{storage.run_dir(spec)}/{stem}{suffix}.json"


def _checkpoint_name(path: str) -> str:
    """runs/x/checkpoint_000040[/checkpoint] -> checkpoint_000040"""
    from rayft.export import HF_CHECKPOINT

    parts = [p for p in path.rstrip("/").split("/") if p]
    if len(parts) > 1 and parts[-1] in (HF_CHECKPOINT, "model"):
        parts = parts[:-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", parts[-1]) if parts else "checkpoint"
