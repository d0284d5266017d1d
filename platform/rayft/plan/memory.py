"""Per-worker peak memory of a training run: weights, adapters, gradients, optimizer states,
ZeRO sharding and offload, activations (with and without checkpointing), the LM head's loss
tiles. Every assumption is a named constant with its source; tests/test_plan.py checks the
totals against measured runs (bench/results/plan_accuracy.md)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from rayft.errors import SpecError
from rayft.model.loading import weight_dtype
from rayft.plan.shapes import LINEAR_NAMES, Accelerator, ModelShape
from rayft.spec import JobSpec
from rayft.spec.schema import FLASH_ATTENTION

GiB = 1024**3

# ----------------------------------------------------------------------------- assumptions
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# 4-bit NF4/FP4: two weights a byte, plus one fp32 absmax per 64 weights, or with double
# quantization an 8-bit absmax per 64 and an fp32 constant per 256 of those (bitsandbytes).
NF4_BYTES = 0.5
NF4_CONSTANT_BYTES = {True: 1 / 64 + 4 / (64 * 256), False: 4 / 64}
# Optimizer state bytes per trainable parameter (fp32 states). Unknown names count as AdamW.
OPTIMIZER_STATE_BYTES = {
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "adamw_hf": 8,
    "adamw_apex_fused": 8,
    "paged_adamw_32bit": 8,
    "adamw_bnb_8bit": 2,
    "adamw_8bit": 2,
    "paged_adamw_8bit": 2,
    "lion_32bit": 4,
    "paged_lion_32bit": 4,
    "lion_8bit": 1,
    "paged_lion_8bit": 1,
    "adafactor": 0,
    "sgd": 0,
    "rmsprop": 4,
    "adagrad": 4,
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
    ("fp32", "full"): (32, 8, 16),
    ("fp32", "adapter"): (24, 8, 16),
    ("amp", "full"): (30, 4, 8),
    ("half", "full"): (20, 4, 8),
    ("half", "adapter"): (24, 4, 8),
    ("amp32", "adapter"): (24, 4, 14),
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


@dataclass(frozen=True)
class Setup:
    """How rayft will run the spec: the dtypes and the sharding that decide every byte."""

    kind: str  # full | lora | qlora
    weight_bytes: int  # base weights (the non-quantized ones for QLoRA); also the residual stream's
    stored_bytes: int  # the base weights as stored: weight_bytes, but fp32 masters under FSDP mixed precision
    adapter_bytes: int
    autocast: bool
    compute_bytes: int  # matmul inputs and outputs
    zero_stage: int  # 0: no DeepSpeed
    offload_params: bool
    offload_optimizer: bool
    regime: str  # a key of ACTIVATION_BYTES
    fsdp: bool = False
    reshard: bool = True  # FSDP frees a layer's gathered weights after its forward
    fsdp_offload: bool = False


def setup(spec: JobSpec, peft_fp32_upcast: bool) -> Setup:
    method, half = spec.method, spec.precision in ("bf16", "fp16")
    stage, offload_params, offload_optimizer = _deepspeed(method.deepspeed)
    weights = DTYPE_BYTES[weight_dtype(spec)]  # what rayft.model loads the base in
    if method.kind == "qlora" and peft_fp32_upcast and spec.model.dtype == "auto":
        weights = 4  # PEFT upcasts what is not 4-bit to fp32 (rayft casts it back)
    if stage and half:
        weights = 2  # DeepSpeed casts the module to 16-bit; fp32 masters live in its optimizer
    stored, fsdp = weights, method.fsdp
    if fsdp is not None and half:
        weights = 2  # FSDP2's MixedPrecisionPolicy gathers 16-bit copies; the shards keep what was loaded
    autocast = half and not stage and fsdp is None
    compute = 2 if (autocast or weights == 2) else 4
    group = "full" if method.kind == "full" else "adapter"
    regime = "fp32" if compute == 4 else "half" if weights == 2 else "amp" if group == "full" else "amp32"
    return Setup(
        method.kind,
        weights,
        stored,
        2 if (stage and half) else 4,
        autocast,
        compute,
        stage,
        offload_params,
        offload_optimizer,
        regime,
        fsdp=fsdp is not None,
        reshard=fsdp.reshard_after_forward if fsdp is not None else True,
        fsdp_offload=fsdp.cpu_offload if fsdp is not None else False,
    )


def planned_attention(spec: JobSpec, device: Accelerator) -> str:
    """The attention implementation the plan assumes: the spec's, or what `auto` picks on a
    worker of this kind with rayft[gpu] installed (rayft.model.attention decides on the worker)."""
    choice = spec.model.attn_implementation
    if choice != "auto":
        return choice
    return "flash_attention_2" if device.kind == "gpu" else "sdpa"


def _deepspeed(choice: str | None) -> tuple[int, bool, bool]:
    """(ZeRO stage, parameters offloaded, optimizer offloaded) of `method.deepspeed`."""
    if not choice:
        return 0, False, False
    if choice in ("zero2", "zero3", "zero3-offload"):
        return int(choice[4]), choice.endswith("offload"), choice.endswith("offload")
    try:
        with open(choice, encoding="utf-8") as handle:
            zero = json.load(handle).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecError(f"cannot read {choice}: {exc}", field="method.deepspeed") from None

    def on_host(key: str) -> bool:
        return (zero.get(key) or {}).get("device") in ("cpu", "nvme")

    return int(zero.get("stage", 0)), on_host("offload_param"), on_host("offload_optimizer")


def lora_targets(spec: JobSpec) -> list[str]:
    targets = spec.method.lora.target_modules
    if targets == "all-linear":
        return list(LINEAR_NAMES)
    if isinstance(targets, str):  # PEFT matches a string as a regex over the whole module name
        return [
            n
            for n in LINEAR_NAMES
            if any(re.fullmatch(targets, f"model.layers.0.{part}.{n}") for part in ("self_attn", "mlp"))
        ] or list(LINEAR_NAMES)
    return [n for n in LINEAR_NAMES if n in targets] + (["lm_head"] if "lm_head" in targets else [])


def adapter_params(spec: JobSpec, shape: ModelShape) -> int:
    if spec.method.kind == "full":
        return 0
    lora, linears, targets = spec.method.lora, shape.linears(), lora_targets(spec)
    per_layer = sum(lora.r * sum(linears[n]) + (linears[n][1] if lora.use_dora else 0) for n in targets if n in linears)
    head = lora.r * (shape.hidden + shape.vocab) if "lm_head" in targets else 0
    copies = sum(shape.embedding_params for m in lora.modules_to_save if m in ("embed_tokens", "lm_head"))
    return shape.layers * per_layer + head + copies


def trainable_params(spec: JobSpec, shape: ModelShape) -> int:
    return shape.params if spec.method.kind == "full" else adapter_params(spec, shape)


@dataclass
class Item:
    """One line of the memory table: bytes live at the peak on one worker, and why."""

    name: str
    bytes: float
    why: str


@dataclass
class Parts:
    """The memory of one worker before the peak is chosen (bytes)."""

    weights: float
    gathered: float  # a layer's (or the embedding's) full weights, what ZeRO-3 gathers
    adapters: float
    grads: float
    grad_bytes: int
    optimizer: float
    state_bytes: int
    master_bytes: int
    step_temp: float
    host: float = 0.0
    buckets: float = 0.0
    gathered_live: float = 0.0


def memory(
    spec: JobSpec, shape: ModelShape, device: Accelerator, peft_fp32_upcast: bool
) -> tuple[dict[str, int], dict[str, str], int]:
    """What is live at the peak on one worker (bytes), why, and what is offloaded to the host."""
    s = setup(spec, peft_fp32_upcast)
    parts = _sharded(spec, shape, s, _unsharded(spec, shape, s, device))
    items = _static_items(spec, shape, s, parts) + _peak_items(spec, shape, s, device, parts)
    kept = [item for item in items if item.bytes]
    return {i.name: int(i.bytes) for i in kept}, {i.name: i.why for i in kept}, int(parts.host)


def _unsharded(spec: JobSpec, shape: ModelShape, s: Setup, device: Accelerator) -> Parts:
    """Weights, gradients, optimizer states and the optimizer step's temporaries on one worker
    as if nothing were sharded."""
    trainable = trainable_params(spec, shape)
    if s.kind == "qlora":
        quantized = shape.layers * shape.layer_linear_params
        per_quantized = NF4_BYTES + NF4_CONSTANT_BYTES[spec.method.quantization.double_quant]
        weights = quantized * per_quantized + (shape.params - quantized) * s.stored_bytes
        gathered = max(shape.layer_linear_params * per_quantized, shape.embedding_params * s.weight_bytes)
    else:
        weights = shape.params * s.stored_bytes
        gathered = max(shape.layer_params, shape.embedding_params) * s.weight_bytes
    grad_bytes = s.stored_bytes if s.kind == "full" else s.adapter_bytes
    state = OPTIMIZER_STATE_BYTES.get(spec.train.optimizer, 8)
    master = DEEPSPEED_MASTER_BYTES if (s.zero_stage and grad_bytes == 2) else 0
    if spec.train.optimizer in FUSED_OPTIMIZERS or state < 8:
        step_temp = 0
    else:  # torch's foreach AdamW (GPU) makes a full-size temporary; its CPU loop one per tensor
        step_temp = 4 * (trainable if device.kind == "gpu" else _largest_trainable(spec, shape))
    return Parts(
        weights=weights,
        gathered=gathered,
        adapters=adapter_params(spec, shape) * s.adapter_bytes,
        grads=trainable * grad_bytes,
        grad_bytes=grad_bytes,
        optimizer=trainable * (state + master),
        state_bytes=state,
        master_bytes=master,
        step_temp=step_temp,
    )


def _sharded(spec: JobSpec, shape: ModelShape, s: Setup, p: Parts) -> Parts:
    """DeepSpeed ZeRO: stage 1 shards optimizer states, 2 also gradients, 3 also weights;
    offload moves them to the host."""
    n, trainable = spec.scaling.num_workers, trainable_params(spec, shape)
    if s.fsdp:
        return _fsdp_sharded(shape, s, p, n)
    if s.zero_stage >= 1:
        p.optimizer, p.step_temp = p.optimizer / n, p.step_temp / n
    if s.zero_stage >= 2:
        p.grads, p.buckets = p.grads / n, 2 * shape.hidden**2 * 2  # + a double-buffered reduce bucket
        p.step_temp += min(ZERO2_ALLGATHER_ELEMENTS, trainable) * 2 if s.zero_stage == 2 else 0
    if s.zero_stage >= 1 and s.offload_optimizer:
        p.host, p.optimizer, p.step_temp = p.host + p.optimizer + p.grads, 0, 0
    if s.zero_stage == 3:
        p.weights, p.adapters = p.weights / n, p.adapters / n
        p.gathered_live = min(2 * p.gathered, max(p.gathered, ZERO3_MAX_LIVE_PARAMS * 2))
        if s.offload_params:
            p.host, p.weights = p.host + p.weights, 0
    return p


def _fsdp_sharded(shape: ModelShape, s: Setup, p: Parts, n: int) -> Parts:
    """FSDP2: weights, gradients and optimizer states sharded n ways (FULL_SHARD). In a layer's
    forward and backward its 16-bit weights are gathered, and the next layer's are prefetched;
    without resharding after forward every layer stays gathered until its backward. A layer's
    unsharded gradients live until their reduce-scatter. Offload keeps the shards in host RAM."""
    p.weights, p.adapters, p.grads, p.optimizer, p.step_temp = (
        x / n for x in (p.weights, p.adapters, p.grads, p.optimizer, p.step_temp)
    )
    every_layer = shape.layers * shape.layer_params * s.weight_bytes + shape.embedding_params * s.weight_bytes
    p.gathered_live = 2 * p.gathered if s.reshard else max(2 * p.gathered, every_layer)
    layer_trainable = shape.layer_params if s.kind == "full" else 0
    p.buckets = layer_trainable * s.compute_bytes  # one layer's unsharded gradients, before reduce-scatter
    if s.fsdp_offload:
        p.host = p.weights + p.adapters + p.grads + p.optimizer
        p.weights = p.adapters = p.grads = p.optimizer = p.step_temp = 0
    return p


def _static_items(spec: JobSpec, shape: ModelShape, s: Setup, p: Parts) -> list[Item]:
    """What is live all the time: weights, adapters, optimizer states, DDP's buckets."""
    n, trainable = spec.scaling.num_workers, trainable_params(spec, shape)
    ddp = trainable * p.grad_bytes if (n > 1 and not s.zero_stage and not s.fsdp) else 0
    return [
        Item("weights", p.weights, _weights_note(spec, s)),
        Item(
            "LoRA adapters",
            p.adapters,
            f"{adapter_params(spec, shape) / 1e6:,.1f} M parameters, {s.adapter_bytes} bytes each",
        ),
        Item(
            "optimizer states",
            p.optimizer,
            f"{spec.train.optimizer}: {p.state_bytes} bytes per trainable "
            f"parameter"
            + (" + an fp32 master copy" if p.master_bytes else "")
            + (f", sharded {n} ways" if (s.zero_stage or s.fsdp) else "")
            + (" (in host RAM)" if s.fsdp_offload else ""),
        ),
        Item("DDP gradient buckets", ddp, "DDP's all-reduce buckets: a second copy of the gradients"),
    ]


def _peak_items(spec: JobSpec, shape: ModelShape, s: Setup, device: Accelerator, p: Parts) -> list[Item]:
    """The peak: the start of backward (every activation live) or the optimizer step."""
    method = spec.method
    T = spec.train.micro_batch_size * spec.data.max_length  # tokens in a micro-batch
    saved, rebuilt = _saved_activations(spec, shape, s, T, device)
    head_trainable = s.kind == "full" or "lm_head" in method.lora.modules_to_save
    transient = max(_loss_head_bytes(shape, s, device, T, head_trainable), rebuilt)
    if s.kind == "qlora":  # the layer at hand is dequantized (and cast to fp32 for fp32 gradients)
        largest = max(a * b for a, b in shape.linears().values())
        transient += largest * (s.compute_bytes + (4 if s.weight_bytes == 4 else 0))
    mask = T * T if (spec.data.packing and planned_attention(spec, device) not in FLASH_ATTENTION) else 0
    amp_copies = shape.layers * shape.layer_linear_params * 2 if (s.autocast and s.kind == "full") else 0
    keeps_grads = spec.gradient_accumulation_steps > 1 or s.kind != "full" or s.zero_stage >= 2 or s.fsdp
    live_grads = p.grads if keeps_grads else (shape.embedding_params * p.grad_bytes if head_trainable else 0)
    backward = amp_copies + saved + mask + transient + p.gathered_live + live_grads
    if backward < p.grads + p.step_temp:
        return [
            Item("gradients", p.grads + p.buckets, f"{p.grad_bytes} bytes per trainable parameter"),
            Item("optimizer step temporaries", p.step_temp, "the peak is the optimizer step: activations are freed"),
        ]
    checkpointed = method.gradient_checkpointing
    return [
        Item(
            "gradients",
            live_grads + p.buckets,
            "all, kept across accumulation"
            if keeps_grads
            else "only the LM head's: the others replace activations as backward runs",
        ),
        Item(
            "activations",
            saved + mask,
            ("checkpointed layer inputs" if checkpointed else "saved for backward")
            + f", {T:,} tokens a micro-batch"
            + (", packed attention mask" if mask else ""),
        ),
        Item(
            "backward transients",
            transient,
            "loss tiles of the LM head, or one layer's backward" + (" (recomputed)" if checkpointed else ""),
        ),
        Item("autocast weight copies", amp_copies, "16-bit copies of the linear weights, forward to backward"),
        Item(
            "FSDP gathered weights" if s.fsdp else "ZeRO-3 gathered weights",
            p.gathered_live,
            "a layer's (or the head's) full weights, and the next"
            if s.reshard
            else "every layer's 16-bit weights, gathered from forward to backward (reshard_after_forward: false)",
        ),
    ]


def _saved_activations(spec: JobSpec, shape: ModelShape, s: Setup, T: int, device: Accelerator) -> tuple[float, float]:
    """(bytes saved by the forward for backward, bytes of the layer being recomputed or differentiated)."""
    layer = T * _layer_activation_bytes(spec, shape, s, device)
    grad_h, grad_i = ACTIVATION_GRAD_VALUES
    layer_grads = T * (grad_h * shape.hidden + grad_i * shape.intermediate) * s.compute_bytes
    final = T * shape.hidden * s.weight_bytes * (3 if s.kind == "full" else 1)  # final norm, head input
    if spec.method.gradient_checkpointing:  # keeps each layer's input; rebuilds one layer at a time
        return shape.layers * T * shape.hidden * s.weight_bytes + final, layer + layer_grads
    return shape.layers * layer + final, layer_grads


def _layer_activation_bytes(spec: JobSpec, shape: ModelShape, s: Setup, device: Accelerator) -> float:
    """Bytes saved for backward per token by one decoder layer."""
    adapter = s.kind != "full"
    a, b, c = ACTIVATION_BYTES[(s.regime, "adapter" if adapter else "full")]
    h, kv, i, C = shape.hidden, shape.kv_dim, shape.intermediate, s.compute_bytes
    per_token = a * h + b * kv + c * i + ATTENTION_LSE_BYTES * shape.heads
    if adapter:
        per_token += LORA_BYTES_PER_RANK[C] * spec.method.lora.r * len(set(lora_targets(spec)) - {"lm_head"})
        if spec.method.lora.dropout > 0:
            extra_h, extra_i = LORA_DROPOUT_BYTES[C]
            per_token += extra_h * h + extra_i * i
    if planned_attention(spec, device) == "eager":  # fp32 softmax (and a 16-bit copy), repeated K/V
        keys = spec.data.max_length * (spec.train.micro_batch_size if spec.data.packing else 1)
        per_token += shape.heads * keys * (4 if C == 4 else 6) + 2 * (h - kv) * C
    return per_token


def _loss_head_bytes(shape: ModelShape, s: Setup, device: Accelerator, T: int, head_trainable: bool) -> int:
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


def _weights_note(spec: JobSpec, s: Setup) -> str:
    if s.kind == "qlora":
        kind = spec.method.quantization.quant_type
        text = f"{kind} 4-bit linear layers; embeddings, head, norms {s.weight_bytes} bytes"
    else:
        text = f"{s.weight_bytes} bytes per parameter"
    if s.fsdp and s.stored_bytes != s.weight_bytes:
        text = text.replace(f"{s.weight_bytes} bytes per parameter", f"{s.stored_bytes} bytes per parameter (masters)")
    return (
        text
        + (", sharded by ZeRO-3" if s.zero_stage == 3 else "")
        + (", sharded by FSDP2" if s.fsdp else "")
        + (" (in host RAM)" if s.fsdp_offload else "")
    )
