"""`model.attn_implementation` decided on the machine that trains: the fastest implementation
that is correct for the job, and why. It runs on each worker (the driver may have no GPU and
no flash-attn), and the worker logs the choice.

Every choice here keeps packed samples apart (rayft.spec.schema's table; tests/test_packing.py
checks each one available on the machine). Between the correct ones:
- GPU: flash-attention 3 on Hopper when flash-attn-3 is installed, else flash-attention 2 (Ampere
  and newer) when flash-attn is installed: both take packed rows as varlen sequences from their
  position_ids, with no T x T mask and no compute on masked blocks. sdpa, the fallback, needs a
  block-diagonal mask for packed rows, which sends it to its memory-efficient (not flash) kernel
  and costs a boolean T x T tensor per micro-batch.
- CPU: sdpa (eager is the same math, slower; flex_attention compiles for minutes on CPU).
"""

from __future__ import annotations

from rayft.errors import SpecError
from rayft.spec import JobSpec
from rayft.spec.schema import FLASH_ATTENTION

FIELD = "model.attn_implementation"
PACKAGE = {"flash_attention_2": "flash-attn", "flash_attention_3": "flash-attn-3"}


def resolve_attention(spec: JobSpec) -> tuple[str, str]:
    """(implementation, why) for this worker: the spec's choice, checked against what is
    installed, or what `auto` picks here."""
    choice = spec.model.attn_implementation
    gpu = spec.scaling.use_gpu and _cuda_capability() is not None
    if choice in FLASH_ATTENTION:
        if not gpu:
            raise SpecError(f"{choice} needs a CUDA GPU and this worker has none", field=FIELD)
        if not _flash_available(choice):
            raise SpecError(
                f"{choice} asked for, but {PACKAGE[choice]} is not installed on this worker "
                "(pip install 'rayft[gpu]'); or use auto/sdpa",
                field=FIELD,
            )
        return choice, "as the spec says"
    if choice != "auto":
        return choice, "as the spec says"
    return auto_attention(gpu, _cuda_capability(), _flash_available("flash_attention_2"), _flash_available_3())


def auto_attention(gpu: bool, capability: tuple[int, int] | None, flash2: bool, flash3: bool) -> tuple[str, str]:
    """What `auto` picks for a machine, from its facts (separate so that the planner and the
    tests can ask about machines other than this one)."""
    if not gpu or capability is None:
        return "sdpa", "auto: sdpa on CPU"
    name = f"sm_{capability[0]}{capability[1]}"
    if flash3 and capability[0] == 9:
        return "flash_attention_3", f"auto: flash-attention 3 on {name} (Hopper), varlen for packed rows"
    if flash2 and capability[0] >= 8:
        return "flash_attention_2", f"auto: flash-attention 2 on {name}, varlen for packed rows (no T x T mask)"
    if capability[0] < 8:
        return "sdpa", f"auto: sdpa ({name} predates flash-attention 2's Ampere minimum)"
    return "sdpa", (
        f"auto: sdpa (flash-attn is not installed; on {name} it would be faster for packed rows: "
        "pip install 'rayft[gpu]')"
    )


def _cuda_capability() -> tuple[int, int] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return int(major), int(minor)


def _flash_available(choice: str) -> bool:
    from transformers.utils import is_flash_attn_2_available

    return _flash_available_3() if choice == "flash_attention_3" else bool(is_flash_attn_2_available())


def _flash_available_3() -> bool:
    from transformers.utils import is_flash_attn_3_available

    return bool(is_flash_attn_3_available())


def check_liger(spec: JobSpec) -> None:
    """method.liger needs the liger-kernel package where the model trains."""
    if not spec.method.liger:
        return
    from transformers.utils import is_liger_kernel_available

    if not is_liger_kernel_available():
        raise SpecError(
            "method.liger is on, but liger-kernel (>= 0.3) is not installed on this worker: pip install 'rayft[gpu]'",
            field="method.liger",
        )
