"""What DistributedDataParallel broadcasts when it wraps the model.

DDP's constructor broadcasts every parameter of the model from rank 0, trainable or not, so
that all ranks start from the same weights. With LoRA or QLoRA nearly all of them are frozen base
weights, which every rank has just loaded itself from the same files (converted the same way on
each node) after the same `set_seed`: for SmolLM2-135M that is 540 MB over gloo, 3.1 s of each
worker's start-up on a 2-core CPU (bench/results/startup.md), repeated at every restart, to copy
what is already there. Frozen weights never change and their gradients are never reduced, so
they need no broadcast. What must agree and can differ (LoRA's randomly initialised matrices,
buffers) is still broadcast from rank 0, as before.
"""

from __future__ import annotations

from typing import Any

from torch.nn.parallel import DistributedDataParallel


def broadcast_trainable_only(model: Any) -> list[str]:
    """Have DDP, when it wraps `model`, skip the frozen parameters in its initial broadcast.
    Returns their names. A full fine-tune has none: everything is broadcast as before. Ignored
    where the model is not wrapped in DDP (one worker, DeepSpeed, FSDP)."""
    frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    # The model attribute DDP reads for "params and buffers to ignore" (torch's own setter):
    # left out of the initial broadcast and of gradient buckets, where frozen ones never are
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return frozen
