"""What `rayft plan` computes on: the shape of a model, from its config alone (a local
config.json, a GGUF file's header, or a built-in table of the models users fine-tune most:
Llama 3.1/3.2, Qwen2.5, Qwen3, Mistral, gemma-2, SmolLM2; so that planning needs no network and
no weights), and the accelerators it can plan for.

Only dense decoders in the Llama layout (attention q/k/v/o, gated MLP gate/up/down, RMSNorm)
are described; that covers Llama, Mistral, Qwen2/3 and SmolLM.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from typing import Any

from rayft.errors import SpecError
from rayft.model.source import resolve_source
from rayft.spec import ModelSpec

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # the LM head shares the embedding matrix
    head_dim: int = 0  # 0: hidden // heads
    source: str = "built-in table"

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_size

    def linears(self) -> dict[str, tuple[int, int]]:
        """Each decoder layer's linear layers as (in_features, out_features)."""
        h, q, kv, i = self.hidden, self.heads * self.head_size, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linears().values())

    @property
    def layer_params(self) -> int:
        return self.layer_linear_params + 2 * self.hidden  # two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.head_params + self.hidden

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: every linear layer and the LM head."""
        return self.layers * self.layer_linear_params + self.vocab * self.hidden


def _llama(
    name: str,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    tied: bool,
    head_dim: int = 0,
) -> ModelShape:
    return ModelShape(name, hidden, intermediate, layers, heads, kv_heads, vocab, tied, head_dim)


# Values from each model's config.json on the Hugging Face hub (checked: the parameter counts
# they give match the published sizes, see tests/test_plan.py).
KNOWN_SHAPES: dict[str, ModelShape] = {
    shape.name.lower(): shape
    for shape in (
        _llama("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, tied=False),
        _llama("Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, tied=False),
        _llama("Llama-3.1-405B", 16384, 53248, 126, 128, 8, 128256, tied=False),
        _llama("Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, tied=True, head_dim=64),
        _llama("Llama-3.2-3B", 3072, 8192, 28, 24, 8, 128256, tied=True, head_dim=128),
        _llama("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, tied=True),
        _llama("SmolLM2-360M", 960, 2560, 32, 15, 5, 49152, tied=True),
        _llama("SmolLM2-1.7B", 2048, 8192, 24, 32, 32, 49152, tied=True),
        # Qwen2.5 (q/k/v biases and Qwen3's q/k norms: under 0.1% of the parameters, left out)
        _llama("Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, tied=True),
        _llama("Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, tied=True),
        _llama("Qwen2.5-3B", 2048, 11008, 36, 16, 2, 151936, tied=True),
        _llama("Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, tied=False),
        _llama("Qwen3-0.6B", 1024, 3072, 28, 16, 8, 151936, tied=True, head_dim=128),
        _llama("Qwen3-1.7B", 2048, 6144, 28, 16, 8, 151936, tied=True, head_dim=128),
        _llama("Qwen3-4B", 2560, 9728, 36, 32, 8, 151936, tied=True, head_dim=128),
        _llama("Qwen3-8B", 4096, 12288, 36, 32, 8, 151936, tied=False, head_dim=128),
        _llama("Mistral-7B-v0.3", 4096, 14336, 32, 32, 8, 32768, tied=False),
        # gemma-2: the same linear layers (GeGLU gate/up/down), two more norms a layer (negligible)
        _llama("gemma-2-2b", 2304, 9216, 26, 8, 4, 256000, tied=True, head_dim=256),
        _llama("gemma-2-9b", 3584, 14336, 42, 16, 8, 256000, tied=True, head_dim=256),
    )
}


def known_name(path: str) -> str:
    """'meta-llama/Meta-Llama-3.1-8B-Instruct' -> 'llama-3.1-8b': the table's key for a hub id."""
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    name = re.sub(r"\.gguf$", "", name)
    name = re.sub(r"\.(q\d\w*|f16|f32|bf16)$", "", name)  # GGUF quantization suffix
    name = re.sub(r"^meta-", "", name)
    # a variant tag at the end, or before a version (Mistral-7B-Instruct-v0.3, gemma-2-9b-it)
    return re.sub(r"-(instruct|it|hf|base|chat)(?=-v[\d.]+$|$)", "", name)


def model_shape(spec_or_path: Any) -> ModelShape:
    """A JobSpec, ModelSpec or `model.path` string -> ModelShape, reading no weights."""
    model = getattr(spec_or_path, "model", spec_or_path)
    if isinstance(model, (str, os.PathLike)):
        model = ModelSpec(path=str(model))
    source = resolve_source(model)
    if source.local and source.gguf_file:
        return shape_from_gguf(os.path.join(source.location, source.gguf_file))
    if source.local:
        return shape_from_config(os.path.join(source.location, "config.json"))
    shape = KNOWN_SHAPES.get(known_name(model.path))
    if shape is None:
        raise SpecError(
            f"{model.path!r} is not a local model and not in rayft's table of known shapes, and `rayft plan` "
            f"downloads nothing: pass a local directory with its config.json (the weights are not needed) or one "
            f"of {', '.join(s.name for s in KNOWN_SHAPES.values())}",
            field="model.path",
        )
    return shape


def shape_from_config(path: str) -> ModelShape:
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecError(f"cannot read {path}: {exc}", field="model.path") from None
    config = config.get("text_config", config)  # multimodal wrappers keep the decoder's config inside
    missing = [
        k
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if not isinstance(config.get(k), int)
    ]
    if missing or config.get("num_local_experts") or config.get("num_experts"):
        why = f"lacks {', '.join(missing)}" if missing else "describes a mixture-of-experts model"
        raise SpecError(f"{path} {why}; `rayft plan` estimates dense Llama-style decoders only", field="model.path")
    return ModelShape(
        name=config.get("_name_or_path") or os.path.basename(os.path.dirname(os.path.abspath(path))),
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        layers=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        vocab=config["vocab_size"],
        # LlamaConfig's default; an untied head is also the larger (safer) assumption.
        tied=bool(config.get("tie_word_embeddings", False)),
        head_dim=config.get("head_dim") or 0,
        source=path,
    )


def shape_from_gguf(path: str) -> ModelShape:
    """The GGUF header's metadata (memory-mapped by the gguf package; no tensor is read)."""
    try:
        import gguf

        reader = gguf.GGUFReader(path)
    except Exception as exc:  # a truncated or foreign file
        raise SpecError(f"cannot read the GGUF header of {path}: {exc}", field="model.path") from None

    def field(key: str, default: Any = None) -> Any:
        entry = reader.fields.get(key)
        return entry.contents() if entry is not None else default

    arch = field("general.architecture", "llama")
    hidden, layers = field(f"{arch}.embedding_length"), field(f"{arch}.block_count")
    heads = field(f"{arch}.attention.head_count")
    vocab = field(f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    tensors = {tensor.name for tensor in reader.tensors}
    shape = ModelShape(
        name=field("general.name") or os.path.basename(path),
        hidden=hidden,
        intermediate=field(f"{arch}.feed_forward_length"),
        layers=layers,
        heads=heads,
        kv_heads=field(f"{arch}.attention.head_count_kv") or heads,
        vocab=vocab,
        tied="output.weight" not in tensors,
        source=path,
    )
    key_length = field(f"{arch}.attention.key_length")
    return replace(shape, head_dim=key_length) if key_length and key_length != hidden // heads else shape


# ------------------------------------------------------------------------------ accelerators
@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense, without sparsity; T4 has no bf16, so its fp16 figure
    fp32_tflops: float
    kind: str = "gpu"


# Datasheet figures. A10G: the A10's datasheet figure; AWS's A10G runs lower clocks, so its
# times are optimistic.
ACCELERATORS = {
    a.name: a
    for a in (
        Accelerator("A100-40G", 40, 312, 19.5),
        Accelerator("A100-80G", 80, 312, 19.5),
        Accelerator("H100-80G", 80, 989, 67),
        Accelerator("H200", 141, 989, 67),
        Accelerator("L4", 24, 121, 30.3),
        Accelerator("A10G", 24, 125, 31.2),
        Accelerator("T4", 16, 65, 8.1),
    )
}
# Ray's accelerator_type names; a bare "A100" may be the 40 GB one.
ALIASES = {
    "A100": "A100-40G",
    "H100": "H100-80G",
    "A100-40GB": "A100-40G",
    "A100-80GB": "A100-80G",
    "H100-80GB": "H100-80G",
    "H100-SXM": "H100-80G",
    "H200-141G": "H200",
}
CPU_CORE_GFLOPS = 150  # fp32 peak of one AVX-512 core (two FMA units, ~2.3 GHz)


def accelerator(
    name: str, *, field: str, memory_gib: float | None = None, workers: int = 1, cpus_per_worker: float = 1
) -> Accelerator:
    """A name from ACCELERATORS (or Ray's alias), or "cpu": the worker's share of this machine's
    RAM unless `memory_gib` says otherwise."""
    if name.lower() == "cpu":
        if memory_gib is None:
            import psutil

            memory_gib = psutil.virtual_memory().total / 1024**3 / workers
        return Accelerator("cpu", memory_gib, 0, CPU_CORE_GFLOPS / 1000 * cpus_per_worker, "cpu")
    key = ALIASES.get(name.upper(), name.upper())
    found = {k.upper(): v for k, v in ACCELERATORS.items()}.get(key)
    if found is None:
        raise SpecError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}, cpu", field=field)
    return replace(found, memory_gib=memory_gib or found.memory_gib)
