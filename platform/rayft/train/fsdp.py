"""FSDP2 as the HF trainer takes it (TrainingArguments.fsdp_config, turned into accelerate's
FullyShardedDataParallelPlugin with fsdp_version=2): data derived from the spec, nothing of
rayft's own in the sharding itself.

- Wrapping: one `fully_shard` per decoder layer (the model's `_no_split_modules`, accelerate's
  TRANSFORMER_BASED_WRAP) and one for the root; LoRA's adapters shard with their layer.
- Activation checkpointing is FSDP's own when `method.gradient_checkpointing` is on: the
  trainer's would re-gather every layer's weights a second time in backward.
- Mixed precision: accelerate keeps fp32 masters of the trainable parameters and computes in the
  run's bf16/fp16 (MixedPrecisionPolicy); frozen 16-bit base weights stay 16-bit.
- Checkpoints: "full" gathers weights and optimizer state on rank 0 (an HF directory); "sharded"
  writes torch.distributed.checkpoint files. Both load at another worker count (DCP reshards on
  load), so a resume on more or fewer workers continues the run.
"""

from __future__ import annotations

from typing import Any

from rayft.spec import JobSpec

STATE_DICT_TYPE = {"full": "FULL_STATE_DICT", "sharded": "SHARDED_STATE_DICT"}


def fsdp_config(spec: JobSpec) -> dict[str, Any]:
    fsdp = spec.method.fsdp
    if fsdp is None:
        raise ValueError("the spec has no method.fsdp")
    return {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": fsdp.reshard_after_forward,
        "cpu_offload": fsdp.cpu_offload,
        "activation_checkpointing": spec.method.gradient_checkpointing,
        "state_dict_type": STATE_DICT_TYPE[fsdp.state_dict],
        # from_pretrained has run before the trainer exists: every rank holds the model already
        "cpu_ram_efficient_loading": False,
    }
