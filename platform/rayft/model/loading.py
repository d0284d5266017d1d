"""Loading the base model for training: its weights' dtype (decided here, once, for training,
evaluation, export and the planner), 4-bit quantization for QLoRA, and LoRA adapters."""

from __future__ import annotations

from typing import Any

from rayft.errors import ModelError
from rayft.model.attention import resolve_attention
from rayft.spec import JobSpec


def weight_dtype(spec: JobSpec) -> str:
    """The dtype the base model's (unquantized) weights are held in, by name: the spec's, else
    QLoRA's compute dtype, bf16 for LoRA on GPU, float32 otherwise (full fine-tuning keeps
    float32 master weights; mixed precision runs the math in bf16)."""
    if spec.model.dtype != "auto":
        return spec.model.dtype
    if spec.method.kind == "qlora":
        return spec.method.quantization.compute_dtype
    if spec.scaling.use_gpu and spec.method.kind == "lora" and spec.precision == "bf16":
        return "bfloat16"
    return "float32"


def torch_dtype(spec: JobSpec) -> Any:
    import torch

    return getattr(torch, weight_dtype(spec))


def load_model(spec: JobSpec, model_dir: str, attention: str | None = None, precision: str | None = None) -> Any:
    """The base model, quantized for QLoRA, wrapped with LoRA adapters when the method says.
    `attention`: the implementation resolve_attention chose (default: resolved here).
    `precision`: the run's (method.precision, `auto` decided; default the spec's)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(spec),
        "attn_implementation": attention or resolve_attention(spec)[0],
        "trust_remote_code": spec.model.trust_remote_code,
        "revision": spec.model.revision,
    }
    if spec.method.kind == "qlora":
        kwargs["quantization_config"] = bnb_config(spec)
        if not spec.method.deepspeed:
            kwargs["device_map"] = {"": _local_device(spec)}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model from {model_dir}: {exc}") from None
    if spec.method.kind == "qlora":
        from peft import prepare_model_for_kbit_training

        # under FSDP, checkpointing is FSDP's own (rayft.train.fsdp): PEFT's as well would recompute twice
        checkpointing = spec.method.gradient_checkpointing and spec.method.fsdp is None
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
        keep_in_compute_dtype(model, getattr(torch, spec.method.quantization.compute_dtype))
        disable_avx512_repack(model)
    if spec.method.kind in ("lora", "qlora"):
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(spec))
    if autocast_casts_frozen_linears(spec, precision or spec.precision):
        frozen_linears_to(model, torch.bfloat16)
    return model


def autocast_casts_frozen_linears(spec: JobSpec, precision: str) -> bool:
    """LoRA in bf16 autocast on CPU, with fp32 weights and no sharding: autocast casts each frozen
    Linear weight to bf16 again on every forward (it caches only casts of trainable weights),
    about a sixth of a training step (bench/results/e2e_vs_trl.md)."""
    return (
        precision == "bf16"
        and spec.method.kind == "lora"
        and not spec.scaling.use_gpu
        and weight_dtype(spec) == "float32"
        and not spec.method.deepspeed
        and spec.method.fsdp is None
    )


def frozen_linears_to(model: Any, dtype: Any) -> int:
    """Hold the frozen Linear layers' weights in `dtype`, as autocast would cast them for each
    matmul: the same numbers, cast once. Trainable weights (adapters, modules_to_save) stay fp32
    for the optimizer; embeddings, norms and the LM head (often tied to the embeddings; TRL's fused
    head may run it outside autocast) stay fp32 too, so the residual stream is fp32 as under plain
    autocast. Returns the layers cast."""
    import torch

    tied = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    cast = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module.weight.requires_grad or id(module.weight) in tied:
            continue
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None and not module.bias.requires_grad:
            module.bias.data = module.bias.data.to(dtype)
        cast += 1
    return cast


def bnb_config(spec: JobSpec) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    q = spec.method.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, q.storage_dtype),
    )


def lora_config(spec: JobSpec) -> Any:
    from peft import LoraConfig

    lora = spec.method.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        modules_to_save=lora.modules_to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def keep_in_compute_dtype(model: Any, dtype: Any) -> int:
    """Undo PEFT's fp32 upcast of the frozen, unquantized weights (embeddings, head, norms).
    For Llama-3.1-8B it costs ~2 GiB of weights and makes the residual stream fp32 (~4 GiB in all);
    QLoRA exists to save that memory, and 16-bit frozen weights train fine (torchtune keeps them)."""
    import torch

    if dtype == torch.float32:
        return 0
    recast = 0
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.dtype == torch.float32:
            parameter.data = parameter.data.to(dtype)
            recast += 1
    return recast


def disable_avx512_repack(model: Any) -> int:
    """bitsandbytes on CPUs with AVX512-BF16 repacks 4-bit weights on the first no-grad forward
    (evaluation) and afterwards backward runs through an op without an autograd kernel: LoRA
    gradients silently become None. Turning the fast path off keeps training correct."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def _local_device(spec: JobSpec) -> Any:
    if not spec.scaling.use_gpu:
        return "cpu"
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
