"""`rayft plan`: will this job fit, and how long will it take, before any GPU is rented.

Arithmetic on the model's shape (rayft.plan_shapes: config.json, a GGUF header or a built-in
table) and the spec. It models what rayft runs: transformers + PEFT + TRL's SFTTrainer, with
DeepSpeed when the spec asks. Every assumption is a named constant below, with its source; the
estimates are checked against measured runs in tests/test_plan.py (bench/results/plan_accuracy.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from rayft.errors import SpecError
from rayft.plan_shapes import (LINEAR_NAMES, Accelerator, ModelShape, accelerator as find_accelerator, model_shape,
                               prepared_stats)
from rayft.spec import JobSpec, load_spec

GiB = 1024 ** 3

# ----------------------------------------------------------------------------- assumptions
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# 4-bit NF4/FP4: two weights a byte, plus one fp32 absmax per 64 weights, or with double
# quantization an 8-bit absmax per 64 and an fp32 constant per 256 of those (bitsandbytes).
NF4_BYTES = 0.5
NF4_CONSTANT_BYTES = {True: 1 / 64 + 4 / (64 * 256), False: 4 / 64}
# Optimizer state bytes per trainable parameter (fp32 states). Unknown names count as AdamW.
OPTIMIZER_STATE_BYTES = {
    "adamw_torch": 8, "adamw_torch_fused": 8, "adamw_hf": 8, "adamw_apex_fused": 8, "paged_adamw_32bit": 8,
    "adamw_bnb_8bit": 2, "adamw_8bit": 2, "paged_adamw_8bit": 2, "lion_32bit": 4, "paged_lion_32bit": 4,
    "lion_8bit": 1, "paged_lion_8bit": 1, "adafactor": 0, "sgd": 0, "rmsprop": 4, "adagrad": 4,
}
FUSED_OPTIMIZERS = {"adamw_torch_fused", "adamw_apex_fused"}  # no full-size temporaries in step()
DEEPSPEED_MASTER_BYTES = 4  # DeepSpeed keeps fp32 master weights for 16-bit trainable ones
# Activations saved for backward, bytes per token per decoder layer = a*hidden + b*kv_dim +
# c*intermediate. Measured with torch.autograd.graph.saved_tensors_hooks on transformers 5.23,
# PEFT 0.21 (SDPA; LoRA on every linear layer). They agree with Korthikanti et al. 2022's
# accounting for a Llama layer: fp32 full fine-tuning saves 8h + 2kv + 4i values of 4 bytes.
#   fp32:  fp32 weights, no autocast (rayft's CPU default)
#   amp:   fp32 weights under bf16/fp16 autocast (the HF trainer's mixed precision)
#   half:  16-bit weights (LoRA on GPU, DeepSpeed, QLoRA without PEFT's fp32 upcast)
#   amp32: QLoRA after PEFT's fp32 upcast, under autocast (fp32 residual stream and MLP)
ACTIVATION_BYTES = {
    ("fp32", "full"): (32, 8, 16), ("fp32", "adapter"): (24, 8, 16), ("amp", "full"): (30, 4, 8),
    ("half", "full"): (20, 4, 8), ("half", "adapter"): (24, 4, 8), ("amp32", "adapter"): (24, 4, 14),
}
LORA_BYTES_PER_RANK = {4: 4, 2: 2}  # lora_A's output, per adapted linear layer, by compute bytes
LORA_DROPOUT_BYTES = {4: (40, 4), 2: (24, 4)}  # extra (a*hidden, c*intermediate) when dropout > 0
ATTENTION_LSE_BYTES = 4  # per head and token: SDPA saves an fp32 log-sum-exp
# A layer's backward briefly holds activation gradients: the residual stream's and three of the
# MLP's width (of gate, up and their product) at the SwiGLU's multiply: h + 3i values a token.
ACTIVATION_GRAD_VALUES = (1, 3)
# TRL's fused LM head never builds the whole logits: it projects tiles of 4096 tokens x 32768
# vocabulary entries (trl/kernels/chunked_logprob.py). On GPU one tile is live; the CPU fallback's
# temporaries measured 34 bytes per token and vocabulary entry of a tile here.
LOSS_TILE_TOKENS, LOSS_TILE_VOCAB, CPU_LOSS_BYTES_PER_ENTRY = 4096, 32768, 34
# ZeRO-3 gathers a layer's weights in 16-bit and prefetches the next, up to
# stage3_max_live_parameters (1e9); ZeRO-2 all-gathers updated weights in buckets of 5e8
# elements (rayft's preset); both reduce gradients in buckets of hidden^2 (HF's "auto").
ZERO3_MAX_LIVE_PARAMS, ZERO2_ALLGATHER_ELEMENTS = 1_000_000_000, 500_000_000
# Beyond the tensors: the allocator's fragmentation (PyTorch's caching allocator on GPU; glibc on
# CPU keeps freed heap pages: 7-54% over the live tensors in the runs measured here) and the
# runtime (CUDA context, NCCL/cuBLAS workspaces; on CPU the Python/torch/transformers/Ray process,
# 0.6 GiB measured here without Ray).
ALLOCATOR_MARGIN = {"gpu": 0.10, "cpu": 0.35}
RUNTIME_BYTES = {"gpu": 1 * GiB, "cpu": 1 * GiB}
MFU = {"gpu": 0.40, "cpu": 0.35}  # assumed fraction of peak FLOP/s a step reaches (CPU: 0.24-0.45 measured here)


@dataclass
class Suggestion:
    change: str
    overrides: list[str]  # paste after the spec: rayft train spec.yaml OVERRIDES
    total_bytes: int
    fits: bool


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
def estimate(spec: JobSpec, tokens: int | None = None, accelerator: str | None = None, *,
             memory_gib: float | None = None, shape: ModelShape | None = None,
             peft_fp32_upcast: bool = False, suggest: bool = True) -> Plan:
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
    device = find_accelerator(name, field="--accelerator" if accelerator else "scaling.accelerator_type",
                              memory_gib=memory_gib, workers=spec.scaling.num_workers,
                              cpus_per_worker=spec.scaling.cpus_per_worker)
    memory, why, host = _memory(spec, shape, device, peft_fp32_upcast)
    peak = sum(memory.values())
    margin, runtime = int(peak * ALLOCATOR_MARGIN[device.kind]), RUNTIME_BYTES[device.kind]
    total = peak + margin + runtime + (host if device.kind == "cpu" else 0)  # on CPU "offloaded" is the same RAM
    capacity = int(device.memory_gib * GiB)
    notes = _notes(spec, shape, device, peft_fp32_upcast)
    plan = Plan(model=f"{shape.name} ({shape.source})", params=shape.params, trainable_params=_trainable(spec, shape),
                method=_method_label(spec), workers=spec.scaling.num_workers, accelerator=device.name,
                memory=memory, why=why, peak_bytes=peak, margin_bytes=margin, runtime_bytes=runtime,
                total_bytes=total, capacity_bytes=capacity, fits=total <= capacity, headroom_bytes=capacity - total,
                host_bytes=host, notes=notes, **_throughput(spec, shape, device, tokens, notes))
    if suggest and not plan.fits:
        plan.suggestions = suggestions(spec, shape, device, peft_fp32_upcast)
    return plan


# ------------------------------------------------------------------------------------ memory
@dataclass(frozen=True)
class _Setup:
    """How rayft will run the spec: the dtypes and the sharding that decide every byte."""

    kind: str  # full | lora | qlora
    weight_bytes: int  # base weights (the non-quantized ones for QLoRA); also the residual stream's
    adapter_bytes: int
    autocast: bool
    compute_bytes: int  # matmul inputs and outputs
    zero_stage: int  # 0: no DeepSpeed
    offload_params: bool
    offload_optimizer: bool
    regime: str  # a key of ACTIVATION_BYTES


def _setup(spec: JobSpec, peft_fp32_upcast: bool) -> _Setup:
    method, half = spec.method, spec.precision in ("bf16", "fp16")
    stage, offload_params, offload_optimizer = _deepspeed(method.deepspeed)
    if spec.model.dtype != "auto":
        weights = DTYPE_BYTES[spec.model.dtype]
    elif method.kind == "qlora":  # PEFT upcasts what is not 4-bit to fp32
        weights = 4 if peft_fp32_upcast else DTYPE_BYTES[method.quantization.compute_dtype]
    else:  # rayft.model.torch_dtype: bf16 for LoRA on GPU, fp32 (master) weights otherwise
        weights = 2 if (spec.scaling.use_gpu and method.kind == "lora" and spec.precision == "bf16") else 4
    if stage and half:
        weights = 2  # DeepSpeed casts the module to 16-bit; fp32 masters live in its optimizer
    autocast = half and not stage
    compute = 2 if (autocast or weights == 2) else 4
    group = "full" if method.kind == "full" else "adapter"
    regime = "fp32" if compute == 4 else "half" if weights == 2 else "amp" if group == "full" else "amp32"
    return _Setup(method.kind, weights, 2 if (stage and half) else 4, autocast, compute, stage,
                  offload_params, offload_optimizer, regime)


def _deepspeed(choice: str | None) -> tuple[int, bool, bool]:
    """(ZeRO stage, parameters offloaded, optimizer offloaded) of `method.deepspeed`."""
    if not choice:
        return 0, False, False
    if choice in ("zero2", "zero3", "zero3-offload"):
        return int(choice[4]), choice.endswith("offload"), choice.endswith("offload")
    try:
        zero = json.loads(open(choice, encoding="utf-8").read()).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecError(f"cannot read {choice}: {exc}", field="method.deepspeed") from None
    on_host = lambda key: (zero.get(key) or {}).get("device") in ("cpu", "nvme")  # noqa: E731
    return int(zero.get("stage", 0)), on_host("offload_param"), on_host("offload_optimizer")


def _lora_targets(spec: JobSpec) -> list[str]:
    targets = spec.method.lora.target_modules
    if targets == "all-linear":
        return list(LINEAR_NAMES)
    if isinstance(targets, str):  # PEFT matches a string as a regex over the whole module name
        import re

        return [n for n in LINEAR_NAMES if any(re.fullmatch(targets, f"model.layers.0.{part}.{n}")
                                               for part in ("self_attn", "mlp"))] or list(LINEAR_NAMES)
    return [n for n in LINEAR_NAMES if n in targets] + (["lm_head"] if "lm_head" in targets else [])


def _adapter_params(spec: JobSpec, shape: ModelShape) -> int:
    if spec.method.kind == "full":
        return 0
    lora, linears, targets = spec.method.lora, shape.linears(), _lora_targets(spec)
    per_layer = sum(lora.r * sum(linears[n]) + (linears[n][1] if lora.use_dora else 0) for n in targets if n in linears)
    head = lora.r * (shape.hidden + shape.vocab) if "lm_head" in targets else 0
    copies = sum(shape.embedding_params for m in lora.modules_to_save if m in ("embed_tokens", "lm_head"))
    return shape.layers * per_layer + head + copies


def _trainable(spec: JobSpec, shape: ModelShape) -> int:
    return shape.params if spec.method.kind == "full" else _adapter_params(spec, shape)


def _layer_activation_bytes(spec: JobSpec, shape: ModelShape, s: _Setup) -> float:
    """Bytes saved for backward per token by one decoder layer."""
    adapter = s.kind != "full"
    a, b, c = ACTIVATION_BYTES[(s.regime, "adapter" if adapter else "full")]
    h, kv, i, C = shape.hidden, shape.kv_dim, shape.intermediate, s.compute_bytes
    per_token = a * h + b * kv + c * i + ATTENTION_LSE_BYTES * shape.heads
    if adapter:
        per_token += LORA_BYTES_PER_RANK[C] * spec.method.lora.r * len(set(_lora_targets(spec)) - {"lm_head"})
        if spec.method.lora.dropout > 0:
            extra_h, extra_i = LORA_DROPOUT_BYTES[C]
            per_token += extra_h * h + extra_i * i
    if spec.model.attn_implementation == "eager":  # fp32 softmax (and a 16-bit copy), repeated K/V
        keys = spec.data.max_length * (spec.train.micro_batch_size if spec.data.packing else 1)
        per_token += shape.heads * keys * (4 if C == 4 else 6) + 2 * (h - kv) * C
    return per_token


def _memory(spec: JobSpec, shape: ModelShape, device: Accelerator,
            peft_fp32_upcast: bool) -> tuple[dict[str, int], dict[str, str], int]:
    """What is live at the peak on one worker (bytes), why, and what is offloaded to the host."""
    s, n, method = _setup(spec, peft_fp32_upcast), spec.scaling.num_workers, spec.method
    trainable, adapters = _trainable(spec, shape), _adapter_params(spec, shape) * s.adapter_bytes
    # weights
    if s.kind == "qlora":
        quantized = shape.layers * shape.layer_linear_params
        per_quantized = NF4_BYTES + NF4_CONSTANT_BYTES[method.quantization.double_quant]
        weights = quantized * per_quantized + (shape.params - quantized) * s.weight_bytes
        gathered = max(shape.layer_linear_params * per_quantized, shape.embedding_params * s.weight_bytes)
    else:
        weights = shape.params * s.weight_bytes
        gathered = max(shape.layer_params, shape.embedding_params) * s.weight_bytes
    # gradients, optimizer states, the optimizer step's temporaries
    grad_bytes = s.weight_bytes if s.kind == "full" else s.adapter_bytes
    grads = trainable * grad_bytes
    state = OPTIMIZER_STATE_BYTES.get(spec.train.optimizer, 8)
    master = DEEPSPEED_MASTER_BYTES if (s.zero_stage and grad_bytes == 2) else 0
    optimizer = trainable * (state + master)
    if spec.train.optimizer in FUSED_OPTIMIZERS or state < 8:
        step_temp = 0
    else:  # torch's foreach AdamW (GPU) makes a full-size temporary; its CPU loop one per tensor
        step_temp = 4 * (trainable if device.kind == "gpu" else _largest_trainable(spec, shape))
    # DeepSpeed ZeRO: stage 1 shards optimizer states, 2 also gradients, 3 also weights
    host, gathered_live, buckets = 0, 0, 0
    if s.zero_stage >= 1:
        optimizer, step_temp = optimizer / n, step_temp / n
    if s.zero_stage >= 2:
        grads, buckets = grads / n, 2 * shape.hidden ** 2 * 2  # + a double-buffered reduce bucket
        step_temp += min(ZERO2_ALLGATHER_ELEMENTS, trainable) * 2 if s.zero_stage == 2 else 0
    if s.zero_stage >= 1 and s.offload_optimizer:
        host, optimizer, step_temp = host + optimizer + grads, 0, 0
    if s.zero_stage == 3:
        weights, adapters = weights / n, adapters / n
        gathered_live = min(2 * gathered, max(gathered, ZERO3_MAX_LIVE_PARAMS * 2))
        if s.offload_params:
            host, weights = host + weights, 0
    # activations: saved by the forward, and the largest transient of the backward
    T = spec.train.micro_batch_size * spec.data.max_length  # tokens in a micro-batch
    layer = T * _layer_activation_bytes(spec, shape, s)
    grad_h, grad_i = ACTIVATION_GRAD_VALUES
    layer_grads = T * (grad_h * shape.hidden + grad_i * shape.intermediate) * s.compute_bytes
    final = T * shape.hidden * s.weight_bytes * (3 if s.kind == "full" else 1)  # final norm, head input
    if method.gradient_checkpointing:  # keeps each layer's input; rebuilds one layer at a time
        saved, rebuilt = shape.layers * T * shape.hidden * s.weight_bytes + final, layer + layer_grads
    else:
        saved, rebuilt = shape.layers * layer + final, layer_grads
    head_trainable = s.kind == "full" or "lm_head" in method.lora.modules_to_save
    transient = max(_loss_head_bytes(shape, s, device, T, head_trainable), rebuilt)
    if s.kind == "qlora":  # the layer at hand is dequantized (and cast to fp32 for fp32 gradients)
        largest = max(a * b for a, b in shape.linears().values())
        transient += largest * (s.compute_bytes + (4 if s.weight_bytes == 4 else 0))
    mask = T * T if (spec.data.packing and spec.model.attn_implementation != "flash_attention_2") else 0
    amp_copies = shape.layers * shape.layer_linear_params * 2 if (s.autocast and s.kind == "full") else 0
    ddp = trainable * grad_bytes if (n > 1 and not s.zero_stage) else 0
    # the peak: the start of backward (every activation live) or the optimizer step
    keeps_grads = spec.gradient_accumulation_steps > 1 or s.kind != "full" or s.zero_stage >= 2
    live_grads = grads if keeps_grads else (shape.embedding_params * grad_bytes if head_trainable else 0)
    backward = amp_copies + saved + mask + transient + gathered_live + live_grads
    at_step = grads + step_temp
    items = [("weights", weights, _weights_note(spec, s)),
             ("LoRA adapters", adapters,
              f"{_adapter_params(spec, shape) / 1e6:,.1f} M parameters, {s.adapter_bytes} bytes each"),
             ("optimizer states", optimizer, f"{spec.train.optimizer}: {state} bytes per trainable parameter"
              + (" + an fp32 master copy" if master else "") + (f", sharded {n} ways" if s.zero_stage else "")),
             ("DDP gradient buckets", ddp, "DDP's all-reduce buckets: a second copy of the gradients")]
    if backward >= at_step:
        items += [("gradients", live_grads + buckets, "all, kept across accumulation" if keeps_grads else
                   "only the LM head's: the others replace activations as backward runs"),
                  ("activations", saved + mask, ("checkpointed layer inputs" if method.gradient_checkpointing else
                                                 "saved for backward") + f", {T:,} tokens a micro-batch"
                   + (", packed attention mask" if mask else "")),
                  ("backward transients", transient, "loss tiles of the LM head, or one layer's backward"
                   + (" (recomputed)" if method.gradient_checkpointing else "")),
                  ("autocast weight copies", amp_copies, "16-bit copies of the linear weights, forward to backward"),
                  ("ZeRO-3 gathered weights", gathered_live, "a layer's (or the head's) full weights, and the next")]
    else:
        items += [("gradients", grads + buckets, f"{grad_bytes} bytes per trainable parameter"),
                  ("optimizer step temporaries", step_temp, "the peak is the optimizer step: activations are freed")]
    memory = {name: int(value) for name, value, _ in items if value}
    return memory, {name: note for name, _, note in items if name in memory}, int(host)


def _loss_head_bytes(shape: ModelShape, s: _Setup, device: Accelerator, T: int, head_trainable: bool) -> int:
    tile = min(T, LOSS_TILE_TOKENS) * min(shape.vocab, LOSS_TILE_VOCAB)
    if device.kind == "cpu":
        tiles = tile * CPU_LOSS_BYTES_PER_ENTRY
    else:  # one tile in the compute dtype, plus a 16-bit copy of a slice of fp32 head weights
        cast = min(shape.vocab, LOSS_TILE_VOCAB) * shape.hidden * 2 if s.weight_bytes > s.compute_bytes else 0
        tiles = tile * s.compute_bytes + cast
    # the hidden states' gradient, and the head's (if it trains) accumulate in fp32
    return tiles + T * shape.hidden * 4 + (shape.embedding_params * 4 if head_trainable else 0)


def _largest_trainable(spec: JobSpec, shape: ModelShape) -> int:
    if spec.method.kind == "full" or spec.method.lora.modules_to_save:
        return max(shape.embedding_params, max(a * b for a, b in shape.linears().values()))
    return spec.method.lora.r * shape.intermediate


def _weights_note(spec: JobSpec, s: _Setup) -> str:
    if s.kind == "qlora":
        kind = spec.method.quantization.quant_type
        text = f"{kind} 4-bit linear layers; embeddings, head, norms {s.weight_bytes} bytes"
    else:
        text = f"{s.weight_bytes} bytes per parameter"
    return text + (", sharded by ZeRO-3" if s.zero_stage == 3 else "")


# -------------------------------------------------------------------------------- throughput
def _throughput(spec: JobSpec, shape: ModelShape, device: Accelerator, tokens: int | None,
                notes: list[str]) -> dict[str, Any]:
    N, L, h = shape.matmul_params, shape.layers, shape.heads * shape.head_size
    attention = 2 * L * h * spec.data.max_length  # causal QK^T and AV: half of 4*h*s a layer
    forward = 2 * N + attention
    weight_grads = 2 * N if spec.method.kind == "full" else 6 * _adapter_params(spec, shape)
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
        from rayft.train.driver import step_plan  # the trainer's own step count

        if rows is None:
            rows = math.ceil(tokens / spec.data.max_length)
            notes.append(f"{rows:,} rows an epoch assumed: the tokens in full rows of data.max_length")
        steps = step_plan(spec, rows)
        per_epoch, total = steps["steps_per_epoch"], steps["total_steps"]
        seconds = tokens * executed / (spec.scaling.num_workers * peak * 1e12 * MFU[device.kind])
    return dict(flops_per_token=float(3 * forward), executed_flops_per_token=float(executed), peak_tflops=peak,
                mfu=MFU[device.kind], effective_batch=spec.train.global_batch_size,
                tokens_per_step=spec.train.global_batch_size * spec.data.max_length,
                gradient_accumulation=spec.gradient_accumulation_steps, tokens=tokens, tokens_source=source,
                steps_per_epoch=per_epoch, total_steps=total, seconds_per_epoch=seconds)


# ------------------------------------------------------------------------------- suggestions
def suggestions(spec: JobSpec, shape: ModelShape, device: Accelerator,
                peft_fp32_upcast: bool = False) -> list[Suggestion]:
    """The single changes that make it fit, each re-estimated, least disruptive first; when none
    fits alone, those that help and the smallest combination (in that order) that fits."""
    def replan(overrides: list[str]) -> Plan | None:
        try:
            changed = load_spec(data=spec.to_dict(redacted=False), overrides=overrides)
        except SpecError:  # a combination the spec refuses (e.g. QLoRA with ZeRO-3 offload)
            return None
        return estimate(changed, tokens=0, shape=shape, accelerator=device.name, memory_gib=device.memory_gib,
                        peft_fp32_upcast=peft_fp32_upcast, suggest=False)

    baseline = replan([]).total_bytes
    found = [Suggestion(change, overrides, plan.total_bytes, plan.fits)
             for change, overrides in _candidates(spec, device)
             if (plan := replan(overrides)) and plan.total_bytes < baseline]
    micro = [s for s in found if s.change.startswith("micro-batch")]  # keep one: the largest that fits
    found = [s for s in found if s not in micro or s is next((m for m in micro if m.fits), micro[-1])]
    if found and not any(s.fits for s in found):
        chosen, best = [], None
        for s in found:  # add changes while they help, until it fits ...
            plan = replan([o for c in chosen + [s] for o in c.overrides])
            if plan and plan.total_bytes < (best.total_bytes if best else baseline):
                chosen, best = chosen + [s], plan
                if plan.fits:
                    break
        for s in list(chosen[:-1]) if best and best.fits else []:  # ... then drop those it fits without
            fewer = [c for c in chosen if c is not s]
            if (plan := replan([o for c in fewer for o in c.overrides])) and plan.fits:
                chosen, best = fewer, plan
        if best and len(chosen) > 1:
            found.append(Suggestion(" + ".join(s.change for s in chosen), [o for s in chosen for o in s.overrides],
                                    best.total_bytes, best.fits))
    if any(s.fits for s in found):
        found = [s for s in found if s.fits]
    return found


def _candidates(spec: JobSpec, device: Accelerator) -> list[tuple[str, list[str]]]:
    method, gpu, n = spec.method, device.kind == "gpu", spec.scaling.num_workers
    out = [] if method.gradient_checkpointing else [("gradient checkpointing", ["method.gradient_checkpointing=true"])]
    micro = spec.train.micro_batch_size
    while micro > 1:  # the same global batch, with more accumulation
        micro //= 2
        if spec.train.global_batch_size % (micro * n) == 0:
            out.append((f"micro-batch {micro}", [f"train.micro_batch_size={micro}"]))
    if gpu and n > 1 and not (method.deepspeed or "").startswith("zero3"):
        compute = method.quantization.compute_dtype  # ZeRO-3 shards 4-bit weights stored in it
        storage = [f"method.quantization.storage_dtype={compute}"] if method.kind == "qlora" else []
        out.append(("DeepSpeed ZeRO-3", ["method.deepspeed=zero3", *storage]))
    if gpu and method.kind != "qlora" and method.deepspeed != "zero3-offload":
        out.append(("ZeRO-3 with CPU offload", ["method.deepspeed=zero3-offload"]))
    if method.kind == "full":
        out.append(("LoRA instead of full fine-tuning", ["method.kind=lora"]))
    if method.kind != "qlora" and method.deepspeed != "zero3-offload":
        out.append(("QLoRA (4-bit base weights)", ["method.kind=qlora"]))
    return out


# ----------------------------------------------------------------------------- description
def _method_label(spec: JobSpec) -> str:
    m = spec.method
    parts = [m.kind + (f" r={m.lora.r}" if m.kind != "full" else ""), spec.precision, m.deepspeed or "",
             "gradient checkpointing" if m.gradient_checkpointing else "", spec.model.attn_implementation]
    micro = f"; micro-batch {spec.train.micro_batch_size} x {spec.data.max_length} tokens"
    return ", ".join(p for p in parts if p) + micro


def _notes(spec: JobSpec, shape: ModelShape, device: Accelerator, peft_fp32_upcast: bool) -> list[str]:
    kind = device.kind
    notes = [f"margin: {ALLOCATOR_MARGIN[kind]:.0%} of the tensors for allocator fragmentation; runtime: "
             f"{RUNTIME_BYTES[kind] / GiB:.1f} GiB ("
             + ("CUDA context, NCCL/cuBLAS workspaces)" if kind == "gpu" else "Python, torch, transformers, Ray)"),
             f"time: {MFU[kind]:.0%} of peak FLOP/s assumed, no communication stalls, rows as long as data.max_length"]
    if spec.train.optimizer not in OPTIMIZER_STATE_BYTES:
        notes.append(f"optimizer {spec.train.optimizer!r} is not in the table: counted as AdamW (8 bytes a parameter)")
    if spec.method.kind != "full" and spec.method.lora.use_dora:
        notes.append("DoRA: only its magnitude vectors are counted, not its extra activations")
    if spec.method.kind == "qlora" and peft_fp32_upcast and spec.model.dtype == "auto" and not spec.method.deepspeed:
        extra = (shape.params - shape.layers * shape.layer_linear_params) * 2
        notes.append(f"QLoRA: PEFT's prepare_model_for_kbit_training upcasts embeddings, head and norms to fp32 "
                     f"(+{extra / GiB:.2f} GiB), and with them the hidden states between layers")
    if device.name == "T4" and spec.precision == "bf16":
        notes.append("T4 has no bf16 arithmetic: use method.precision=fp16")
    if kind == "cpu":
        notes.append(f"cpu: {device.memory_gib:.1f} GiB RAM per worker (this machine's RAM / workers unless given)")
    return notes


def render(plan: Plan, console: Any) -> None:
    """The plan as rich tables: memory per worker with the verdict, compute, fixes, notes."""
    from rich.table import Table

    gib = lambda b: f"{b / GiB:,.2f} GiB"  # noqa: E731
    memory = Table(title=f"plan: {plan.model}", title_justify="left")
    for column, justify in (("memory per worker", "left"), ("", "right"), ("why", "left")):
        memory.add_column(column, justify=justify)
    for name, value in plan.memory.items():
        memory.add_row(name, gib(value), plan.why.get(name, ""))
    memory.add_row("margin", gib(plan.margin_bytes), "allocator fragmentation")
    memory.add_row("runtime", gib(plan.runtime_bytes), "the process itself, not tensors")
    if plan.host_bytes:
        memory.add_row("offloaded", gib(plan.host_bytes), "host RAM per worker, not counted above")
    verdict = "[green]fits[/]" if plan.fits else "[bold red]does not fit[/]"
    memory.add_row("[bold]total[/]", f"[bold]{gib(plan.total_bytes)}[/]",
                   f"{verdict} in {gib(plan.capacity_bytes)} ({plan.accelerator}), headroom {gib(plan.headroom_bytes)}")
    console.print(memory)
    compute = Table(title="compute", title_justify="left", show_header=False)
    compute.add_column(style="bold")
    compute.add_column()
    hours = f"{plan.seconds_per_epoch / 3600:,.2f} h" if plan.seconds_per_epoch else "-"
    for key, value in (
        ("method", f"{plan.method}; {plan.workers} worker(s)"),
        ("parameters", f"{plan.params / 1e9:,.3f} B, {plan.trainable_params / 1e6:,.1f} M trainable"),
        ("FLOPs per token", f"{plan.flops_per_token / 1e9:,.2f} GFLOP (6N + attention), "
                            f"{plan.executed_flops_per_token / 1e9:,.2f} executed"),
        ("effective batch", f"{plan.effective_batch} rows (<= {plan.tokens_per_step:,} tokens) a step, "
                            f"{plan.gradient_accumulation} accumulation step(s)"),
        ("tokens per epoch", f"{plan.tokens:,} ({plan.tokens_source})" if plan.tokens else plan.tokens_source),
        ("optimizer steps", f"{plan.steps_per_epoch:,} an epoch, {plan.total_steps:,} in all"
                            if plan.steps_per_epoch else "-"),
        ("time per epoch", f"{hours} at {plan.mfu:.0%} of {plan.peak_tflops * 1000:,.0f} GFLOP/s a worker"
                           if plan.peak_tflops < 1 else f"{hours} at {plan.mfu:.0%} of {plan.peak_tflops:,.0f} TFLOP/s a worker"),
    ):
        compute.add_row(key, value)
    console.print(compute)
    if plan.suggestions:
        fixes = Table(title="what would make it fit", title_justify="left")
        for column in ("change", "overrides", "total", ""):
            fixes.add_column(column)
        for s in plan.suggestions:
            verdict = "[green]fits[/]" if s.fits else "[red]no[/]"
            fixes.add_row(s.change, " ".join(s.overrides), gib(s.total_bytes), verdict)
        console.print(fixes)
    for note in plan.notes:
        console.print(f"[dim]- {note}[/]", soft_wrap=True)
