"""The job spec's schema: every section as a pydantic model, the one place where defaults
live, and the values derived from them (gradient accumulation, precision, the step plan), so
that every caller agrees on them. Reading a spec file is rayft.spec.load's job.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rayft.errors import SpecError
from rayft.spec.secrets import redact
from rayft.storage import check_scheme

# An evaluation forward pass keeps no activations for a backward pass, so by default it takes this
# many times a training micro-batch: fewer, fuller passes (a GPU's utilization; on CPU the pass
# size barely matters). Not more: with gradient checkpointing, training holds one layer's
# activations of a micro-batch plus every layer's input, and twice one layer's activations stays
# about within that, so evaluation does not run out of memory where training did not.
EVAL_BATCH_FACTOR = 2
# The default evaluation cadence keeps evaluation within this share of the training compute; an
# evaluated token costs one forward pass, about a third of a trained one (forward and backward).
EVAL_SHARE = 0.1
EVAL_TOKEN_COST = 1 / 3


class Section(BaseModel):
    # Unknown keys are errors: a typo like `learning_rat` must not silently train with a default.
    # Numbers are finite: `learning_rate: .inf` would "train" to an all-NaN model.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# transformers' names (SchedulerType, OptimizerNames), stated here so that the spec needs no
# transformers import; tests/test_spec.py checks them against the installed transformers.
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adafactor",
    "adamw_anyprecision",
    "adamw_torch_4bit",
    "adamw_torch_8bit",
    "ademamix",
    "sgd",
    "adagrad",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "ademamix_8bit",
    "lion_8bit",
    "lion_32bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "paged_ademamix_32bit",
    "paged_ademamix_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
    "rmsprop",
    "rmsprop_bnb",
    "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adafactor",
    "lomo",
    "adalomo",
    "grokadamw",
    "schedule_free_radam",
    "schedule_free_adamw",
    "schedule_free_sgd",
    "apollo_adamw",
    "stable_adamw",
)
# A run name becomes a directory (and Kubernetes and W&B names): one path component, no `.`/`..`.
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def one_of(value: str, known: tuple[str, ...], what: str) -> str:
    if value not in known:
        close = difflib.get_close_matches(value, known, n=1, cutoff=0.75)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown {what} {value!r}; {hint}known: {', '.join(known)}")
    return value


# ----------------------------------------------------------------------------------- model
# transformers 5.24's attention implementations and whether each keeps packed samples apart. The
# padding-free rows rayft packs carry no attention mask, only per-sample position_ids: sdpa, eager
# and flex build a block-diagonal mask from them (masking_utils.find_packed_sequence_indices), the
# flash kernels turn them into varlen cu_seqlens; `paged|eager` (continuous batching) gets no mask
# at all, so packed samples would attend across their boundaries (tests/test_packing.py shows both).
ATTENTION_KEEPS_PACKED_SAMPLES_APART = {
    "sdpa": True,
    "eager": True,
    "flex_attention": True,
    "flash_attention_2": True,
    "flash_attention_3": True,
    "paged|eager": False,
}
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")
Attention = Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "paged|eager"]


class ModelSpec(Section):
    path: str = Field(description="Local HF directory, a .gguf file, 'pkg:PACKAGE/FILE', or a hub id.")
    tokenizer: str | None = Field(None, description="Tokenizer source; defaults to `path`.")
    gguf_file: str | None = Field(None, description="GGUF file inside `path` when `path` is a directory or hub id.")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Attention = Field(
        "auto",
        description="auto: the fastest correct one for the worker's hardware (flash_attention_2 on a GPU with "
        "flash-attn installed, else sdpa), chosen on the worker and logged with the reason; or a transformers name.",
    )
    trust_remote_code: bool = False


# ---------------------------------------------------------------------------------- method
class LoraSpec(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: list[str] = Field(default_factory=list)


class QuantizationSpec(Section):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # ZeRO-3 shards parameters by their storage dtype; 4-bit weights must be stored in the
    # dtype of the other parameters for it to partition them (see `JobSpec._check_method`).
    storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"


DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3-offload")


class FsdpSpec(Section):
    """PyTorch FSDP2 (`fully_shard`) through the HF trainer's FSDP plugin (accelerate): weights,
    gradients and optimizer states sharded over the workers, one decoder layer gathered at a time.
    `method.fsdp: true` takes these defaults."""

    reshard_after_forward: bool = Field(
        True,
        description="Free each layer's gathered weights after its forward (ZeRO-3-like); false keeps them "
        "gathered until backward (ZeRO-2-like: less communication, more memory).",
    )
    cpu_offload: bool = Field(
        False, description="Keep the sharded weights, gradients and optimizer states in host RAM."
    )
    state_dict: Literal["full", "sharded"] = Field(
        "full",
        description="Checkpoint format: full (one HF-loadable state gathered on rank 0) or sharded (torch.distributed."
        "checkpoint, one file per rank: faster for large models). Both resume at another worker count.",
    )


class MethodSpec(Section):
    kind: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    deepspeed: str | None = Field(None, description="zero2 | zero3 | zero3-offload | path to a DeepSpeed JSON")
    fsdp: FsdpSpec | None = Field(None, description="true or a section: shard with FSDP2 instead of DeepSpeed.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (with FSDP: FSDP's own activation checkpointing)."
    )
    liger: bool = Field(
        False,
        description="Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (GPU, `pip install rayft[gpu]`). The loss "
        "is TRL's chunked LM head either way: it never builds the full logits (Liger's fused cross-entropy is the "
        "same idea, and TRL refuses both at once).",
    )

    @field_validator("fsdp", mode="before")
    @classmethod
    def _fsdp_shorthand(cls, value: Any) -> Any:
        if value is True:
            return {}
        return None if value is False else value

    @field_validator("deepspeed")
    @classmethod
    def _known_deepspeed(cls, value: str | None) -> str | None:
        if value is None or value in DEEPSPEED_PRESETS or value.endswith(".json"):
            return value
        raise ValueError(f"must be one of {', '.join(DEEPSPEED_PRESETS)} or a path to a .json file, got {value!r}")


# ------------------------------------------------------------------------------------ data
DataFormat = Literal["auto", "alpaca", "prompt_response", "prompt_completion", "messages", "sharegpt", "text"]


class SourceSpec(Section):
    path: str = Field(description="File, glob, directory, or hub dataset name ('hf:org/name').")
    format: DataFormat | None = Field(None, description="Defaults to data.format.")
    weight: float = Field(1.0, gt=0, description="Relative sampling weight when mixing sources.")
    columns: dict[str, str] = Field(default_factory=dict, description="Canonical name -> column in this file.")
    split: str = "train"
    max_samples: int | None = Field(None, ge=1)


class FilterSpec(Section):
    min_reply_chars: int = Field(1, ge=0, description="Drop samples whose assistant reply is shorter.")
    max_tokens: int | None = Field(None, ge=1, description="Drop samples longer than this before truncation.")
    dedup: bool = True
    near_dedup: bool = Field(False, description="Also drop near-duplicates (normalized text).")
    drop_sure_openers: bool = Field(False, description='Drop replies opening with "Sure!", "Certainly!", ...')
    drop_placeholders: bool = Field(
        True, description="Drop replies with placeholder text like 'lorem ipsum' or '[insert'."
    )
    drop_refusals: bool = Field(False, description="Drop replies that are canned refusals ('As an AI language model').")


DEFAULT_EVAL_FRACTION = 0.05
TrainTurns = Literal["all_assistant", "last_assistant", "everything"]


class TrainOnSpec(Section):
    """What carries the loss. `train_on: last_assistant` is shorthand for `train_on: {turns: last_assistant}`.
    Tool results (tool turns) are never trained: the model reads them, it does not write them."""

    turns: TrainTurns = Field(
        "all_assistant", description="all_assistant | last_assistant | everything (every token, no masking)"
    )
    reasoning: bool = Field(
        True,
        description="Train the reasoning (thinking) of a trained reply; false: it is context, the answer is trained.",
    )
    tool_calls: bool = Field(
        True,
        description="Train assistant turns that call tools; false: those turns are context, only answers are trained.",
    )


class DataSpec(Section):
    train: list[SourceSpec]
    eval: list[SourceSpec] | None = None
    eval_fraction: float | None = Field(
        None, ge=0.0, lt=1.0, description="Seeded split of train held out; default 0.05 when data.eval is not given."
    )
    format: DataFormat = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    template: str = Field("auto", description="auto | tokenizer | chatml | llama3 | llama2 | plain | path to .jinja")
    system_prompt: str | None = None
    system_turns: Literal["auto", "keep", "fold", "drop"] = Field(
        "auto",
        description="System messages under a template with no system role (Gemma): fold puts each into the user "
        "turn after it (system text, a blank line, the user text), as Google documents for Gemma; drop leaves them "
        "out; keep renders them as they are and refuses a record the template cannot render so. auto: keep when the "
        "template has a system role, else fold (prepare says how many were folded). fold and drop apply whatever "
        "the template.",
    )
    train_on: TrainOnSpec = Field(default_factory=TrainOnSpec)
    max_length: int = Field(1024, ge=8)
    truncation: Literal["keep_start", "keep_end", "drop"] = "keep_start"
    packing: bool = False
    filters: FilterSpec = Field(default_factory=FilterSpec)
    on_error: Literal["raise", "skip"] = Field(
        "raise",
        description="A record that cannot be used (malformed, a template that cannot render it or drops its content, "
        "control tokens in its content): raise stops before training, naming file:line; skip drops and counts it.",
    )
    split_turns: Literal["auto", "always", "never"] = Field(
        "auto",
        description="auto: a conversation whose template renders earlier turns differently once later ones follow "
        "(Qwen3 drops past reasoning) becomes one sample per trained turn, each as inference renders it at that turn; "
        "always: every trained turn its own sample; never: such conversations are refused.",
    )
    allow_control_tokens: bool = Field(
        False,
        description="Let control-token strings inside content (e.g. '<|im_end|>' typed in a message or a raw text) "
        "become control tokens. Off: content is text, and a record whose content cannot be tokenized as text "
        "exactly is refused (or skipped and counted).",
    )
    cache: bool = True
    cache_dir: str | None = Field(
        None, description="Where prepared data is kept, shared by runs; default <run.storage_path>/prepared."
    )

    @field_validator("cache_dir")
    @classmethod
    def _cache_scheme(cls, value: str | None) -> str | None:
        return check_scheme(value) if value else value

    @field_validator("train_on", mode="before")
    @classmethod
    def _train_on_shorthand(cls, value: Any) -> Any:
        return {"turns": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_eval_split(self) -> DataSpec:
        if self.eval is not None and self.eval_fraction is not None:
            raise ValueError(
                "give data.eval (held-out files) or data.eval_fraction (a split of data.train), not "
                "both: with data.eval the fraction would be ignored"
            )
        if not self.train:
            raise ValueError("data.train names no source: give at least one file, glob or directory")
        return self

    @property
    def held_out_fraction(self) -> float:
        """The share of data.train held out for evaluation: 0 when data.eval names eval files."""
        if self.eval is not None:
            return 0.0
        return DEFAULT_EVAL_FRACTION if self.eval_fraction is None else self.eval_fraction

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _sources(cls, value: Any) -> Any:
        # `train: data/x.jsonl` is shorthand for `train: [{path: data/x.jsonl}]`.
        if value is None:
            return value
        items = value if isinstance(value, list) else [value]
        return [{"path": item} if isinstance(item, str) else item for item in items]


# ----------------------------------------------------------------------------------- train
class TrainSpec(Section):
    global_batch_size: int = Field(
        32, ge=1, description="Sequences (or packed rows) per optimizer step, all workers together."
    )
    micro_batch_size: int = Field(4, ge=1, description="Per worker, per forward pass.")
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Overrides epochs when set.")
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup: float = Field(0.03, ge=0, description="Below 1: fraction of total steps; from 1: a step count.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optimizer: str = "adamw_torch"
    seed: int = 42
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(
        None,
        ge=1,
        description="Steps between evaluations; default: at checkpoints, as many as fit in a tenth of the "
        "training compute (the final weights always).",
    )
    save_every: int | None = Field(None, ge=1, description="Steps between checkpoints; default: four a run.")
    eval_batch_size: int | None = Field(
        None,
        ge=1,
        description="Rows of up to data.max_length tokens per evaluation forward pass, per worker; default "
        f"{EVAL_BATCH_FACTOR}x micro_batch_size (evaluation keeps no activations for a backward pass).",
    )

    @property
    def eval_rows(self) -> int:
        return self.eval_batch_size or EVAL_BATCH_FACTOR * self.micro_batch_size

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        return one_of(value, LR_SCHEDULERS, "learning-rate scheduler")

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        return one_of(value, OPTIMIZERS, "optimizer")

    @model_validator(mode="before")
    @classmethod
    def _habits(cls, data: Any) -> Any:
        # transformers 5 dropped `warmup_ratio`; users still write it (and `warmup_steps`).
        if isinstance(data, dict):
            for alias in ("warmup_ratio", "warmup_steps"):
                if alias in data:
                    if "warmup" in data:
                        raise ValueError(f"give either warmup or {alias}, not both")
                    data = {**data, "warmup": data[alias]}
                    del data[alias]
        return data


# --------------------------------------------------------------------------------- scaling
class ScalingSpec(Section):
    num_workers: int = Field(
        2, ge=1, description="Workers of the run; with min_workers, the most it grows to. [min, max] is elastic."
    )
    min_workers: int | None = Field(
        None,
        ge=1,
        description="Elastic: start once this many fit, grow towards num_workers as nodes join, shrink when "
        "one leaves. The global batch, the schedule and the sample order stay those of a fixed-size run.",
    )
    resize_check_s: float = Field(
        60, gt=0, description="Elastic: how often a healthy run checks whether more workers fit now."
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0, description="Also the worker's torch/OpenMP thread count on CPU.")
    gpus_per_worker: float = Field(1, ge=0, description="Used when use_gpu is true.")
    accelerator_type: str | None = Field(None, description="e.g. A100-80G, H100: schedules onto that GPU type.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @model_validator(mode="before")
    @classmethod
    def _worker_range(cls, data: Any) -> Any:
        """`num_workers: [min, max]` is the short form of min_workers and num_workers."""
        if isinstance(data, dict) and isinstance(data.get("num_workers"), (list, tuple)):
            bounds = data["num_workers"]
            if len(bounds) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds):
                raise ValueError(f"num_workers: a range is [min, max] of two whole numbers, not {list(bounds)}")
            if "min_workers" in data:
                raise ValueError("give num_workers as [min, max] or min_workers, not both")
            data = {**data, "min_workers": bounds[0], "num_workers": bounds[1]}
        return data

    @model_validator(mode="after")
    def _min_below_max(self) -> ScalingSpec:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers={self.min_workers} is more than num_workers={self.num_workers}")
        return self

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    @property
    def worker_counts(self) -> range:
        """Every worker count the run may train on."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)


# ------------------------------------------------------------------------------------- run
class RunSpec(Section):
    name: str | None = Field(None, description="Defaults to the spec file's name.")
    storage_path: str = Field("./runs", description="Local/NFS path or s3:// gs:// URI shared by all nodes.")
    checkpoints_to_keep: int = Field(2, ge=1)

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, value: str | None) -> str | None:
        if value is not None and not RUN_NAME.match(value):
            raise ValueError(
                f"{value!r} is not a run name: use letters, digits, '.', '_' and '-', starting with a "
                "letter or digit (it names the run's directory: no '/', '.' or '..')"
            )
        return value

    @field_validator("storage_path")
    @classmethod
    def _plain_uri(cls, value: str) -> str:
        check_scheme(value)
        if "?" in value:
            raise ValueError(
                "no query parameters in the URI: set the endpoint and region in the environment "
                "(AWS_ENDPOINT_URL, AWS_REGION), which every worker receives"
            )
        return value

    checkpoint_metric: str | None = Field(
        "eval_loss", description="Keep the best by this metric; null keeps the latest."
    )
    checkpoint_mode: Literal["min", "max"] = "min"
    max_failures: int = Field(
        3,
        ge=-1,
        description="Worker-group restarts from the last checkpoint after a crash or hang; -1 retries forever, "
        "0 ends the run at the first failure. Preemptions have their own budget.",
    )
    max_preemptions: int = Field(
        -1,
        ge=-1,
        description="Restarts after a node is drained or preempted (a checkpoint is written in its notice "
        "period); -1 without limit.",
    )
    hang_timeout_s: float = Field(
        1800,
        gt=0,
        description="A worker that finishes no step, evaluation batch or checkpoint for this long is hung "
        "(a collective that never returns): the group restarts from the last checkpoint.",
    )
    save_merged: bool = Field(False, description="Also save the LoRA merged into the base model.")
    log_samples: bool = Field(
        False, description="Write which samples each step trained on (samples/, per rank and attempt)."
    )
    forward_env: list[str] = Field(
        default_factory=lambda: ["WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_MODE"],
        description="Environment variables passed by reference from the driver to the workers.",
    )


# -------------------------------------------------------------------------------- tracking
class WandbSpec(Section):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "rayft"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    dir: str | None = Field(None, description="Where run files go; defaults to <storage_path>/<name>/wandb.")


class TrackingSpec(Section):
    wandb: WandbSpec = Field(default_factory=WandbSpec)


# ------------------------------------------------------------------------------------ eval
Scorer = Literal["exact_match", "contains", "rouge_l", "token_f1"]
DEFAULT_SCORERS: tuple[Scorer, ...] = ("exact_match", "contains", "rouge_l")


class EvalSpec(Section):
    before_after: bool = Field(True, description="At the end of `train`, compare base and tuned on held-out prompts.")
    num_prompts: int = Field(32, ge=0)
    max_new_tokens: int = Field(64, ge=1)
    do_sample: bool = False
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    metrics: list[Scorer] = Field(default_factory=lambda: list(DEFAULT_SCORERS))


# ------------------------------------------------------------------------------------ tune
class SchedulerSpec(Section):
    kind: Literal["asha", "median", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="Reports a trial always gets before it can be stopped.")
    reduction_factor: float = Field(2, gt=1)


class TuneSpec(Section):
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    num_samples: int = Field(1, ge=1)
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    search_alg: Literal["random", "optuna"] = "random"
    max_concurrent_trials: int | None = Field(None, ge=1)

    @field_validator("search_space")
    @classmethod
    def _domains(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        kinds = {"loguniform": 2, "uniform": 2, "randint": 2, "choice": None, "grid": None}
        for path, domain in space.items():
            if len(domain) != 1 or next(iter(domain)) not in kinds:
                raise ValueError(f"{path}: expected one of {sorted(kinds)} with its values, got {domain}")
            kind, values = next(iter(domain.items()))
            if not isinstance(values, list) or (kinds[kind] and len(values) != kinds[kind]):
                raise ValueError(f"{path}: {kind} takes a list of {kinds[kind] or 'values'}, got {values!r}")
        return space


# ------------------------------------------------------------------------------- the spec
def field_path_problem(model: type[BaseModel], parts: list[str]) -> str | None:
    """Why a dotted path (data.train.0.weight) names no field of `model`, or None if it does."""
    current: Any = model
    for depth, part in enumerate(parts):
        if part.isdigit() and getattr(current, "__origin__", None) is list:
            current = _container(current.__args__[0])
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            known = list(fields or {})
            close = difflib.get_close_matches(part, known, n=1)
            where = ".".join(parts[:depth]) or "the spec"
            return (
                f"names no field: {where} has no {part!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                if fields is not None
                else f"goes below {where}, which is a value"
            )
        current = _container(fields[part].annotation)
    return None


def _container(annotation: Any) -> Any:
    """What a field's annotation holds further fields in: a list type, a section, or itself."""
    options = [annotation, *getattr(annotation, "__args__", ())]
    lists = [o for o in options if getattr(o, "__origin__", None) is list]
    sections = [o for o in options if isinstance(o, type) and issubclass(o, BaseModel)]
    return (lists or sections or [annotation])[0]


class JobSpec(Section):
    model: ModelSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    tune: TuneSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        self._check_batch()
        self._check_method()
        self._check_sweep_paths()
        return self

    def _check_sweep_paths(self) -> None:
        """Every swept path names a field: a typo would make every trial fail."""
        for path in self.tune.search_space if self.tune else {}:
            problem = field_path_problem(type(self), path.split("."))
            if problem:
                raise ValueError(f"tune.search_space: {path!r} {problem}")

    def _check_batch(self) -> None:
        micro, counts = self.train.micro_batch_size, self.scaling.worker_counts
        uneven = [n for n in counts if self.train.global_batch_size % (micro * n)]
        if not uneven:
            return
        if not self.scaling.elastic:
            per_step = micro * self.scaling.num_workers
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={micro} x scaling.num_workers={self.scaling.num_workers}"
                f" (= {per_step}); gradient accumulation must be a whole number. Try global_batch_size="
                f"{math.ceil(self.train.global_batch_size / per_step) * per_step}."
            )
        fits = math.lcm(*(micro * n for n in counts))
        raise ValueError(
            f"train.global_batch_size={self.train.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{micro} x {', '.join(map(str, uneven))} worker(s), counts the elastic range "
            f"scaling.num_workers=[{counts.start}, {counts.stop - 1}] may train on: the global batch must stay the "
            f"same at every size. Try global_batch_size={math.ceil(self.train.global_batch_size / fits) * fits}."
        )

    def _check_method(self) -> None:
        method, gpu = self.method, self.scaling.use_gpu
        if self.scaling.accelerator_type and not gpu:
            raise ValueError(f"scaling.accelerator_type={self.scaling.accelerator_type} needs scaling.use_gpu=true")
        if method.precision == "fp16" and not gpu:
            raise ValueError("method.precision=fp16 needs a GPU (scaling.use_gpu=true); use bf16 or fp32 on CPU")
        if method.kind == "qlora" and method.deepspeed and method.deepspeed.startswith("zero3"):
            compute, storage = method.quantization.compute_dtype, method.quantization.storage_dtype
            if storage != compute:
                raise ValueError(
                    f"method.kind=qlora with method.deepspeed={method.deepspeed} needs "
                    f"method.quantization.storage_dtype equal to compute_dtype ({compute}): ZeRO-3 partitions "
                    f"parameters by dtype and cannot shard uint8-stored 4-bit weights"
                )
            if method.precision == "bf16" and not gpu:
                # measured on an AVX512-BF16 CPU: "shape '[128, 64]' is invalid" on the first step
                raise ValueError(
                    f"method.kind=qlora with method.deepspeed={method.deepspeed} and method.precision=bf16 fails on "
                    "CPU: bitsandbytes' 4-bit CPU matmul breaks under bf16 autocast on ZeRO-3's partitioned weights; "
                    "use precision fp32 (or auto, which picks it here)"
                )
        if method.deepspeed and method.deepspeed.endswith("offload") and method.kind == "qlora":
            raise ValueError("method.deepspeed=zero3-offload cannot offload 4-bit (qlora) weights; use zero3 or lora")
        self._check_fsdp()
        self._check_attention()
        if method.liger and not gpu:
            raise ValueError("method.liger needs a GPU (scaling.use_gpu=true): Liger's kernels are Triton")

    def _check_fsdp(self) -> None:
        method = self.method
        if method.fsdp is None:
            return
        if method.deepspeed:
            raise ValueError(f"method.fsdp and method.deepspeed={method.deepspeed} both shard the model; choose one")
        if not self.scaling.use_gpu:
            # accelerate (1.16) turns its FSDP plugin on only for accelerator devices: on CPU the HF trainer would
            # train plain DDP and say nothing (bench/results/fsdp2_cpu.md; torch's fully_shard itself runs on gloo).
            raise ValueError(
                "method.fsdp needs GPUs (scaling.use_gpu=true): accelerate enables FSDP only on accelerators, and on "
                "CPU the trainer would silently fall back to DDP; use method.deepspeed to shard on CPU"
            )
        q = method.quantization
        if method.kind == "qlora" and q.storage_dtype != q.compute_dtype:
            raise ValueError(
                f"method.kind=qlora with method.fsdp needs method.quantization.storage_dtype equal to compute_dtype "
                f"({q.compute_dtype}): FSDP shards parameters by their storage dtype and leaves uint8-stored 4-bit "
                "weights whole on every worker"
            )

    def _check_attention(self) -> None:
        attention = self.model.attn_implementation
        if self.data.packing and not ATTENTION_KEEPS_PACKED_SAMPLES_APART.get(attention, True):
            raise ValueError(
                f"model.attn_implementation={attention} with data.packing=true would let packed samples attend to "
                "each other (it takes no per-sample mask from position_ids); use auto, sdpa or flash_attention_2"
            )
        if attention in FLASH_ATTENTION:
            if not self.scaling.use_gpu:
                raise ValueError(
                    f"model.attn_implementation={attention} needs a GPU (scaling.use_gpu=true); sdpa is the fastest "
                    "correct one on CPU"
                )
            if self.precision == "fp32":
                raise ValueError(
                    f"model.attn_implementation={attention} runs in bf16 or fp16 only; set method.precision=bf16 "
                    "(or auto) or use sdpa"
                )

    # ---- values derived from the spec (derived here so every caller agrees)
    @property
    def gradient_accumulation_steps(self) -> int:
        """At scaling.num_workers; an elastic run re-derives it at its size (accumulation_at)."""
        return self.accumulation_at(self.scaling.num_workers)

    def accumulation_at(self, workers: int) -> int:
        """Micro-batches each worker accumulates per step at `workers` workers: the global batch
        stays train.global_batch_size rows at every size."""
        return self.train.global_batch_size // (self.train.micro_batch_size * workers)

    @property
    def precision(self) -> str:
        """fp32 on CPU by default (bf16 autocast is slower than fp32 for small models here), bf16 on GPU."""
        if self.method.precision != "auto":
            return self.method.precision
        return "bf16" if self.scaling.use_gpu else "fp32"

    @property
    def run_name(self) -> str:
        return self.run.name or "rayft-run"

    @property
    def sweep(self) -> TuneSpec:
        """The tune section, for code that runs only in a sweep."""
        if self.tune is None or not self.tune.search_space:
            raise SpecError("the spec has no tune.search_space to sweep", field="tune")
        return self.tune

    def step_plan(
        self, train_rows: int, train_tokens: int = 0, eval_tokens: int = 0, *, sweep_trial: bool = False
    ) -> StepPlan:
        """Optimizer steps per epoch and in total, as the HF trainer will count them, the
        default checkpoint interval (four checkpoints a run) and the default evaluation cadence.
        The same at every worker count: a step is train.global_batch_size rows, the last one of
        an epoch topped up with rows that carry no loss (rayft.train.epoch).

        Evaluation by default: at every checkpoint while that costs at most EVAL_SHARE of the
        training compute, else at fewer checkpoints (the final weights are always evaluated,
        once). A sweep's trial evaluates at every checkpoint: its scheduler compares trials there.
        `train_tokens`, `eval_tokens`: the splits' tokens (0: unknown, every checkpoint)."""
        per_epoch = max(1, math.ceil(train_rows / self.train.global_batch_size))
        total = self.train.max_steps or max(1, math.ceil(self.train.epochs * per_epoch))
        save_every = self.train.save_every or max(1, math.ceil(total / 4))
        if self.train.eval_every:
            return StepPlan(per_epoch, total, save_every, self.train.eval_every, "train.eval_every")
        checkpoints = math.ceil(total / save_every)
        if not (train_tokens and eval_tokens) or sweep_trial:
            return StepPlan(per_epoch, total, save_every, save_every, "at every checkpoint")
        trained = train_tokens * total / per_epoch  # tokens the run trains on, all epochs
        affordable = max(1, math.floor(EVAL_SHARE * trained / (EVAL_TOKEN_COST * eval_tokens)))
        if affordable >= checkpoints:
            return StepPlan(per_epoch, total, save_every, save_every, "at every checkpoint")
        every = min(total, save_every * math.ceil(checkpoints / affordable))
        where = "at the end only" if every == total else f"every {every} steps and at the end"
        why = (
            f"{where}: one pass over the eval split ({eval_tokens:,} tokens) costs "
            f"{EVAL_TOKEN_COST * eval_tokens / trained:.0%} of the training compute; "
            f"set train.eval_every for more"
        )
        return StepPlan(per_epoch, total, save_every, every, why)

    def to_dict(self, *, redacted: bool = True) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        return redact(data) if redacted else data


@dataclass(frozen=True)
class StepPlan:
    """How a run's optimizer steps are laid out."""

    steps_per_epoch: int
    total_steps: int
    save_every: int
    eval_every: int
    eval_why: str = "at every checkpoint"  # how the evaluation cadence was chosen, for the run's log
