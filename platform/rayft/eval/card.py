"""Model cards: the README.md in every model directory rayft saves (the run's model/ and
model-merged/, and every `rayft export`), ready for `hf upload` as it is.

A card has the Hugging Face metadata header (YAML front matter, written by huggingface_hub's
ModelCardData: base_model, library_name, license, datasets, tags, pipeline_tag) and says how the
model was made: method and hyperparameters, data sources with their record counts and filters,
the held-out evaluation, the run's figures, the exact rayft command and the resolved spec.
Everything comes from the run directory's files (spec.yaml, summary.json, eval.json,
command.json, the prepared data's stats.json), like the report, so a card can be rewritten at
any time (`rayft train` writes them after its evaluation, `rayft eval` refreshes them). Secrets:
spec.yaml is stored redacted, and the whole text goes through rayft.spec.secrets once more.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from rayft import __version__, storage
from rayft.data.prepared import dropped as drop_reasons
from rayft.data.prepared import read_stats
from rayft.eval.report import Block, to_markdown
from rayft.model.gguf_header import read_metadata
from rayft.model.ollama import ollama_tag
from rayft.model.source import resolve_source
from rayft.model.trained import Exported, adapter_base
from rayft.rundir import RunDir
from rayft.spec import ModelSpec
from rayft.spec.secrets import redact, redact_text
from rayft.train.result import wall_time_line

CARD = "README.md"
KINDS = ("adapter", "merged", "full", "gguf")
HUB_URL = re.compile(r"^https?://huggingface\.co/(?P<repo>[\w.-]+/[\w.-]+)/?$")


@dataclass
class ModelFacts:
    """What a card says, gathered from a run directory (or from the model alone)."""

    kind: str  # adapter | merged | full | gguf
    name: str
    spec: dict[str, Any] = field(default_factory=dict)  # the resolved spec, redacted
    summary: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # the prepared data's stats.json
    command: str | None = None  # the rayft command that trained it
    export_command: str | None = None
    base: str | None = None  # the base model as the spec names it (a path or hub id)
    files: list[str] = field(default_factory=list)  # what the directory holds, for "How to use"
    gguf: dict[str, Any] = field(default_factory=dict)  # file, quantization, bytes, modelfile
    weights: bool = False  # besides a GGUF, HF safetensors (a merged export)
    repo_id: str | None = None  # the hub repo it is pushed to, when known


# ---------------------------------------------------------------------------- gathering
def run_facts(run_dir: str, kind: str, *, name: str | None = None) -> ModelFacts:
    """The facts a run directory holds (missing files leave their sections out)."""
    run = RunDir.at(run_dir)
    spec = yaml.safe_load(storage.read_text(run.spec) or "{}") or {}
    summary = _json(run.summary)
    command = _json(run.command).get("command")
    stats = read_stats(summary["prepared"]) if summary.get("prepared") else None
    return ModelFacts(
        kind=kind,
        name=name or spec.get("run", {}).get("name") or run.name,
        spec=redact(spec),
        summary=summary,
        evaluation=_json(run.eval_result()),
        stats=stats or {},
        command=command,
        base=(spec.get("model") or {}).get("path"),
    )


def _json(path: str) -> dict[str, Any]:
    text = storage.read_text(path)
    return json.loads(text) if text else {}


def base_repo(base: str | None) -> str | None:
    """The base model's hub id, where one is known: the spec names it, or its GGUF records it."""
    if not base:
        return None
    try:
        source = resolve_source(ModelSpec(path=base))
    except Exception:  # a path that is gone: the card still names it in the text
        return None
    if not source.local:
        return source.location
    if source.gguf_file:
        fields = _gguf_fields(os.path.join(source.location, source.gguf_file))
        for key in ("general.base_model.0.repo_url", "general.repo_url", "general.source.repo_url"):
            found = HUB_URL.match(str(fields.get(key, "")))
            if found:
                return found["repo"]
    return None


def base_license(base: str | None) -> str | None:
    """The base model's license: its README front matter (a local directory or the hub cache),
    or its GGUF header. Nothing is downloaded."""
    if not base:
        return None
    try:
        source = resolve_source(ModelSpec(path=base))
    except Exception:
        return None
    if source.gguf_file:
        value = _gguf_fields(os.path.join(source.location, source.gguf_file)).get("general.license")
        return str(value) if value else None
    readme: str | None = os.path.join(source.location, CARD)
    if not source.local:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.location, CARD)
        readme = cached if isinstance(cached, str) else None
    if not readme or not os.path.isfile(readme):
        return None
    from huggingface_hub import metadata_load

    value = (metadata_load(readme) or {}).get("license")
    return str(value) if value else None


@functools.lru_cache(maxsize=8)
def _gguf_fields(path: str) -> dict[str, Any]:
    """A GGUF header's general.* values (the header only: no tensor, no vocabulary is read)."""
    try:
        return read_metadata(path, lambda key: key.startswith("general."))
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------- the header
def front_matter(facts: ModelFacts) -> dict[str, Any]:
    """The metadata the hub reads: https://huggingface.co/docs/hub/model-cards#model-card-metadata"""
    method = (facts.spec.get("method") or {}).get("kind")
    datasets = [
        source["path"][3:]
        for source in _sources(facts.spec)
        if isinstance(source.get("path"), str) and source["path"].startswith("hf:")
    ]
    tags = ["rayft", "sft", "trl", *([method] if method else []), *(["gguf"] if facts.gguf else [])]
    library = {"adapter": "peft", "merged": "transformers", "full": "transformers"}.get(facts.kind)
    if facts.kind == "gguf" and facts.weights:
        library = "transformers"
    data = {
        "base_model": base_repo(facts.base),
        "library_name": library,
        "license": base_license(facts.base),
        "datasets": datasets or None,
        "tags": tags,
        "pipeline_tag": "text-generation",
    }
    return {key: value for key, value in data.items() if value is not None}


def _header_yaml(data: dict[str, Any]) -> str:
    from huggingface_hub import ModelCardData

    return ModelCardData(**data).to_yaml()


# ------------------------------------------------------------------------------ the body
def card_text(facts: ModelFacts) -> str:
    """The whole README.md: front matter, then the sections, secrets hidden."""
    blocks: list[Block] = [("h", 1, facts.name), ("p", _intro(facts))]
    blocks += _usage_blocks(facts)
    blocks += _method_blocks(facts.spec)
    blocks += _data_blocks(facts.spec, facts.stats)
    blocks += _evaluation_blocks(facts.evaluation)
    blocks += _run_blocks(facts.summary, facts.spec)
    blocks += _reproduce_blocks(facts)
    body = to_markdown(blocks)
    text = f"---\n{_header_yaml(front_matter(facts))}\n---\n\n{body}"
    return redact_text(text)


def _intro(facts: ModelFacts) -> str:
    what = {
        "adapter": "A LoRA adapter (PEFT)",
        "merged": "A model with its LoRA adapter merged into the base weights (safetensors)",
        "full": "A fully fine-tuned model (safetensors)",
        "gguf": "A GGUF file for llama.cpp and Ollama"
        + (" and the merged model's safetensors" if facts.weights else ""),
    }[facts.kind]
    base = f" of `{facts.base}`" if facts.base else ""
    steps = facts.summary.get("steps")
    trained = f", trained for {steps} optimizer steps" if steps else ""
    return f"{what}{base}: supervised fine-tuning with rayft {__version__}{trained}."


def _usage_blocks(facts: ModelFacts) -> list[Block]:
    repo = facts.repo_id or "REPO_ID"  # what it is pushed as; a local directory works the same
    out: list[Block] = [("h", 2, "How to use")]
    if facts.kind == "adapter":
        code = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")'
        )
        out.append(("code", code, "python"))
    if facts.kind in ("merged", "full") or facts.weights:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")'
        )
        out.append(("code", code, "python"))
    if facts.gguf:
        gguf = facts.gguf
        lines = [f"llama-cli -m {gguf['file']} -cnv      # llama.cpp"]
        if gguf.get("modelfile"):
            tag = ollama_tag(facts.name)
            lines.append(f"ollama create {tag} -f Modelfile && ollama run {tag}      # Ollama")
        out.append(("code", "\n".join(lines), "bash"))
        kept = gguf.get("kept_in_f16") or []
        out.append(
            (
                "p",
                f"`{gguf['file']}`: {gguf['quantization']}, {_size(gguf['bytes'])}; norms in float32"
                + (f", {len(kept)} weight(s) in float16 (rows not a multiple of the block size)" if kept else "")
                + ". Written by llama.cpp's gguf package; transformers' GGUF reader loads it back "
                "(`from_pretrained(dir, gguf_file=...)`).",
            )
        )
    out.append(("p", f"Push this directory as it is: `hf upload {repo} .` (or `rayft export ... --push-to-hub`)."))
    return out


def _size(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:,.2f} GB"
    return f"{count / 1e6:,.1f} MB" if count >= 1e6 else f"{count / 1e3:,.0f} kB"


def _method_blocks(spec: dict[str, Any]) -> list[Block]:
    if not spec:
        return []
    method, train, data = spec.get("method", {}), spec.get("train", {}), spec.get("data", {})
    scaling = spec.get("scaling", {})
    rows = [["method", method.get("kind", "-")]]
    if method.get("kind") in ("lora", "qlora"):
        lora = method.get("lora", {})
        rows.append(
            [
                "LoRA",
                f"r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
                f"targets={_inline_list(lora.get('target_modules'))}"
                + (", DoRA" if lora.get("use_dora") else "")
                + (", rsLoRA" if lora.get("use_rslora") else ""),
            ]
        )
    if method.get("kind") == "qlora":
        quant = method.get("quantization", {})
        rows.append(
            [
                "quantization",
                f"4-bit {quant.get('quant_type')}, double quant {quant.get('double_quant')}, "
                f"compute {quant.get('compute_dtype')}",
            ]
        )
    if method.get("deepspeed"):
        rows.append(["DeepSpeed", str(method["deepspeed"])])
    rows += [
        ["precision", str(method.get("precision"))],
        ["gradient checkpointing", str(method.get("gradient_checkpointing"))],
        [
            "batch",
            f"{train.get('global_batch_size')} sequences a step (micro-batch {train.get('micro_batch_size')} "
            f"x {scaling.get('num_workers')} worker(s) x accumulation)",
        ],
        [
            "length",
            f"{train.get('max_steps')} steps" if train.get("max_steps") else f"{train.get('epochs')} epoch(s)",
        ],
        ["learning rate", f"{train.get('learning_rate')} ({train.get('lr_scheduler')}, warmup {train.get('warmup')})"],
        ["optimizer", f"{train.get('optimizer')}, weight decay {train.get('weight_decay')}"],
        ["max grad norm", str(train.get("max_grad_norm"))],
        ["sequence length", f"{data.get('max_length')} tokens, packing {data.get('packing')}"],
        ["seed", str(train.get("seed"))],
    ]
    return [("h", 2, "Training method and hyperparameters"), ("table", ["", "value"], rows)]


def _inline_list(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _sources(spec: dict[str, Any]) -> list[dict[str, Any]]:
    data = spec.get("data") or {}
    return [*(data.get("train") or []), *(data.get("eval") or [])]


def _data_blocks(spec: dict[str, Any], stats: dict[str, Any]) -> list[Block]:
    data = spec.get("data") or {}
    if not data:
        return []
    counted = {(s.get("split"), s.get("path")): s for s in stats.get("sources", [])}
    rows = []
    for split, source in [("train", s) for s in data.get("train") or []] + [
        ("eval", s) for s in data.get("eval") or []
    ]:
        found = counted.get((split, source.get("path")), {})
        dropped = drop_reasons(found)
        rows.append(
            [
                f"`{source.get('path')}`",
                split,
                source.get("format") or data.get("format", "-"),
                _count(found.get("records")),
                _count(found.get("kept")),
                ", ".join(f"{k} {v:,}" for k, v in sorted(dropped.items())) or "-",
                str(source.get("weight", 1.0)),
            ]
        )
    out: list[Block] = [
        ("h", 2, "Data"),
        ("table", ["source", "split", "format", "records", "kept", "dropped", "weight"], rows),
    ]
    notes = [
        f"Chat template: {data.get('template')}",
        f"trained on: {data.get('train_on')}",
        f"system prompt: {data['system_prompt']!r}" if data.get("system_prompt") else "no system prompt",
        f"held out of train: {data['eval_fraction']}" if data.get("eval_fraction") else "",
        "filters: " + _filters(data.get("filters") or {}),
    ]
    out.append(("p", "; ".join(n for n in notes if n) + "."))
    splits = stats.get("splits") or {}
    if splits:
        table = [
            [
                split,
                _count(values.get("samples")),
                _count(values.get("rows")),
                _count(values.get("tokens")),
                _count(values.get("trained_tokens")),
            ]
            for split, values in splits.items()
        ]
        out.append(("table", ["split", "samples", "rows", "tokens", "trained tokens"], table))
    counts = stats.get("counts") or {}
    if counts:
        dropped = drop_reasons(counts)
        out.append(
            (
                "p",
                f"In all: {counts.get('records', 0):,} records read, {counts.get('kept', 0):,} kept"
                + (f"; dropped: {', '.join(f'{k} {v:,}' for k, v in sorted(dropped.items()))}" if dropped else "")
                + (f" (packed into rows of {stats['max_length']} tokens)" if stats.get("packing") else "")
                + ".",
            )
        )
    return out


def _filters(filters: dict[str, Any]) -> str:
    on = [name for name, value in filters.items() if value is True]
    limits = [f"{name}={value}" for name, value in filters.items() if not isinstance(value, bool) and value]
    return ", ".join(on + limits) or "none"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def _evaluation_blocks(evaluation: dict[str, Any]) -> list[Block]:
    loss, scores = evaluation.get("loss") or {}, evaluation.get("scores") or {}
    if not loss and not scores:
        return []
    out: list[Block] = [("h", 2, "Evaluation (held-out data)")]
    if loss:
        rows = [
            [label, _num(r.get("loss")), _num(r.get("perplexity"), 3), _count(r.get("rows")), _count(r.get("tokens"))]
            for label, r in loss.items()
        ]
        out.append(("table", ["model", "loss", "perplexity", "samples", "trained tokens"], rows))
    if scores:
        labels = list(scores)
        metrics = list(dict.fromkeys(m for label in labels for m in scores[label]))
        rows = [[metric, *[_percent(scores[label].get(metric)) for label in labels]] for metric in metrics]
        prompts = len(evaluation.get("rows") or [])
        out += [("p", f"Answers to {prompts} held-out prompts, greedy:"), ("table", ["metric", *labels], rows)]
    return out


def _run_blocks(summary: dict[str, Any], spec: dict[str, Any]) -> list[Block]:
    if not summary:
        return []
    scaling = spec.get("scaling") or {}
    where = (
        f"{scaling.get('num_workers')} x {scaling.get('accelerator_type') or 'GPU'}"
        if scaling.get("use_gpu")
        else f"{scaling.get('num_workers')} CPU worker(s)"
    )
    rows = [
        ["train loss", _num(summary.get("train_loss"))],
        ["eval loss (trainer)", _num(summary.get("eval_loss"))],
        ["steps", str(summary.get("steps", "-"))],
        ["tokens", f"{summary.get('tokens', 0):,} ({summary.get('trained_tokens', 0):,} trained)"],
        ["throughput", f"{summary.get('tokens_per_second', 0):,.0f} tokens/s on {where}"],
        ["wall time", wall_time_line(summary)],
    ]
    return [("h", 2, "Training run"), ("table", ["", "value"], rows)]


def _reproduce_blocks(facts: ModelFacts) -> list[Block]:
    out: list[Block] = [("h", 2, "How it was made")]
    commands = [c for c in (facts.command, facts.export_command) if c]
    if commands:
        out.append(("code", "\n".join(commands), "bash"))
    if facts.spec:
        out += [
            ("p", "The resolved spec (every default filled in, secrets hidden):"),
            ("code", yaml.safe_dump(facts.spec, sort_keys=False).rstrip(), "yaml"),
        ]
    return out


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and value == value else "-"


def _percent(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) and value == value else "-"


# ------------------------------------------------------------------------------- writing
def write_card(model_dir: str, facts: ModelFacts) -> str:
    path = f"{model_dir.rstrip('/')}/{CARD}"
    storage.write_text(path, card_text(facts))
    return path


def write_run_cards(run_dir: str) -> list[str]:
    """README.md in the run's model/ and model-merged/ (those that exist)."""
    run = RunDir.at(run_dir)
    written = []
    facts = run_facts(run_dir, "adapter")
    method = facts.spec.get("method", {}).get("kind")
    for directory, kind in ((run.model, "full" if method == "full" else "adapter"), (run.merged_model, "merged")):
        if storage.exists(f"{directory}/config.json") or storage.exists(f"{directory}/adapter_config.json"):
            facts.kind = kind
            written.append(write_card(directory, facts))
    return written


def export_facts(exported: Exported, *, command: str | None = None, repo_id: str | None = None) -> ModelFacts:
    """What an export's card says: its run's facts (when it came from a run) and what was written."""
    trained = exported.trained
    if trained.run_dir:
        facts = run_facts(trained.run_dir, exported.kind, name=exported.name or None)
    else:  # a model directory on its own: what it says of itself
        config = _json(os.path.join(trained.model_dir, "config.json"))
        base = adapter_base(trained.model_dir) if trained.adapter else config.get("_name_or_path") or None
        facts = ModelFacts(kind=exported.kind, name=exported.name or os.path.basename(trained.model_dir), base=base)
    facts.export_command = command
    facts.weights = exported.weights
    facts.repo_id = repo_id
    if exported.gguf:
        facts.gguf = {
            "file": os.path.basename(exported.gguf.path),
            "quantization": exported.gguf.quantization,
            "bytes": exported.gguf.bytes,
            "kept_in_f16": exported.gguf.kept_in_f16,
            "modelfile": os.path.basename(exported.modelfile) if exported.modelfile else None,
        }
    facts.files = sorted(os.listdir(exported.out_dir))
    return facts


def write_export_card(exported: Exported, *, command: str | None = None, repo_id: str | None = None) -> str:
    """README.md in an export's directory."""
    return write_card(exported.out_dir, export_facts(exported, command=command, repo_id=repo_id))
