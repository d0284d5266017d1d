"""`method.precision: auto`, decided by measuring: bf16 on GPUs, and on CPUs whose bf16 matmul is
measured faster than fp32 at the model's own width (AMX and AVX512-BF16 CPUs, for models wide
enough to gain from them); fp32 otherwise. bf16 on CPU is autocast: the weights (and the
optimizer's master copies) stay fp32, the matmuls run in bf16.

The measurement takes a fraction of a second and is kept per CPU model and width in
~/.cache/rayft/precision.json, so a run only pays it once per machine kind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rayft.machine_cache import MachineCache
from rayft.spec import JobSpec

CACHE = MachineCache("precision.json")
MIN_SPEEDUP = 1.3  # below this, bf16's rounding is not worth it
TOKENS = 256  # rows of the measured matmul: a micro-batch's worth of tokens, roughly


def resolve_precision(spec: JobSpec, hidden: int | None) -> tuple[str, str]:
    """(precision, why) for the run: the spec's choice, or what `auto` picks on this machine."""
    if spec.method.precision != "auto":
        return spec.method.precision, "as the spec says"
    if spec.scaling.use_gpu:
        return "bf16", "auto: bf16 on GPU"
    if spec.method.kind == "qlora" and spec.method.deepspeed:
        # bitsandbytes' CPU 4-bit matmul under bf16 autocast breaks on ZeRO-3's partitioned weights
        # ("shape '[128, 64]' is invalid", measured on an AVX512-BF16 CPU)
        return "fp32", "auto: fp32 (QLoRA under DeepSpeed on CPU fails in bf16)"
    if not hidden:
        return "fp32", "auto: fp32 (the model's width is unknown)"
    speedup = bf16_speedup(hidden)
    if speedup >= MIN_SPEEDUP:
        return "bf16", f"auto: this CPU's bf16 matmul is {speedup:.1f}x fp32 at width {hidden}"
    return "fp32", f"auto: fp32 (bf16 matmul {_slower(speedup)} at width {hidden} on this CPU)"


def _slower(speedup: float) -> str:
    """A measured speed-up below MIN_SPEEDUP in words: CPUs without bf16 units run it 50x slower,
    which one decimal of the ratio showed as "0.0x"."""
    return f"{speedup:.1f}x fp32" if speedup >= 1 else f"{1 / speedup:.2g}x slower than fp32"


def bf16_speedup(hidden: int) -> float:
    """fp32 time / bf16 time of a (TOKENS x hidden) @ (hidden x 4 hidden) matmul, one thread."""
    key = f"{_cpu_name()}|{hidden}"
    cached = CACHE.get(key)
    if cached is not None:
        return float(cached)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timings = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(TOKENS, hidden, dtype=dtype), torch.randn(hidden, 4 * hidden, dtype=dtype)
            for _ in range(3):
                a @ b
            runs, started = 0, time.perf_counter()
            while runs < 5 or time.perf_counter() - started < 0.1:
                a @ b
                runs += 1
            timings[dtype] = (time.perf_counter() - started) / runs
    finally:
        torch.set_num_threads(threads)
    speedup = timings[torch.float32] / timings[torch.bfloat16]
    CACHE.put(key, round(speedup, 3))
    return speedup


def model_width(model_dir: str) -> int | None:
    """hidden_size from the model directory's config.json (None for a hub id or no config)."""
    path = Path(model_dir, "config.json")
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    config = config.get("text_config", config)
    width = config.get("hidden_size")
    return int(width) if isinstance(width, int) else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
