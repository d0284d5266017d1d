"""Export: a LoRA adapter merged into its base model, saved as a plain HF directory
(safetensors, tokenizer and chat template) that AutoModelForCausalLM loads without PEFT."""

from __future__ import annotations

import json
import os
from typing import Any


def adapter_base(adapter_dir: str) -> str:
    with open(os.path.join(adapter_dir, "adapter_config.json")) as handle:
        return json.load(handle)["base_model_name_or_path"]


def merge_adapter(adapter_dir: str, out_dir: str, dtype: Any = None) -> str:
    """Load the base unquantized (for QLoRA: dequantized, in the compute dtype), apply the
    adapter, fold it into the weights and save."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(adapter_base(adapter_dir), dtype=dtype or torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    return out_dir
