"""`rayft plan`: will this job fit, and how long will it take, before any GPU is rented.

Arithmetic on the model's shape (rayft.plan.shapes: config.json, a GGUF header or a built-in
table) and the spec. It models what rayft runs: transformers + PEFT + TRL's SFTTrainer, with
DeepSpeed when the spec asks. Memory is rayft.plan.memory's, fixes rayft.plan.suggest's; the
estimates are checked against measured runs in tests/test_plan.py (bench/results/plan_accuracy.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from rayft.data.cache import locate
from rayft.data.prepared import Prepared
from rayft.errors import SpecError
from rayft.model.source import resolve_source
from rayft.model.tokenizer import load_tokenizer
from rayft.plan.memory import (
    ALLOCATOR_MARGIN,
    LOSS_TILE_TOKENS,
    LOSS_TILE_VOCAB,
    OPTIMIZER_STATE_BYTES,
    RUNTIME_BYTES,
    GiB,
    adapter_params,
    memory,
    planned_attention,
    trainable_params,
)
from rayft.plan.shapes import Accelerator, ModelShape, model_shape
from rayft.plan.shapes import accelerator as find_accelerator
from rayft.plan.suggest import Suggestion, suggestions
from rayft.spec import JobSpec, load_spec
from rayft.spec.schema import FLASH_ATTENTION

MFU = {"gpu": 0.40, "cpu": 0.35}  # assumed fraction of peak FLOP/s a step reaches (CPU: 0.24-0.45 measured here)


@dataclass
class Plan:
    model: str
    params: int
    trainable_params: int
    method: str
    workers: int
    accelerator: str
    memory: dict[str, int]  # live at the peak, per worker, bytes
    why: dict[str, str]  # a note per memory item
    peak_bytes: int  # the tensors at the peak
    margin_bytes: int
    runtime_bytes: int
    total_bytes: int
    capacity_bytes: int
    fits: bool
    headroom_bytes: int
    host_bytes: int  # offloaded to the host's RAM, per worker
    flops_per_token: float  # model FLOPs (6N + attention), what MFU is quoted against
    executed_flops_per_token: float  # less for frozen weights, more with recomputation
    peak_tflops: float
    mfu: float
    effective_batch: int
    tokens_per_step: int
    gradient_accumulation: int
    tokens: int | None
    tokens_source: str
    steps_per_epoch: int | None
    total_steps: int | None
    seconds_per_epoch: float | None
    notes: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["memory_gib"] = {name: round(value / GiB, 3) for name, value in self.memory.items()}
        data["total_gib"], data["capacity_gib"] = round(self.total_bytes / GiB, 2), round(self.capacity_bytes / GiB, 2)
        return data


# ---------------------------------------------------------------------------------- estimate
def estimate(
    spec: JobSpec,
    tokens: int | None = None,
    accelerator: str | None = None,
    *,
    memory_gib: float | None = None,
    shape: ModelShape | None = None,
    peft_fp32_upcast: bool = False,
    suggest: bool = True,
) -> Plan:
    """Per-worker peak memory, FLOPs and time for `spec`, and what would make it fit.

    tokens: training tokens per epoch (None: the prepared data's count, if `rayft prepare` ran).
    accelerator: an ACCELERATORS name or "cpu" (None: scaling.accelerator_type, else A100-80G
    on GPU). memory_gib: the device's memory instead of the table's (for "cpu", the worker's RAM).
    peft_fp32_upcast: QLoRA as PEFT's prepare_model_for_kbit_training leaves it (embeddings, head
    and norms in fp32). False (the default) is what rayft trains: model.keep_in_compute_dtype
    casts them back to 16-bit, as torchtune keeps them.
    """
    shape = shape or model_shape(spec)
    name = accelerator or spec.scaling.accelerator_type or ("A100-80G" if spec.scaling.use_gpu else "cpu")
    device = find_accelerator(
        name,
        field="--accelerator" if accelerator else "scaling.accelerator_type",
        memory_gib=memory_gib,
        workers=spec.scaling.num_workers,
        cpus_per_worker=spec.scaling.cpus_per_worker,
    )
    used, why, host = memory(spec, shape, device, peft_fp32_upcast)
    peak = sum(used.values())
    margin, runtime = int(peak * ALLOCATOR_MARGIN[device.kind]), RUNTIME_BYTES[device.kind]
    total = peak + margin + runtime + (host if device.kind == "cpu" else 0)  # on CPU "offloaded" is the same RAM
    capacity = int(device.memory_gib * GiB)
    notes = _notes(spec, shape, device, peft_fp32_upcast)
    plan = Plan(
        model=f"{shape.name} ({shape.source})",
        params=shape.params,
        trainable_params=trainable_params(spec, shape),
        method=_method_label(spec, planned_attention(spec, device)),
        workers=spec.scaling.num_workers,
        accelerator=device.name,
        memory=used,
        why=why,
        peak_bytes=peak,
        margin_bytes=margin,
        runtime_bytes=runtime,
        total_bytes=total,
        capacity_bytes=capacity,
        fits=total <= capacity,
        headroom_bytes=capacity - total,
        host_bytes=host,
        notes=notes,
        **_throughput(spec, shape, device, tokens, notes),
    )
    if suggest and not plan.fits:

        def replan(overrides: list[str]) -> Plan | None:
            try:
                changed = load_spec(data=spec.to_dict(redacted=False), overrides=overrides)
            except SpecError:  # a combination the spec refuses (e.g. QLoRA with ZeRO-3 offload)
                return None
            return estimate(
                changed,
                tokens=0,
                shape=shape,
                accelerator=device.name,
                memory_gib=device.memory_gib,
                peft_fp32_upcast=peft_fp32_upcast,
                suggest=False,
            )

        plan.suggestions = suggestions(spec, device, replan)
    return plan


# -------------------------------------------------------------------------------- throughput
def _throughput(
    spec: JobSpec, shape: ModelShape, device: Accelerator, tokens: int | None, notes: list[str]
) -> dict[str, Any]:
    N, L, h = shape.matmul_params, shape.layers, shape.heads * shape.head_size
    attention = 2 * L * h * spec.data.max_length  # causal QK^T and AV: half of 4*h*s a layer
    forward = 2 * N + attention
    weight_grads = 2 * N if spec.method.kind == "full" else 6 * adapter_params(spec, shape)
    executed = forward + (2 * N + 2 * attention) + weight_grads + (forward if spec.method.gradient_checkpointing else 0)
    half = spec.precision in ("bf16", "fp16") and device.kind == "gpu"
    peak = device.bf16_tflops if half else device.fp32_tflops
    rows, source = None, "not given: pass --tokens, or run `rayft prepare` first"
    if tokens is None and (stats := prepared_stats(spec)):
        tokens, rows, source = stats["tokens"], stats["rows"], "the prepared data"
    elif tokens:
        source = "given"
    per_epoch = total = seconds = None
    if tokens:
        if rows is None:
            rows = math.ceil(tokens / spec.data.max_length)
            notes.append(f"{rows:,} rows an epoch assumed: the tokens in full rows of data.max_length")
        steps = spec.step_plan(rows)  # the trainer's own step count
        per_epoch, total = steps.steps_per_epoch, steps.total_steps
        seconds = tokens * executed / (spec.scaling.num_workers * peak * 1e12 * MFU[device.kind])
    return dict(
        flops_per_token=float(3 * forward),
        executed_flops_per_token=float(executed),
        peak_tflops=peak,
        mfu=MFU[device.kind],
        effective_batch=spec.train.global_batch_size,
        tokens_per_step=spec.train.global_batch_size * spec.data.max_length,
        gradient_accumulation=spec.gradient_accumulation_steps,
        tokens=tokens,
        tokens_source=source,
        steps_per_epoch=per_epoch,
        total_steps=total,
        seconds_per_epoch=seconds,
    )


def prepared_stats(spec: JobSpec) -> dict[str, int] | None:
    """The train split's tokens and rows, if `rayft prepare` cached this spec's data (found where
    training finds it). Needs the tokenizer of a local, non-GGUF model."""
    try:
        source = resolve_source(spec.model)
        if not source.local or source.gguf_file:
            return None
        prepared = Prepared.read(locate(spec, load_tokenizer(spec, source.location)).root)
    except Exception:  # no data yet, no tokenizer: the plan goes on without a token count
        return None
    if prepared is None:
        return None
    train = prepared.split("train")
    return {"tokens": train["tokens"], "rows": train["rows"]}


# ----------------------------------------------------------------------------- description
def _fsdp_label(spec: JobSpec) -> str:
    fsdp = spec.method.fsdp
    if fsdp is None:
        return ""
    extras = [] if fsdp.reshard_after_forward else ["no reshard after forward"]
    return "fsdp2" + (" cpu-offload" if fsdp.cpu_offload else "") + "".join(f" ({e})" for e in extras)


def _method_label(spec: JobSpec, attention: str) -> str:
    m = spec.method
    parts = [
        m.kind + (f" r={m.lora.r}" if m.kind != "full" else ""),
        spec.precision,
        m.deepspeed or "",
        _fsdp_label(spec),
        "gradient checkpointing" if m.gradient_checkpointing else "",
        "liger" if m.liger else "",
        attention,
    ]
    micro = f"; micro-batch {spec.train.micro_batch_size} x {spec.data.max_length} tokens"
    return ", ".join(p for p in parts if p) + micro


def _attention_and_logits_notes(spec: JobSpec, shape: ModelShape, device: Accelerator) -> list[str]:
    notes = []
    attention = planned_attention(spec, device)
    if spec.model.attn_implementation == "auto":
        notes.append(
            f"attention: auto is {attention} here"
            + (
                " (assumed: flash-attn on the workers, from rayft's gpu extra; without it sdpa, and packed "
                "rows add a T x T mask a micro-batch)"
                if attention in FLASH_ATTENTION
                else ""
            )
        )
    T = spec.train.micro_batch_size * spec.data.max_length
    full_logits = T * shape.vocab * 4 * 2  # fp32 logits and their gradient, as a plain LM head would hold them
    tile = min(T, LOSS_TILE_TOKENS) * min(shape.vocab, LOSS_TILE_VOCAB) * 4
    notes.append(
        f"logits: TRL's chunked LM head holds one {min(T, LOSS_TILE_TOKENS)} x {min(shape.vocab, LOSS_TILE_VOCAB)} "
        f"tile ({tile / GiB:.2f} GiB) instead of the full logits and their gradient ({full_logits / GiB:.1f} GiB at "
        f"{T:,} tokens x {shape.vocab:,})"
        + (
            "; method.liger adds Liger's RMSNorm/RoPE/SwiGLU kernels (their activation savings are not counted), and "
            "Liger's fused linear cross-entropy would hold about as much as TRL's head (TRL refuses both at once)"
            if spec.method.liger
            else ""
        )
    )
    return notes


def _notes(spec: JobSpec, shape: ModelShape, device: Accelerator, peft_fp32_upcast: bool) -> list[str]:
    kind = device.kind
    notes = [
        f"margin: {ALLOCATOR_MARGIN[kind]:.0%} of the tensors for allocator fragmentation; runtime: "
        f"{RUNTIME_BYTES[kind] / GiB:.1f} GiB ("
        + ("CUDA context, NCCL/cuBLAS workspaces)" if kind == "gpu" else "Python, torch, transformers, Ray)"),
        f"time: {MFU[kind]:.0%} of peak FLOP/s assumed, no communication stalls, rows as long as data.max_length",
    ]
    if spec.train.optimizer not in OPTIMIZER_STATE_BYTES:
        notes.append(f"optimizer {spec.train.optimizer!r} is not in the table: counted as AdamW (8 bytes a parameter)")
    if spec.method.kind != "full" and spec.method.lora.use_dora:
        notes.append("DoRA: only its magnitude vectors are counted, not its extra activations")
    if spec.method.kind == "qlora" and peft_fp32_upcast and spec.model.dtype == "auto" and not spec.method.deepspeed:
        extra = (shape.params - shape.layers * shape.layer_linear_params) * 2
        notes.append(
            f"QLoRA: PEFT's prepare_model_for_kbit_training upcasts embeddings, head and norms to fp32 "
            f"(+{extra / GiB:.2f} GiB), and with them the hidden states between layers"
        )
    notes.extend(_attention_and_logits_notes(spec, shape, device))
    if device.name == "T4" and spec.precision == "bf16":
        notes.append("T4 has no bf16 arithmetic: use method.precision=fp16")
    if kind == "cpu":
        notes.append(f"cpu: {device.memory_gib:.1f} GiB RAM per worker (this machine's RAM / workers unless given)")
    return notes
