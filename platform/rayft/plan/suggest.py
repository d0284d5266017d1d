"""What would make a job fit: single changes (gradient checkpointing, a smaller micro-batch
with more accumulation, ZeRO-3, offload, LoRA, QLoRA), each re-planned, and the smallest
combination that fits when none does alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from rayft.plan.shapes import Accelerator
from rayft.spec import JobSpec


class Planned(Protocol):
    total_bytes: int
    fits: bool


Replan = Callable[[list[str]], "Planned | None"]  # overrides -> the re-estimated plan, None if refused


@dataclass
class Suggestion:
    change: str
    overrides: list[str]  # paste after the spec: rayft train spec.yaml OVERRIDES
    total_bytes: int
    fits: bool


def suggestions(spec: JobSpec, device: Accelerator, replan: Replan) -> list[Suggestion]:
    """The single changes that make it fit, each re-estimated by `replan`, least disruptive
    first; when none fits alone, those that help and the smallest combination (in that order)
    that fits."""
    current = replan([])
    baseline = current.total_bytes if current else 0
    found = [
        Suggestion(change, overrides, plan.total_bytes, plan.fits)
        for change, overrides in _candidates(spec, device)
        if (plan := replan(overrides)) and plan.total_bytes < baseline
    ]
    micro = [s for s in found if s.change.startswith("micro-batch")]  # keep one: the largest that fits
    found = [s for s in found if s not in micro or s is next((m for m in micro if m.fits), micro[-1])]
    if found and not any(s.fits for s in found):
        chosen: list[Suggestion] = []
        best: Planned | None = None
        for s in found:  # add changes while they help, until it fits ...
            plan = replan([o for c in chosen + [s] for o in c.overrides])
            if plan and plan.total_bytes < (best.total_bytes if best else baseline):
                chosen, best = chosen + [s], plan
                if plan.fits:
                    break
        for s in list(chosen[:-1]) if best and best.fits else []:  # ... then drop those it fits without
            fewer = [c for c in chosen if c is not s]
            if (plan := replan([o for c in fewer for o in c.overrides])) and plan.fits:
                chosen, best = fewer, plan
        if best and len(chosen) > 1:
            found.append(
                Suggestion(
                    " + ".join(s.change for s in chosen),
                    [o for s in chosen for o in s.overrides],
                    best.total_bytes,
                    best.fits,
                )
            )
    if any(s.fits for s in found):
        found = [s for s in found if s.fits]
    return found


def _candidates(spec: JobSpec, device: Accelerator) -> list[tuple[str, list[str]]]:
    method, gpu, n = spec.method, device.kind == "gpu", spec.scaling.num_workers
    out = [] if method.gradient_checkpointing else [("gradient checkpointing", ["method.gradient_checkpointing=true"])]
    micro = spec.train.micro_batch_size
    while micro > 1:  # the same global batch, with more accumulation
        micro //= 2
        if spec.train.global_batch_size % (micro * n) == 0:
            out.append((f"micro-batch {micro}", [f"train.micro_batch_size={micro}"]))
    if gpu and n > 1 and not (method.deepspeed or "").startswith("zero3"):
        compute = method.quantization.compute_dtype  # ZeRO-3 shards 4-bit weights stored in it
        storage = [f"method.quantization.storage_dtype={compute}"] if method.kind == "qlora" else []
        out.append(("DeepSpeed ZeRO-3", ["method.deepspeed=zero3", *storage]))
    if gpu and method.kind != "qlora" and method.deepspeed != "zero3-offload":
        out.append(("ZeRO-3 with CPU offload", ["method.deepspeed=zero3-offload"]))
    if method.kind == "full":
        out.append(("LoRA instead of full fine-tuning", ["method.kind=lora"]))
    if method.kind != "qlora" and method.deepspeed != "zero3-offload":
        out.append(("QLoRA (4-bit base weights)", ["method.kind=qlora"]))
    return out
