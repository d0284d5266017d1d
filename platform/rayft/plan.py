"""`rayft plan`: will this job fit, and how long will it take, before any GPU is rented.

Pure arithmetic on the model's shape (config.json, a GGUF header or a built-in table) and the
spec. Every assumption is a named constant below with where it comes from; the memory model
follows what rayft actually runs (transformers + PEFT + TRL's SFTTrainer, optionally DeepSpeed)
and is checked against measured runs in tests/test_plan.py and bench/results/plan_accuracy.md.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from rayft.errors import SpecError
from rayft.plan_shapes import LINEAR_NAMES, ModelShape, model_shape
from rayft.spec import JobSpec, load_spec

GiB = 1024 ** 3

# ----------------------------------------------------------------------------- assumptions
# Bytes per weight for each dtype; 4-bit NF4/FP4 packs two weights a byte plus its constants:
# one absmax per 64 weights (fp32), or with double quantization an 8-bit absmax per 64 and an
# fp32 per 256 of those (bitsandbytes' defaults).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "uint8": 1}
NF4_BYTES = 0.5
NF4_CONSTANT_BYTES = {True: 1 / 64 + 4 / (64 * 256), False: 4 / 64}
# Optimizer state bytes per trainable parameter (fp32 states; torch keeps them in the parameter's
# dtype). Unknown names are taken as AdamW, and say so.
OPTIMIZER_STATE_BYTES = {
    "adamw_torch": 8, "adamw_torch_fused": 8, "adamw_hf": 8, "adamw_apex_fused": 8, "paged_adamw_32bit": 8,
    "adamw_bnb_8bit": 2, "adamw_8bit": 2, "paged_adamw_8bit": 2, "lion_32bit": 4, "paged_lion_32bit": 4,
    "lion_8bit": 1, "paged_lion_8bit": 1, "adafactor": 0, "sgd": 0, "rmsprop": 4, "adagrad": 4,
}
DEEPSPEED_MASTER_BYTES = 4  # DeepSpeed keeps an fp32 master copy of 16-bit trainable weights.
# Saved activations per token per decoder layer, in bytes: a*hidden + b*kv_dim + c*intermediate.
# Measured with torch.autograd.graph.saved_tensors_hooks on transformers 5.23 / PEFT 0.21 (SDPA,
# LoRA on all linear layers); they match Korthikanti et al. 2022's accounting for a Llama layer
# without dropout (e.g. fp32 full fine-tuning: 8h + 2kv + 4i values of 4 bytes).
#   fp32:  fp32 weights, no autocast (rayft's CPU default)
#   amp:   fp32 weights under bf16/fp16 autocast (HF mixed precision)
#   half:  16-bit weights (LoRA on GPU, DeepSpeed, QLoRA without PEFT's fp32 upcast)
#   amp32: QLoRA with PEFT's fp32 upcast under autocast (fp32 residual stream and MLP)
ACTIVATION_BYTES = {
    ("fp32", "full"): (32, 8, 16), ("fp32", "adapter"): (24, 8, 16),
    ("amp", "full"): (30, 4, 8), ("amp", "adapter"): (24, 4, 14),
    ("half", "full"): (20, 4, 8), ("half", "adapter"): (24, 4, 8),
    ("amp32", "adapter"): (24, 4, 14),
}
LORA_DROPOUT_BYTES = {4: (40, 4), 2: (24, 4)}  # extra (a*hidden, c*intermediate) when dropout > 0
ATTENTION_LSE_BYTES = 4  # per head and token: SDPA saves the fp32 log-sum-exp
# TRL's fused LM head never builds the full logits: it projects tiles of 4096 tokens x 32768
# vocabulary entries (trl/kernels/chunked_logprob.py). On GPU one tile buffer is live; its CPU
# fallback holds about 8 fp32 tile-sized temporaries (measured here: 32 bytes per token-vocab entry).
LOSS_TILE_TOKENS, LOSS_TILE_VOCAB, CPU_LOSS_TILE_COPIES = 4096, 32768, 8
# DeepSpeed ZeRO-3 gathers a layer's full weights (and prefetches the next) in 16-bit, up to
# stage3_max_live_parameters (default 1e9); ZeRO-2 all-gathers updated weights in buckets of
# allgather_bucket_size elements (rayft's preset: 5e8).
ZERO3_MAX_LIVE_PARAMS, ZERO2_ALLGATHER_ELEMENTS = 1_000_000_000, 500_000_000
# Beyond the tensors: the allocator's fragmentation (PyTorch's caching allocator on GPU; glibc on
# CPU, which keeps freed heap pages: 10-25% measured here) and the runtime itself (CUDA context
# and NCCL/cuBLAS workspaces on GPU; Python + torch + transformers + Ray in a CPU worker).
ALLOCATOR_MARGIN = {"gpu": 0.10, "cpu": 0.20}
RUNTIME_BYTES = {"gpu": 1 * GiB, "cpu": 1 * GiB}
MFU = {"gpu": 0.40, "cpu": 0.30}  # assumed fraction of peak FLOP/s a fine-tuning step reaches


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense, no sparsity; the fp16 figure where there is no bf16
    fp32_tflops: float
    kind: str = "gpu"


# Datasheet figures (dense). T4 has no bf16: its 16-bit figure is fp16's. A10G: the A10's
# datasheet figure; AWS's A10G runs lower clocks, so its times are optimistic.
ACCELERATORS = {a.name: a for a in (
    Accelerator("A100-40G", 40, 312, 19.5), Accelerator("A100-80G", 80, 312, 19.5),
    Accelerator("H100-80G", 80, 989, 67), Accelerator("H200", 141, 989, 67),
    Accelerator("L4", 24, 121, 30.3), Accelerator("A10G", 24, 125, 31.2), Accelerator("T4", 16, 65, 8.1),
)}
ALIASES = {"A100": "A100-40G", "H100": "H100-80G", "A100-80GB": "A100-80G", "A100-40GB": "A100-40G",
           "H100-80GB": "H100-80G", "H100-SXM": "H100-80G"}
CPU_CORE_GFLOPS = 150  # fp32, one AVX-512 core with two FMA units at ~2.3 GHz


@dataclass
class Suggestion:
    change: str
    overrides: list[str]
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
    memory: dict[str, int]  # what is live at the peak, per worker, in bytes
    notes_by_item: dict[str, str]
    peak_bytes: int  # tensors at the peak moment
    margin_bytes: int
    runtime_bytes: int
    total_bytes: int
    capacity_bytes: int
    fits: bool
    headroom_bytes: int
    host_bytes: int  # offloaded to the host's RAM, per worker
    flops_per_token: float  # model FLOPs (6N + attention), what MFU is quoted against
    executed_flops_per_token: float  # with LoRA's skipped weight gradients and recomputation
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
             peft_fp32_upcast: bool = True, suggest: bool = True) -> Plan:
    """Per-worker peak memory, FLOPs and time for `spec`, and changes that would make it fit.

    tokens: training tokens per epoch (default: the prepared data's count, when cached).
    accelerator: a name from ACCELERATORS or "cpu" (default: scaling.accelerator_type).
    memory_gib: the device's memory, overriding the table (for "cpu": the worker's RAM).
    peft_fp32_upcast: QLoRA as PEFT's prepare_model_for_kbit_training leaves it (embeddings, LM
    head and norms in fp32); False for stacks that keep them 16-bit, like torchtune's.
    """
    shape = shape or model_shape(spec)
    device = _accelerator(spec, accelerator, memory_gib)
    memory, item_notes, host = _memory(spec, shape, device, peft_fp32_upcast)
    peak = sum(memory.values())
    margin = int(peak * ALLOCATOR_MARGIN[device.kind])
    runtime = RUNTIME_BYTES[device.kind]
    total, capacity = peak + margin + runtime, int(device.memory_gib * GiB)
    if device.kind == "cpu":
        total += host  # "offloaded" to the same RAM
    notes = _notes(spec, shape, device, peft_fp32_upcast)
    plan = Plan(
        model=f"{shape.name} ({shape.source})", params=shape.params, trainable_params=_trainable(spec, shape),
        method=_method_label(spec), workers=spec.scaling.num_workers, accelerator=device.name,
        memory=memory, notes_by_item=item_notes, peak_bytes=peak, margin_bytes=margin, runtime_bytes=runtime,
        total_bytes=total, capacity_bytes=capacity, fits=total <= capacity, headroom_bytes=capacity - total,
        host_bytes=host, notes=notes, **_throughput(spec, shape, device, tokens, notes))
    if suggest and not plan.fits:
        plan.suggestions = suggestions(spec, shape, device, peft_fp32_upcast)
    return plan


def _accelerator(spec: JobSpec, name: str | None, memory_gib: float | None) -> Accelerator:
    field_name = "--accelerator" if name else "scaling.accelerator_type"
    name = name or spec.scaling.accelerator_type or ("A100-80G" if spec.scaling.use_gpu else "cpu")
    if name.lower() == "cpu":
        if memory_gib is None:
            import psutil  # workers are assumed to share this machine's RAM evenly

            memory_gib = psutil.virtual_memory().total / GiB / spec.scaling.num_workers
        return Accelerator("cpu", memory_gib, 0, CPU_CORE_GFLOPS / 1000 * spec.scaling.cpus_per_worker, "cpu")
    key = ALIASES.get(name.upper(), name.upper().replace("GB", "G"))
    known = {k.upper(): v for k, v in ACCELERATORS.items()}
    if key not in known:
        raise SpecError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}, cpu", field=field_name)
    found = known[key]
    return Accelerator(found.name, memory_gib or found.memory_gib, found.bf16_tflops, found.fp32_tflops)


# ------------------------------------------------------------------------------------ memory
@dataclass(frozen=True)
class _Setup:
    """How rayft will run the spec: the dtypes and sharding that decide every byte."""

    kind: str  # full | lora | qlora
    weight_bytes: float  # base weights (non-quantized ones for QLoRA)
    adapter_bytes: int
    autocast: bool
    compute_bytes: int  # matmul inputs/outputs
    residual_bytes: int  # the hidden state between layers
    zero_stage: int  # 0 without DeepSpeed
    offload_params: bool
    offload_optimizer: bool
    regime: str  # a key of ACTIVATION_BYTES


def _setup(spec: JobSpec, peft_fp32_upcast: bool) -> _Setup:
    method, precision = spec.method, spec.precision
    half = precision in ("bf16", "fp16")
    stage, off_params, off_opt = _deepspeed(method.deepspeed)
    if method.kind == "qlora":
        compute = DTYPE_BYTES[method.quantization.compute_dtype]
        weights = compute if (stage or not peft_fp32_upcast or spec.model.dtype != "auto") else 4
    elif spec.model.dtype != "auto":
        weights = DTYPE_BYTES[spec.model.dtype]
    else:  # rayft.model.torch_dtype: bf16 for LoRA on GPU, fp32 master weights otherwise
        weights = 2 if (spec.scaling.use_gpu and method.kind == "lora" and precision == "bf16") else 4
    if stage and half:
        weights = 2  # DeepSpeed casts the module to 16-bit and keeps fp32 masters in the optimizer
    autocast = half and not stage
    adapter = 2 if (stage and half) else 4  # PEFT upcasts adapters to fp32
    compute = 2 if (autocast or weights == 2) else 4
    group = "full" if method.kind == "full" else "adapter"
    regime = "fp32" if compute == 4 else ("half" if weights == 2 else ("amp" if method.kind != "qlora" else "amp32"))
    if (regime, group) not in ACTIVATION_BYTES:
        regime = "amp"
    return _Setup(method.kind, weights, adapter, autocast, compute, int(weights), stage, off_params, off_opt, regime)


def _deepspeed(choice: str | None) -> tuple[int, bool, bool]:
    """(ZeRO stage, parameters offloaded, optimizer offloaded) of `method.deepspeed`."""
    if not choice:
        return 0, False, False
    if choice in ("zero2", "zero3"):
        return int(choice[-1]), False, False
    if choice == "zero3-offload":
        return 3, True, True
    try:
        zero = json.loads(open(choice, encoding="utf-8").read()).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecError(f"cannot read {choice}: {exc}", field="method.deepspeed") from None
    device = lambda key: (zero.get(key) or {}).get("device") in ("cpu", "nvme")  # noqa: E731
    return int(zero.get("stage", 0)), device("offload_param"), device("offload_optimizer")


def _lora_targets(spec: JobSpec) -> list[str]:
    targets = spec.method.lora.target_modules
    if targets == "all-linear":
        return list(LINEAR_NAMES)
    if isinstance(targets, str):  # PEFT matches a string as a regex over the full module name
        import re

        return [n for n in LINEAR_NAMES if re.fullmatch(targets, f"model.layers.0.self_attn.{n}")
                or re.fullmatch(targets, f"model.layers.0.mlp.{n}")] or list(LINEAR_NAMES)
    return [n for n in LINEAR_NAMES if any(n == t or n.endswith(t) for t in targets)] + \
        (["lm_head"] if "lm_head" in targets else [])


def _adapter_params(spec: JobSpec, shape: ModelShape) -> int:
    if spec.method.kind == "full":
        return 0
    lora, linears = spec.method.lora, shape.linears()
    per_layer = sum(lora.r * sum(linears[n]) + (linears[n][1] if lora.use_dora else 0)
                    for n in _lora_targets(spec) if n in linears)
    head = lora.r * (shape.hidden + shape.vocab) if "lm_head" in _lora_targets(spec) else 0
    saved = sum(shape.embedding_params for m in lora.modules_to_save if m in ("embed_tokens", "lm_head"))
    return shape.layers * per_layer + head + saved


def _trainable(spec: JobSpec, shape: ModelShape) -> int:
    return shape.params if spec.method.kind == "full" else _adapter_params(spec, shape)


def _activation_bytes_per_token_layer(spec: JobSpec, shape: ModelShape, setup: _Setup) -> float:
    group = "full" if setup.kind == "full" else "adapter"
    a, b, c = ACTIVATION_BYTES[(setup.regime, group)]
    h, kv, i, C = shape.hidden, shape.kv_dim, shape.intermediate, setup.compute_bytes
    per_token = a * h + b * kv + c * i + ATTENTION_LSE_BYTES * shape.heads
    if group == "adapter":
        per_token += C * spec.method.lora.r * len([t for t in _lora_targets(spec) if t != "lm_head"])
        if spec.method.lora.dropout > 0:
            extra_h, extra_i = LORA_DROPOUT_BYTES[C]
            per_token += extra_h * h + extra_i * i
    if spec.model.attn_implementation == "eager":  # the softmax (fp32, plus a 16-bit copy) and repeated K/V
        per_token += shape.heads * _attention_span(spec) * (4 if C == 4 else 6) + 2 * (h - kv) * C
    return per_token


def _attention_span(spec: JobSpec) -> int:
    """Keys each query sees in the attention kernel: packed micro-batches are one long row."""
    return spec.data.max_length * (spec.train.micro_batch_size if spec.data.packing else 1)


def _memory(spec: JobSpec, shape: ModelShape, device: Accelerator,
            peft_fp32_upcast: bool) -> tuple[dict[str, int], dict[str, str], int]:
    """What is live at the peak (per worker), why, and what is offloaded to the host."""
    s = _setup(spec, peft_fp32_upcast)
    n = spec.scaling.num_workers
    trainable = _trainable(spec, shape)
    head_trainable = s.kind == "full" or "lm_head" in spec.method.lora.modules_to_save
    # -- weights
    if s.kind == "qlora":
        quantized = shape.layers * shape.layer_linear_params
        dq = spec.method.quantization.double_quant
        weights = quantized * (NF4_BYTES + NF4_CONSTANT_BYTES[dq]) + (shape.params - quantized) * s.weight_bytes
    else:
        weights = shape.params * s.weight_bytes
    adapters = _adapter_params(spec, shape) * s.adapter_bytes
    layer_weights = weights / shape.params * max(shape.layer_params, shape.embedding_params)
    # -- gradients, optimizer states and the optimizer step's temporaries
    grad_bytes = s.weight_bytes if s.kind == "full" else s.adapter_bytes
    grads = trainable * grad_bytes
    state = OPTIMIZER_STATE_BYTES.get(spec.train.optimizer, 8)
    optimizer = trainable * (state + (DEEPSPEED_MASTER_BYTES if s.zero_stage and grad_bytes == 2 else 0))
    fused = spec.train.optimizer == "adamw_torch_fused" or state < 8
    step_temp = 0 if fused else (trainable if device.kind == "gpu" else _largest_tensor(spec, shape)) * 4
    host = 0
    items: dict[str, int] = {}
    notes: dict[str, str] = {}
    if s.zero_stage >= 1:
        optimizer //= n
        step_temp //= n
        if s.offload_optimizer:
            host += optimizer + grads // n
            optimizer, step_temp = 0, 0
    if s.zero_stage >= 2:
        grads = grads // n + 2 * shape.hidden ** 2 * 2  # partition + reduce bucket (h^2, double-buffered)
        if s.zero_stage == 2:
            step_temp += min(ZERO2_ALLGATHER_ELEMENTS, trainable) * 2
    zero_working = 0
    if s.zero_stage == 3:
        adapters //= n
        base = weights
        weights = 0 if s.offload_params else weights / n
        host += base / n if s.offload_params else 0
        zero_working = min(2 * layer_weights, max(layer_weights, ZERO3_MAX_LIVE_PARAMS * 2))
    # -- activations
    T = spec.train.micro_batch_size * spec.data.max_length
    per_layer = _activation_bytes_per_token_layer(spec, shape, s)
    nonlayer = T * shape.hidden * s.residual_bytes * (3 if s.kind == "full" else 1)  # final norm, head input
    if spec.method.gradient_checkpointing:
        saved = shape.layers * T * shape.hidden * s.residual_bytes + nonlayer
        recompute = T * per_layer  # one layer's activations, rebuilt during backward
    else:
        saved, recompute = shape.layers * T * per_layer + nonlayer, 0
    loss_head = _loss_head_bytes(spec, shape, s, device, T, head_trainable)
    transient = max(loss_head, recompute)
    if s.kind == "qlora":  # the layer being computed is dequantized (16-bit; cast to fp32 for fp32 gradients)
        transient += max(a * b for a, b in shape.linears().values()) * (s.compute_bytes + (4 if s.residual_bytes == 4 else 0))
    mask = T * T if (spec.data.packing and spec.model.attn_implementation != "flash_attention_2") else 0
    amp_cache = shape.layers * shape.layer_linear_params * 2 if (s.autocast and s.kind == "full") else 0
    ddp_buckets = trainable * grad_bytes if (n > 1 and not s.zero_stage) else 0
    # -- the two candidate peaks: start of backward (all activations live) and the optimizer step
    accumulating = spec.gradient_accumulation_steps > 1 or s.kind != "full" or s.zero_stage >= 2
    head_grads = shape.embedding_params * grad_bytes if (head_trainable and not s.zero_stage) else 0
    backward = amp_cache + saved + transient + mask + zero_working + (grads if accumulating else head_grads)
    step = grads + step_temp
    items["weights"] = int(weights)
    notes["weights"] = _weights_note(spec, s, shape)
    if adapters:
        items["LoRA adapters"] = int(adapters)
        notes["LoRA adapters"] = f"{_adapter_params(spec, shape) / 1e6:,.1f}M parameters, {s.adapter_bytes} bytes each"
    items["optimizer states"] = int(optimizer)
    notes["optimizer states"] = f"{spec.train.optimizer}: {state} bytes per trainable parameter" + \
        (" + fp32 master copy" if s.zero_stage and grad_bytes == 2 else "") + (f", / {n} (ZeRO)" if s.zero_stage else "")
    if ddp_buckets:
        items["DDP gradient buckets"] = int(ddp_buckets)
        notes["DDP gradient buckets"] = "DDP's all-reduce buckets: one more copy of the gradients"
    if backward >= step:
        items["gradients"] = int(grads if accumulating else head_grads)
        notes["gradients"] = "all, kept across accumulation steps" if accumulating else \
            "only the LM head's at the peak; the rest replace activations as backward runs"
        items["activations"] = int(saved + mask)
        notes["activations"] = (f"{'checkpointed layer inputs' if spec.method.gradient_checkpointing else 'saved for backward'}, "
                                f"{T:,} tokens per micro-batch" + (", + packed attention mask" if mask else ""))
        items["backward transients"] = int(transient)
        notes["backward transients"] = "the LM head's loss tiles" + (" or one recomputed layer" if recompute else "") + \
            (", a dequantized layer" if s.kind == "qlora" else "")
        if amp_cache:
            items["autocast weight copies"] = int(amp_cache)
            notes["autocast weight copies"] = "16-bit copies of the linear weights during forward/backward"
        if zero_working:
            items["ZeRO-3 gathered layers"] = int(zero_working)
            notes["ZeRO-3 gathered layers"] = "a layer's full weights and the prefetched next one"
    else:
        items["gradients"] = int(grads)
        notes["gradients"] = f"{grad_bytes} bytes per trainable parameter"
        items["optimizer step temporaries"] = int(step_temp)
        notes["optimizer step temporaries"] = "the peak is the optimizer step (activations are freed)"
    return items, notes, int(host)


def _loss_head_bytes(spec: JobSpec, shape: ModelShape, s: _Setup, device: Accelerator, T: int, trainable: bool) -> int:
    tile = min(T, LOSS_TILE_TOKENS) * min(shape.vocab, LOSS_TILE_VOCAB)
    if device.kind == "cpu":
        tiles = CPU_LOSS_TILE_COPIES * tile * 4
    else:  # one tile in the compute dtype, and a 16-bit copy of a slice of fp32 head weights
        tiles = tile * s.compute_bytes + (min(shape.vocab, LOSS_TILE_VOCAB) * shape.hidden * 2 if s.weight_bytes == 4 and s.compute_bytes == 2 else 0)
    grad_hidden = T * shape.hidden * 4  # accumulated in fp32
    grad_weight = shape.embedding_params * 4 if trainable else 0
    return tiles + grad_hidden + grad_weight


def _largest_tensor(spec: JobSpec, shape: ModelShape) -> int:
    if spec.method.kind == "full":
        return max(shape.embedding_params, max(a * b for a, b in shape.linears().values()))
    return max(spec.method.lora.r * shape.intermediate, shape.embedding_params if spec.method.lora.modules_to_save else 0)


def _weights_note(spec: JobSpec, s: _Setup, shape: ModelShape) -> str:
    if s.kind == "qlora":
        q = spec.method.quantization
        text = f"{q.quant_type} 4-bit linear layers; embeddings, head and norms at {int(s.weight_bytes)} bytes"
    else:
        text = f"{int(s.weight_bytes)} bytes per parameter"
    return text + (", sharded by ZeRO-3" if s.zero_stage == 3 and not s.offload_params else "") + \
        (", offloaded to host RAM" if s.offload_params else "")


# -------------------------------------------------------------------------------- throughput
def _throughput(spec: JobSpec, shape: ModelShape, device: Accelerator, tokens: int | None,
                notes: list[str]) -> dict[str, Any]:
    full, gc = spec.method.kind == "full", spec.method.gradient_checkpointing
    N, L, h = shape.matmul_params, shape.layers, shape.heads * shape.head_size
    attention = 2 * L * h * spec.data.max_length  # causal QK^T and AV: half of 4*h*s per layer
    model_flops = 3 * (2 * N + attention)  # forward + backward (2x forward): 6N + attention
    adapter = _adapter_params(spec, shape)
    executed = 2 * N + attention + 2 * N + 2 * attention + (2 * N if full else 6 * adapter) + \
        ((2 * N + attention) if gc else 0)
    half = spec.precision in ("bf16", "fp16")
    peak = device.bf16_tflops if (half and device.kind == "gpu") else device.fp32_tflops
    mfu = MFU[device.kind]
    rows, source = None, "not given: pass --tokens or run `rayft prepare` first"
    if tokens is None:
        stats = prepared_stats(spec)
        if stats:
            tokens, rows, source = stats["tokens"], stats["rows"], "prepared data"
    elif tokens:
        source = "given"
    per_epoch = total = seconds = None
    if tokens:
        from rayft.train.driver import step_plan

        rows = rows or math.ceil(tokens / spec.data.max_length)
        if source == "given":
            notes.append(f"rows per epoch assumed {rows:,} (the tokens in rows of data.max_length)")
        steps = step_plan(spec, rows)
        per_epoch, total = steps["steps_per_epoch"], steps["total_steps"]
        seconds = tokens * executed / (spec.scaling.num_workers * peak * 1e12 * mfu)
    return dict(flops_per_token=float(model_flops), executed_flops_per_token=float(executed), peak_tflops=peak,
                mfu=mfu, effective_batch=spec.train.global_batch_size,
                tokens_per_step=spec.train.global_batch_size * spec.data.max_length,
                gradient_accumulation=spec.gradient_accumulation_steps, tokens=tokens, tokens_source=source,
                steps_per_epoch=per_epoch, total_steps=total, seconds_per_epoch=seconds)


def prepared_stats(spec: JobSpec) -> dict[str, int] | None:
    """The train split's token and row counts, when `rayft prepare` has cached this spec's data
    (same cache key as training uses). Needs the tokenizer of a local, non-GGUF model."""
    try:
        from rayft.model import resolve_source

        source = resolve_source(spec.model)
        if not source.local or source.gguf_file or "://" in spec.run.storage_path:
            return None
        from rayft.data.prepare import cache_key, prepared_root, read_stats
        from rayft.data.sources import expand
        from rayft.data.templates import resolve_template
        from rayft.model import load_tokenizer

        tokenizer = load_tokenizer(spec, source.location)
        sources = spec.data.train + (spec.data.eval or [])
        needs_template = any((src.format or spec.data.format) != "text" for src in sources)
        template = resolve_template(spec.data.template, tokenizer) if needs_template else None
        key = cache_key(spec, tokenizer, template, [expand(src.path) for src in sources])
        stats = read_stats(prepared_root(spec, key))
        train = (stats or {}).get("splits", {}).get("train")
        return {"tokens": train["tokens"], "rows": train["rows"]} if train else None
    except Exception:  # a plan must not fail because the data is not there yet
        return None


# ------------------------------------------------------------------------------- suggestions
def suggestions(spec: JobSpec, shape: ModelShape, device: Accelerator, peft_fp32_upcast: bool = True) -> list[Suggestion]:
    """Single changes that lower the peak, each re-estimated; if none fits, their combination."""
    candidates = _candidates(spec, device)
    found = []
    for change, overrides in candidates:
        plan = _replan(spec, overrides, shape, device, peft_fp32_upcast)
        if plan:
            found.append(Suggestion(change, overrides, plan.total_bytes, plan.fits))
    baseline = estimate(spec, shape=shape, accelerator=device.name, memory_gib=device.memory_gib,
                        peft_fp32_upcast=peft_fp32_upcast, suggest=False).total_bytes
    found = [s for s in found if s.total_bytes < baseline]
    if found and not any(s.fits for s in found):  # combine them, most helpful first, until it fits
        combined, best, names = [], None, []
        for s in sorted(found, key=lambda s: s.total_bytes):
            plan = _replan(spec, combined + s.overrides, shape, device, peft_fp32_upcast)
            if plan and plan.total_bytes < (best.total_bytes if best else baseline):
                combined, best, names = combined + s.overrides, plan, names + [s.change]
                if plan.fits:
                    break
        if best and len(names) > 1:
            found.append(Suggestion(" + ".join(names), combined, best.total_bytes, best.fits))
    return sorted(found, key=lambda s: (not s.fits, s.total_bytes))


def _candidates(spec: JobSpec, device: Accelerator) -> list[tuple[str, list[str]]]:
    method, gpu, n = spec.method, device.kind == "gpu", spec.scaling.num_workers
    out: list[tuple[str, list[str]]] = []
    if not method.gradient_checkpointing:
        out.append(("gradient checkpointing", ["method.gradient_checkpointing=true"]))
    micro = spec.train.micro_batch_size
    while micro > 1:
        micro //= 2
        if spec.train.global_batch_size % (micro * n) == 0:
            out.append((f"micro-batch {micro} (more accumulation, same global batch)", [f"train.micro_batch_size={micro}"]))
    if gpu and n > 1 and not (method.deepspeed or "").startswith("zero3"):
        extra = [f"method.quantization.storage_dtype={method.quantization.compute_dtype}"] if method.kind == "qlora" else []
        out.append(("DeepSpeed ZeRO-3", ["method.deepspeed=zero3", *extra]))
    if gpu and method.kind != "qlora" and method.deepspeed != "zero3-offload":
        out.append(("ZeRO-3 with CPU offload", ["method.deepspeed=zero3-offload"]))
    if method.kind == "full":
        out.append(("LoRA instead of full fine-tuning", ["method.kind=lora"]))
    if method.kind != "qlora" and method.deepspeed != "zero3-offload":
        out.append(("QLoRA (4-bit base weights)", ["method.kind=qlora"]))
    return out


def _replan(spec: JobSpec, overrides: list[str], shape: ModelShape, device: Accelerator,
            peft_fp32_upcast: bool) -> Plan | None:
    try:
        changed = load_spec(data=spec.to_dict(redacted=False), overrides=overrides)
    except SpecError:  # a combination the spec refuses (e.g. QLoRA with ZeRO-3 offload)
        return None
    return estimate(changed, tokens=0, shape=shape, accelerator=device.name, memory_gib=device.memory_gib,
                    peft_fp32_upcast=peft_fp32_upcast, suggest=False)


# ------------------------------------------------------------------------------------- notes
def _method_label(spec: JobSpec) -> str:
    m = spec.method
    parts = [m.kind + (f" r={m.lora.r}" if m.kind != "full" else ""), spec.precision]
    parts += [m.deepspeed] if m.deepspeed else []
    parts += ["gradient checkpointing"] if m.gradient_checkpointing else []
    return ", ".join(parts) + f"; micro-batch {spec.train.micro_batch_size} x {spec.data.max_length} tokens"


def _notes(spec: JobSpec, shape: ModelShape, device: Accelerator, peft_fp32_upcast: bool) -> list[str]:
    kind = device.kind
    notes = [f"margin: {ALLOCATOR_MARGIN[kind]:.0%} of the tensors for allocator fragmentation; runtime: "
             f"{RUNTIME_BYTES[kind] / GiB:.1f} GiB ({'CUDA context, NCCL/cuBLAS workspaces' if kind == 'gpu' else 'Python, torch, transformers, Ray'})",
             f"time assumes {MFU[kind]:.0%} of peak FLOP/s and no communication stalls"]
    if spec.train.optimizer not in OPTIMIZER_STATE_BYTES:
        notes.append(f"optimizer {spec.train.optimizer!r} is not in the table: counted as AdamW (8 bytes per parameter)")
    if spec.method.kind != "full" and spec.method.lora.use_dora:
        notes.append("DoRA: only its magnitude vectors are counted; its extra activations are not")
    if spec.method.kind == "qlora" and peft_fp32_upcast and not spec.method.deepspeed:
        extra = (shape.params - shape.layers * shape.layer_linear_params) * 2
        notes.append(f"QLoRA: PEFT's prepare_model_for_kbit_training upcasts embeddings, head and norms to fp32 "
                     f"(+{extra / GiB:.2f} GiB) and with them the hidden states between layers")
    if device.name == "T4" and spec.precision == "bf16":
        notes.append("T4 has no bf16 arithmetic: use method.precision=fp16")
    if kind == "cpu":
        notes.append(f"cpu: {device.memory_gib:.1f} GiB RAM per worker (machine total / workers unless given)")
    return notes


# ------------------------------------------------------------------------------------ render
def render(plan: Plan, console: Any) -> None:
    from rich.table import Table

    gib = lambda b: f"{b / GiB:,.2f} GiB"  # noqa: E731
    table = Table(title=f"plan: {plan.model}", title_justify="left", show_header=True)
    table.add_column("memory per worker")
    table.add_column("", justify="right")
    table.add_column("why", style="dim")
    for name, value in plan.memory.items():
        table.add_row(name, gib(value), plan.notes_by_item.get(name, ""))
    table.add_row("margin", gib(plan.margin_bytes), "allocator fragmentation")
    table.add_row("runtime", gib(plan.runtime_bytes), "not tensors")
    verdict = "[green]fits[/]" if plan.fits else "[bold red]does not fit[/]"
    table.add_row("[bold]total[/]", f"[bold]{gib(plan.total_bytes)}[/]",
                  f"{verdict} in {gib(plan.capacity_bytes)} ({plan.accelerator}); headroom {gib(plan.headroom_bytes)}")
    if plan.host_bytes:
        table.add_row("host RAM (offload)", gib(plan.host_bytes), "per worker")
    console.print(table)
    speed = Table(show_header=False, title="compute", title_justify="left")
    speed.add_column(style="bold")
    speed.add_column()
    epoch = f"{plan.seconds_per_epoch / 3600:,.2f} h" if plan.seconds_per_epoch else "-"
    for key, value in (
        ("method", f"{plan.method}; {plan.workers} worker(s)"),
        ("parameters", f"{plan.params / 1e9:,.3f} B, {plan.trainable_params / 1e6:,.1f} M trainable"),
        ("FLOPs per token", f"{plan.flops_per_token / 1e9:,.2f} GFLOP (6N + attention); executed "
                            f"{plan.executed_flops_per_token / 1e9:,.2f}"),
        ("effective batch", f"{plan.effective_batch} sequences (<= {plan.tokens_per_step:,} tokens) a step, "
                            f"{plan.gradient_accumulation} accumulation step(s)"),
        ("tokens per epoch", f"{plan.tokens:,} ({plan.tokens_source})" if plan.tokens else plan.tokens_source),
        ("optimizer steps", f"{plan.steps_per_epoch:,} per epoch, {plan.total_steps:,} in total" if plan.steps_per_epoch else "-"),
        ("time per epoch", f"{epoch} at {plan.mfu:.0%} of {plan.peak_tflops:,.1f} TFLOP/s per worker"),
    ):
        speed.add_row(key, value)
    console.print(speed)
    if plan.suggestions:
        fixes = Table(title="to make it fit", title_justify="left")
        for column in ("change", "overrides", "total", ""):
            fixes.add_column(column)
        for s in plan.suggestions:
            fixes.add_row(s.change, " ".join(s.overrides), gib(s.total_bytes), "[green]fits[/]" if s.fits else "[red]no[/]")
        console.print(fixes)
    for note in plan.notes:
        console.print(f"[dim]- {note}[/]", soft_wrap=True)
