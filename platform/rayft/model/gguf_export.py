"""A Hugging Face model directory (full weights, e.g. a merged LoRA) -> one GGUF file for
llama.cpp and Ollama, written with llama.cpp's own Python package (`gguf`): its GGUFWriter lays
out the file, its TensorNameMap names the tensors, its quants module quantizes them and its
SpecialVocab reads the special tokens, merges and chat template. What rayft adds is the choice of
those pieces for the architectures it trains (the Llama layout: Llama, Mistral, SmolLM, Qwen2,
Qwen3) and a streaming write: the header first, then one tensor at a time, so a 70B model needs
the memory of its largest tensor, not of the model.

Conventions follow llama.cpp's converter, which is what its loader expects: q/k projections of
the `llama` architecture permuted to its rotary layout (transformers' GGUF reader permutes them
back), 1-D tensors (norms, biases) kept in float32, a tensor whose rows do not split into the
quantization's blocks kept in float16, Llama-3 rope scaling as a `rope_freqs` tensor, and the
LM head left out when it is tied to the embeddings. The round trip is tested: transformers'
GGUF reader loads the file back and its logits match the source model's within the
quantization's tolerance (tests/test_export.py).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayft.errors import ModelError

# --quantization: GGUF tensor type for 2-D weights, and the file type llama.cpp labels it with.
# K-quants (q4_k_m, ...) are not in gguf-py's quantizer: llama.cpp's `llama-quantize` makes them
# from the f16 file.
QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
DEFAULT_QUANTIZATION = "f16"

# HF model_type -> (GGUF architecture, whether q/k are permuted to llama.cpp's rotary layout).
# llama.cpp runs Mistral and SmolLM as `llama`; Qwen2/3 use the NeoX rotary layout, unpermuted.
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}
SUPPORTED_ROPE = ("default", "llama3")

# tokenizer.json's Split regex -> llama.cpp's pre-tokenizer name (tokenizer.ggml.pre). The
# regexes are transformers' (its GGUF reader maps these names back to them); the first name of
# each is the one llama.cpp's converter writes for that family.
PRE_TOKENIZER_NAMES = ("llama-bpe", "qwen2", "tekken", "gpt-4o", "qwen35")


@dataclass(frozen=True)
class GgufFile:
    """What `write_gguf` wrote."""

    path: str
    quantization: str
    architecture: str
    tensors: int
    bytes: int
    tokenizer: str  # llama.cpp's tokenizer model: gpt2 (byte-level BPE) or llama (SentencePiece-style)
    pre_tokenizer: str | None
    chat_template: bool
    kept_in_f16: list[str] = field(default_factory=list)  # rows not divisible by the block size


@dataclass(frozen=True)
class _Tensor:
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int = 0  # q/k: heads to permute over (0: none)


# ---------------------------------------------------------------------------------- public
def write_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    quantization: str = DEFAULT_QUANTIZATION,
    *,
    name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> GgufFile:
    """Write `model_dir` (an HF directory with config.json, safetensors and a tokenizer) as
    one GGUF file. `metadata`: general.* strings (e.g. license, base model repo) to record."""
    import gguf
    import numpy as np

    model_dir = Path(model_dir)
    check_quantization(quantization)
    config = _read_config(model_dir)
    arch_name, permute = _architecture(config, model_dir)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    shapes = _safetensor_shapes(model_dir)
    plan, kept = _tensor_plan(config, shapes, arch, permute, quantization)
    rope_factors = _rope_factors(config)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(staging, arch_name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or config.get("_name_or_path") or model_dir.name)
        for key, value in (metadata or {}).items():
            writer.add_string(f"general.{key}", value)
        _add_hyperparameters(writer, config, arch_name)
        writer.add_file_type(_file_type(quantization))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab = _add_vocabulary(writer, model_dir, int(config["vocab_size"]))
        if rope_factors is not None:
            writer.add_tensor_info(
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                rope_factors.shape,
                rope_factors.dtype,
                rope_factors.nbytes,
            )
        for tensor in plan:
            # block types are given as their bytes (the writer derives the element shape)
            dtype, byte_shape = _info_dtype(tensor.qtype), gguf.quant_shape_to_byte_shape(tensor.shape, tensor.qtype)
            shape = byte_shape if dtype == np.uint8 else tensor.shape
            writer.add_tensor_info(tensor.gguf_name, shape, dtype, math.prod(byte_shape), tensor.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if rope_factors is not None:
            writer.write_tensor_data(rope_factors)
        for data in _converted(model_dir, plan):
            writer.write_tensor_data(data)
        writer.close()
        os.replace(staging, out_path)
    except BaseException:
        writer.close()
        staging.unlink(missing_ok=True)
        raise
    return GgufFile(
        path=str(out_path),
        quantization=quantization,
        architecture=arch_name,
        tensors=len(plan) + (rope_factors is not None),
        bytes=out_path.stat().st_size,
        tokenizer=vocab["model"],
        pre_tokenizer=vocab["pre"],
        chat_template=vocab["chat_template"],
        kept_in_f16=kept,
    )


def check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ModelError(
            f"--quant: unknown GGUF quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)} "
            "(k-quants such as q4_k_m: run llama.cpp's llama-quantize on the f16 file)"
        )


def gguf_file_name(name: str, quantization: str) -> str:
    """`quickstart` + q8_0 -> `quickstart-q8_0.gguf` (llama.cpp's and the hub's naming habit)."""
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-') or 'model'}-{quantization}.gguf"


# ---------------------------------------------------------------------------------- config
def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}; GGUF export needs a full model directory") from None
    return config.get("text_config", config) | {"model_type": config.get("model_type")}


def _architecture(config: dict[str, Any], model_dir: Path) -> tuple[str, bool]:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelError(
            f"{model_dir}/config.json: model_type {model_type!r} has no GGUF export in rayft yet; supported: "
            f"{', '.join(ARCHITECTURES)}. llama.cpp's convert_hf_to_gguf.py converts the merged directory "
            "(rayft export RUN --merge) for other architectures"
        )
    return ARCHITECTURES[model_type]


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps rope settings in rope_parameters; older configs in rope_theta/rope_scaling."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _add_hyperparameters(writer: Any, config: dict[str, Any], arch: str) -> None:
    heads, head_dim = config["num_attention_heads"], _head_dim(config)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads or arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])


def _rope_factors(config: dict[str, Any]) -> Any:
    """Llama-3 rope scaling as llama.cpp reads it: per-frequency divisors in a `rope_freqs`
    tensor, computed by transformers' own rope functions (unscaled / scaled inverse frequencies)."""
    rope = _rope(config)
    if rope["rope_type"] not in SUPPORTED_ROPE:
        raise ModelError(
            f"config.json: rope_type {rope['rope_type']!r} has no GGUF export in rayft yet "
            f"(supported: {', '.join(SUPPORTED_ROPE)})"
        )
    if rope["rope_type"] != "llama3":
        return None
    import numpy as np
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    head_dim = _head_dim(config)
    base = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    return (base / scaled.double().numpy()).astype(np.float32)


# --------------------------------------------------------------------------------- tensors
def _safetensor_shapes(model_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's shape and file, from the safetensors headers (no weights read)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(
            f"{model_dir} holds no .safetensors weights: GGUF export needs a full model "
            "(an adapter is merged first: rayft export RUN --gguf does that)"
        )
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[key] = (tuple(handle.get_slice(key).get_shape()), str(path))
    return shapes


def _tensor_plan(
    config: dict[str, Any], shapes: dict[str, tuple[tuple[int, ...], str]], arch: Any, permute: bool, quantization: str
) -> tuple[list[_Tensor], list[str]]:
    """Each HF tensor's GGUF name, type and permutation, in file order; and the weights kept in
    float16 because their rows do not split into the quantization's blocks."""
    import gguf

    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    target = _qtype(quantization)
    block = gguf.GGML_QUANT_SIZES[target][0]
    tied = bool(config.get("tie_word_embeddings", False))
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    plan, kept = [], []
    for hf_name, (shape, _) in shapes.items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses the embedding matrix when the file has no output.weight
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"tensor {hf_name!r} {shape} has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}")
        if len(shape) == 1:
            qtype = gguf.GGMLQuantizationType.F32
        elif shape[-1] % block:
            qtype = gguf.GGMLQuantizationType.F16
            kept.append(f"{gguf_name} {list(shape)}")
        else:
            qtype = target
        permute_heads = 0
        if permute and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            permute_heads = heads
        elif permute and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            permute_heads = kv_heads
        plan.append(_Tensor(gguf_name, hf_name, shape, qtype, permute_heads))
    if not tied and "lm_head.weight" not in shapes:
        raise ModelError("config.json says the LM head is not tied, but the weights hold no lm_head.weight")
    return plan, kept


def _converted(model_dir: Path, plan: list[_Tensor]) -> Iterator[Any]:
    """The plan's tensors one at a time: read (any dtype -> float32), permuted, quantized."""
    import gguf
    from safetensors import safe_open

    shapes = _safetensor_shapes(model_dir)
    handles: dict[str, Any] = {}
    try:
        for tensor in plan:
            path = shapes[tensor.hf_name][1]
            if path not in handles:
                handles[path] = safe_open(path, framework="pt").__enter__()
            data = handles[path].get_tensor(tensor.hf_name).float().numpy()
            if tensor.permute_heads:
                data = _permute_for_llama_cpp(data, tensor.permute_heads)
            yield gguf.quants.quantize(data, tensor.qtype)
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)


def _permute_for_llama_cpp(weights: Any, heads: int) -> Any:
    """HF's rotary layout (two halves per head) -> llama.cpp's (interleaved pairs), the inverse of
    the permutation transformers' GGUF reader applies when it loads a `llama` file."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _qtype(quantization: str) -> Any:
    import gguf

    return gguf.GGMLQuantizationType[quantization.upper()]


def _info_dtype(qtype: Any) -> Any:
    """The numpy dtype gguf.quants.quantize returns for `qtype` (bytes for block types)."""
    import gguf
    import numpy as np

    return {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype, np.uint8)


def _file_type(quantization: str) -> int:
    import gguf

    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}
    return int(gguf.LlamaFileType[names.get(quantization, f"MOSTLY_{quantization.upper()}")])


# ------------------------------------------------------------------------------- tokenizer
def _add_vocabulary(writer: Any, model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Tokens, scores, types, merges, special tokens and the chat template, as llama.cpp's
    converter writes them for a byte-level BPE (gpt2) or a SentencePiece-style (llama) vocabulary."""
    import gguf

    tokenizer_json = model_dir / "tokenizer.json"
    if (model_dir / "tokenizer.model").is_file() and not tokenizer_json.is_file():
        vocab = _sentencepiece_vocab(model_dir, vocab_size)
    elif tokenizer_json.is_file():
        vocab = _tokenizers_vocab(json.loads(tokenizer_json.read_text()), vocab_size)
    else:
        raise ModelError(f"{model_dir} holds no tokenizer (tokenizer.json or tokenizer.model)")
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"] or "default")
    writer.add_token_list(vocab["tokens"])
    if vocab["scores"] is not None:
        writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    if vocab["add_space_prefix"] is not None:
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    special = gguf.SpecialVocab(model_dir, load_merges=vocab["merges"], n_vocab=len(vocab["tokens"]))
    special.add_to_gguf(writer, quiet=True)
    return {**vocab, "chat_template": special.chat_template is not None}


def _tokenizers_vocab(tokenizer: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """From tokenizer.json: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) -> gpt2; BPE with
    byte fallback (a SentencePiece model converted by transformers: Llama 2, Mistral) -> llama."""
    import gguf

    model = tokenizer.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(f"tokenizer.json: a {model.get('type')} tokenizer has no GGUF export in rayft yet (BPE only)")
    spm_style = bool(model.get("byte_fallback"))
    added = {entry["id"]: entry for entry in tokenizer.get("added_tokens", [])}
    by_id = {index: token for token, index in model["vocab"].items()} | {i: e["content"] for i, e in added.items()}
    merges = model.get("merges") or []
    rank: dict[str, int] = {}
    for position, merge in enumerate(merges):
        pair = merge if isinstance(merge, list) else merge.split(" ")
        rank.setdefault("".join(pair), position)
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:  # the embedding has rows no token uses (e.g. padded to a multiple of 64)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.USER_DEFINED)
        elif index in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[index]["special"] else gguf.TokenType.USER_DEFINED)
        elif spm_style and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            tokens.append(token)
            types.append(gguf.TokenType.BYTE)
        elif token == unk:
            tokens.append(token)
            types.append(gguf.TokenType.UNKNOWN)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
        # llama.cpp's SentencePiece tokenizer merges the pair whose result scores highest: the
        # merge rank, negated, gives the order the BPE merges were learned in
        scores.append(-float(rank[token]) if token in rank else -float(len(merges) + index))
    if spm_style:
        return {
            "model": "llama",
            "pre": None,
            "tokens": tokens,
            "scores": scores,
            "types": types,
            "merges": True,  # transformers' GGUF reader uses them as given (llama.cpp reads the scores)
            "add_space_prefix": _adds_space_prefix(tokenizer),
        }
    return {
        "model": "gpt2",
        "pre": _pre_tokenizer(tokenizer),
        "tokens": tokens,
        "scores": None,
        "types": types,
        "merges": True,
        "add_space_prefix": None,
    }


def _sentencepiece_vocab(model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """A directory with only tokenizer.model: gguf-py's SentencePieceVocab reads it."""
    import gguf

    vocab = gguf.vocab.SentencePieceVocab(model_dir)
    entries = list(vocab.all_tokens())
    tokens = [text.decode("utf-8") for text, _, _ in entries]
    scores = [score for _, score, _ in entries]
    types = [kind for _, _, kind in entries]
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.USER_DEFINED)
    return {
        "model": "llama",
        "pre": None,
        "tokens": tokens,
        "scores": scores,
        "types": types,
        "merges": False,
        "add_space_prefix": True,
    }


def _adds_space_prefix(tokenizer: dict[str, Any]) -> bool:
    """Whether the tokenizer puts '▁' before the first word (Metaspace, or a Prepend normalizer)."""
    text = json.dumps([tokenizer.get("pre_tokenizer"), tokenizer.get("normalizer")])
    return '"prepend_scheme": "first"' in text or '"prepend_scheme": "always"' in text or '"Prepend"' in text


def _pre_tokenizer(tokenizer: dict[str, Any]) -> str:
    """llama.cpp's name for how a byte-level BPE splits text before merging, read from the
    tokenizer's own pre_tokenizer: a known Split regex, digits split one by one (SmolLM), or
    GPT-2's built-in regex."""
    pre = tokenizer.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    patterns = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if patterns:
        known = _known_splits()
        for name in PRE_TOKENIZER_NAMES:
            if known.get(name) == patterns[0]:
                return name
        raise ModelError(
            "tokenizer.json: its pre-tokenizer regex is none that rayft knows llama.cpp's name for "
            f"({', '.join(PRE_TOKENIZER_NAMES)}); llama.cpp's convert_hf_to_gguf.py identifies more"
        )
    if any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts):
        return "smollm"
    return "gpt2"


def _known_splits() -> dict[str, str]:
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # an older transformers: Llama 3's regex, the one most files use
        return {}
    return dict(GGUF_PRE_TOKENIZER_SPLITS)
