"""Trained models out of a run: find them, load them, merge LoRA into the base, export them.

A "trained model" is a run directory (its final `model/`), a Ray checkpoint directory, the HF
checkpoint inside one, or an exported directory. It is either a LoRA adapter on a base or a
full model. Merging folds the adapter into the base weights and saves safetensors with the
tokenizer and chat template, which AutoModelForCausalLM loads without PEFT. For QLoRA the base
is the 4-bit model the adapter was trained against, dequantized to the compute dtype, so the
merged model computes what was trained.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rayft.errors import ModelError
from rayft.model.loading import bnb_config, disable_avx512_repack, weight_dtype
from rayft.model.tokenizer import with_pad_token
from rayft.rundir import HF_CHECKPOINT
from rayft.spec import JobSpec, validate_spec


@dataclass
class Trained:
    model_dir: str  # an adapter directory or a full model directory
    adapter: bool
    spec: JobSpec | None  # the run's spec, when the model came from a run

    @property
    def base_dir(self) -> str:
        return adapter_base(self.model_dir) if self.adapter else self.model_dir


def resolve_trained(path: str | Path) -> Trained:
    """A run dir, Ray checkpoint, HF checkpoint or model dir -> what is in it."""
    path = Path(path).expanduser()
    for candidate in (path / "model", path / HF_CHECKPOINT, path):
        if (candidate / "adapter_config.json").is_file():
            return Trained(str(candidate), True, _run_spec(candidate))
        if (candidate / "config.json").is_file():
            return Trained(str(candidate), False, _run_spec(candidate))
    raise ModelError(
        f"{path} holds no trained model: expected a run directory (with model/), a checkpoint, "
        "or a directory with adapter_config.json or config.json"
    )


def _run_spec(model_dir: Path) -> JobSpec | None:
    """The spec.yaml of the run a model or checkpoint belongs to (up to three levels up)."""
    for parent in [model_dir, *list(model_dir.parents)[:3]]:
        if (parent / "spec.yaml").is_file():
            return validate_spec(yaml.safe_load((parent / "spec.yaml").read_text()))
    return None


def adapter_base(adapter_dir: str) -> str:
    with open(os.path.join(adapter_dir, "adapter_config.json")) as handle:
        return json.load(handle)["base_model_name_or_path"]


def load_base(spec: JobSpec | None, base_dir: str) -> Any:
    """The base model as the run's adapter saw it: in the run's weight dtype, and for QLoRA
    quantized to 4 bits and dequantized (what the adapter was trained against)."""
    import torch
    from transformers import AutoModelForCausalLM

    trust = bool(spec and spec.model.trust_remote_code)
    if spec is not None and spec.method.kind == "qlora":
        compute = getattr(torch, spec.method.quantization.compute_dtype)
        quantized = AutoModelForCausalLM.from_pretrained(
            base_dir,
            quantization_config=bnb_config(spec),
            device_map={"": "cpu"},
            dtype=compute,
            trust_remote_code=trust,
        )
        disable_avx512_repack(quantized)
        return quantized.dequantize().to(compute)
    dtype = getattr(torch, weight_dtype(spec)) if spec is not None else "auto"
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, trust_remote_code=trust)


def load_for_generation(model_dir: str, adapter_dir: str | None = None, spec: JobSpec | None = None) -> tuple[Any, Any]:
    """A model directory, optionally with a LoRA adapter on top -> (model, tokenizer). The
    model loads as `load_base` loads a run's base, so base and tuned models of one run compute
    alike. The spec's trust_remote_code decides whether a model's own code may run; it is always
    given, so nothing asks on the terminal."""
    from transformers import AutoTokenizer

    trust = bool(spec and spec.model.trust_remote_code)
    try:
        tokenizer = with_pad_token(AutoTokenizer.from_pretrained(adapter_dir or model_dir, trust_remote_code=trust))
        model = load_base(spec, model_dir)
    except (OSError, ValueError) as exc:
        hint = (
            " (set model.trust_remote_code: true in the spec if you trust its code)"
            if "trust_remote_code" in str(exc) and not trust
            else ""
        )
        raise ModelError(f"cannot load the model from {model_dir}: {str(exc).strip().splitlines()[0]}{hint}") from None
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model, tokenizer


def load_trained(path: str) -> tuple[Any, Any]:
    """Whatever `rayft export` accepts (run, checkpoint, model dir) -> (model, tokenizer)."""
    trained = resolve_trained(path)
    if trained.adapter:
        return load_for_generation(trained.base_dir, trained.model_dir, trained.spec)
    return load_for_generation(trained.model_dir, None, trained.spec)


def merge_adapter(adapter_dir: str, out_dir: str, spec: JobSpec | None = None) -> str:
    from peft import PeftModel
    from transformers import AutoTokenizer

    spec = spec or _run_spec(Path(adapter_dir))
    base = load_base(spec, adapter_base(adapter_dir))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    trust = bool(spec and spec.model.trust_remote_code)
    AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust).save_pretrained(out_dir)
    _write_provenance(
        out_dir,
        {
            "merged_from": os.path.abspath(adapter_dir),
            "base": adapter_base(adapter_dir),
            "method": spec.method.kind if spec else "lora",
        },
    )
    return out_dir


def export(path: str | Path, out_dir: str | Path, *, merge: bool) -> Trained:
    """Copy (or merge) a trained model into `out_dir` as a self-contained HF directory."""
    trained = resolve_trained(path)
    out_dir = str(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ModelError(f"{out_dir} exists and is not empty; choose another --out or remove it")
    if merge and trained.adapter:
        merge_adapter(trained.model_dir, out_dir, trained.spec)
        return Trained(out_dir, False, trained.spec)
    shutil.copytree(
        trained.model_dir,
        out_dir,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("optimizer.pt", "scheduler.pt", "rng_state*", "training_args.bin"),
    )
    _write_provenance(out_dir, {"copied_from": os.path.abspath(trained.model_dir), "adapter": trained.adapter})
    return Trained(out_dir, trained.adapter, trained.spec)


def _write_provenance(out_dir: str, info: dict[str, Any]) -> None:
    with open(os.path.join(out_dir, "rayft_export.json"), "w") as handle:
        json.dump(info, handle, indent=2)
