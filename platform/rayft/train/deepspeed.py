"""DeepSpeed ZeRO configs as data derived from the spec. "auto" values are filled in by the
HF trainer from the same SFTConfig, so batch sizes and precision are stated once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rayft.errors import SpecError
from rayft.spec import JobSpec

BASE: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    # The HF trainer builds its own AdamW; DeepSpeed accepts it with this flag.
    "zero_allow_untested_optimizer": True,
}
ZERO2 = {
    "stage": 2,
    "overlap_comm": True,
    "contiguous_gradients": True,
    "reduce_bucket_size": "auto",
    "allgather_bucket_size": 5e8,
}
ZERO3 = {
    "stage": 3,
    "overlap_comm": True,
    "contiguous_gradients": True,
    "reduce_bucket_size": "auto",
    "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto",
    # Gather the shards when saving, so the final model is one consolidated HF directory.
    "stage3_gather_16bit_weights_on_model_save": True,
}
OFFLOAD = {
    "offload_optimizer": {"device": "cpu", "pin_memory": True},
    "offload_param": {"device": "cpu", "pin_memory": True},
}


def deepspeed_config(spec: JobSpec) -> dict[str, Any]:
    choice = spec.method.deepspeed
    if choice == "zero2":
        zero = dict(ZERO2)
    elif choice == "zero3":
        zero = dict(ZERO3)
    elif choice == "zero3-offload":
        zero = {**ZERO3, **OFFLOAD}
    else:
        path = Path(choice or "")
        if not path.is_file():
            raise SpecError(f"no such DeepSpeed config: {choice}", field="method.deepspeed")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SpecError(f"{choice}:{exc.lineno}: not valid JSON: {exc.msg}", field="method.deepspeed") from None
    if not spec.scaling.use_gpu and "offload_optimizer" in zero:
        # DeepSpeedCPUAdam needs pinned memory only on GPU hosts.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {**BASE, "zero_optimization": zero}
