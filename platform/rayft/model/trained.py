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
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from rayft.errors import ModelError
from rayft.model.gguf_export import GgufFile, check_quantization, gguf_file_name, write_gguf
from rayft.model.loading import bnb_config, disable_avx512_repack, weight_dtype
from rayft.model.ollama import MODELFILE, modelfile, ollama_tag
from rayft.model.tokenizer import with_pad_token
from rayft.rundir import HF_CHECKPOINT
from rayft.spec import JobSpec, validate_spec

EXPORT_RECORD = "rayft_export.json"  # what an export was made from, and how


@dataclass
class Trained:
    model_dir: str  # an adapter directory or a full model directory
    adapter: bool
    spec: JobSpec | None  # the run's spec, when the model came from a run
    run_dir: str | None = None  # the run directory it came from (where spec.yaml is)

    @property
    def base_dir(self) -> str:
        return adapter_base(self.model_dir) if self.adapter else self.model_dir


def resolve_trained(path: str | Path) -> Trained:
    """A run dir, Ray checkpoint, HF checkpoint or model dir -> what is in it."""
    path = Path(path).expanduser()
    for candidate in (path / "model", path / HF_CHECKPOINT, path):
        adapter = (candidate / "adapter_config.json").is_file()
        if adapter or (candidate / "config.json").is_file():
            run_dir = _run_dir(candidate)
            spec = validate_spec(yaml.safe_load((run_dir / "spec.yaml").read_text())) if run_dir else None
            return Trained(str(candidate), adapter, spec, str(run_dir) if run_dir else None)
    raise ModelError(
        f"{path} holds no trained model: expected a run directory (with model/), a checkpoint, "
        "or a directory with adapter_config.json or config.json"
    )


def _run_dir(model_dir: Path) -> Path | None:
    """The run directory a model or checkpoint belongs to: where spec.yaml is, up to three levels up."""
    for parent in [model_dir, *list(model_dir.parents)[:3]]:
        if (parent / "spec.yaml").is_file():
            return parent
    return None


def _run_spec(model_dir: Path) -> JobSpec | None:
    """The spec.yaml of the run a model or checkpoint belongs to."""
    run_dir = _run_dir(model_dir)
    return validate_spec(yaml.safe_load((run_dir / "spec.yaml").read_text())) if run_dir else None


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


@dataclass
class Exported:
    """What `export` wrote into `out_dir`."""

    out_dir: str
    trained: Trained  # what it was exported from
    kind: str  # adapter | full | merged | gguf (a GGUF without HF weights beside it)
    weights: bool  # HF weights (or the adapter) in out_dir
    gguf: GgufFile | None = None
    modelfile: str | None = None
    chat_family: str | None = None  # the template family the Modelfile spells out
    name: str = ""  # the model's name in the GGUF header, the Modelfile and the card

    @property
    def ollama_name(self) -> str:
        return ollama_tag(self.name)


def default_export_dir(path: str | Path) -> str:
    """`rayft export RUN` without --out: <run>/export (a model directory outside a run needs --out)."""
    trained = resolve_trained(path)
    if trained.run_dir is None:
        raise ModelError(f"{path} is not inside a run directory: say where to write with --out DIR")
    return str(Path(trained.run_dir) / "export")


def export(
    path: str | Path,
    out_dir: str | Path,
    *,
    merge: bool = False,
    gguf: str | None = None,
    ollama: bool = False,
    name: str | None = None,
) -> Exported:
    """A trained model -> `out_dir`: the model as it is (a LoRA adapter or full weights), merged
    into its base (`merge`), and/or as a GGUF file of the merged model (`gguf`: its
    quantization), with an Ollama Modelfile beside it (`ollama`)."""
    trained = resolve_trained(path)
    out_dir = str(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ModelError(f"{out_dir} exists and is not empty; choose another --out or remove it")
    if ollama and not gguf:
        raise ModelError("an Ollama Modelfile needs the GGUF file: add --gguf")
    if gguf:
        check_quantization(gguf)
    name = name or (trained.spec.run_name if trained.spec else Path(trained.model_dir).name)
    os.makedirs(out_dir, exist_ok=True)
    staging = None
    try:
        weights_dir: str | None = None  # a full model directory, for the GGUF
        if merge and trained.adapter:
            weights_dir = merge_adapter(trained.model_dir, out_dir, trained.spec)
        elif merge or not gguf:
            _copy_model(trained.model_dir, out_dir)
            weights_dir = out_dir if not trained.adapter else None
        elif trained.adapter:  # a GGUF alone: the merged weights are staged, then dropped
            staging = tempfile.mkdtemp(prefix="rayft-merge-")
            weights_dir = merge_adapter(trained.model_dir, staging, trained.spec)
        else:
            weights_dir = trained.model_dir
        exported = Exported(
            out_dir,
            trained,
            kind=_kind(trained, merge, gguf),
            weights=merge or not gguf,
            name=name,
        )
        if gguf and weights_dir is not None:
            exported = _write_gguf_files(exported, weights_dir, gguf, ollama, name)
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    _write_provenance(out_dir, _provenance(exported))
    return exported


def _kind(trained: Trained, merge: bool, gguf: str | None) -> str:
    if gguf and not merge:
        return "gguf"
    if trained.adapter:
        return "merged" if merge else "adapter"
    return "full"


def _copy_model(model_dir: str, out_dir: str) -> None:
    shutil.copytree(
        model_dir,
        out_dir,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("optimizer.pt", "scheduler.pt", "rng_state*", "training_args.bin", "README.md"),
    )


def _write_gguf_files(exported: Exported, weights_dir: str, quantization: str, ollama: bool, name: str) -> Exported:
    """The GGUF file, and with `ollama` the Modelfile beside it."""
    from transformers import AutoTokenizer

    spec = exported.trained.spec
    file = write_gguf(
        weights_dir,
        os.path.join(exported.out_dir, gguf_file_name(name, quantization)),
        quantization,
        name=name,
        metadata={"finetune": name, "quantized_by": "rayft"},
    )
    exported = replace(exported, gguf=file)
    if not ollama:
        return exported
    trust = bool(spec and spec.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(weights_dir, trust_remote_code=trust)
    text, family = modelfile(
        os.path.basename(file.path),
        tokenizer,
        system_prompt=spec.data.system_prompt if spec else None,
        header=f"Ollama Modelfile for {name}, written by rayft export.\n"
        f"ollama create {ollama_tag(name)} -f Modelfile && ollama run {ollama_tag(name)}",
    )
    path = os.path.join(exported.out_dir, MODELFILE)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return replace(exported, modelfile=path, chat_family=family.name if family else None)


def _provenance(exported: Exported) -> dict[str, Any]:
    trained = exported.trained
    info: dict[str, Any] = {
        "exported_from": os.path.abspath(trained.model_dir),
        "kind": exported.kind,
        "adapter": trained.adapter and exported.kind == "adapter",
    }
    if trained.adapter:
        info["base"] = adapter_base(trained.model_dir)
    if exported.gguf:
        info["gguf"] = {k: v for k, v in asdict(exported.gguf).items() if k != "path"}
        info["gguf"]["file"] = os.path.basename(exported.gguf.path)
    if exported.modelfile:
        info["modelfile"] = os.path.basename(exported.modelfile)
    return info


def _write_provenance(out_dir: str, info: dict[str, Any]) -> None:
    with open(os.path.join(out_dir, EXPORT_RECORD), "w") as handle:
        json.dump(info, handle, indent=2)
