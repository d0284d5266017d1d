"""`method.precision: auto`: decided by measuring this CPU's bf16 matmul against fp32, and bf16
(autocast, as the trainer runs it on CPU) keeps the loss curve within a stated tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayft.machine_cache import MachineCache
from rayft.spec import load_spec
from rayft.train import precision

# bf16 keeps 8 bits of mantissa: a few steps of a tiny model stay this close to fp32, relative, per step
BF16_LOSS_TOLERANCE = 5e-3


def spec(**method: object) -> object:
    return load_spec(data={"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "method": method})


def test_auto_follows_the_measured_matmul(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "CACHE", MachineCache("precision.json", tmp_path))
    speedup = precision.bf16_speedup(64)  # measured here, then cached for this CPU and width
    cached = json.loads((tmp_path / "precision.json").read_text())
    assert speedup > 0 and list(cached.values()) == [round(speedup, 3)] and list(cached)[0].endswith("|64")
    key = list(cached)[0].rsplit("|", 1)[0]
    (tmp_path / "precision.json").write_text(json.dumps({f"{key}|64": 0.018, f"{key}|128": 1.2, f"{key}|4096": 2.4}))
    assert precision.resolve_precision(spec(), 64) == (
        "fp32",
        "auto: fp32 (bf16 matmul 56x slower than fp32 at width 64 on this CPU)",
    )
    assert precision.resolve_precision(spec(), 128)[1] == "auto: fp32 (bf16 matmul 1.2x fp32 at width 128 on this CPU)"
    assert precision.resolve_precision(spec(), 4096) == (
        "bf16",
        "auto: this CPU's bf16 matmul is 2.4x fp32 at width 4096",
    )
    assert precision.resolve_precision(spec(precision="bf16"), 64) == ("bf16", "as the spec says")
    assert precision.resolve_precision(spec(), None)[0] == "fp32"
    # where bf16 is faster, QLoRA under DeepSpeed still trains in fp32: bitsandbytes' CPU 4-bit
    # matmul fails in bf16 on ZeRO-3's partitioned weights
    qlora_zero3 = spec(kind="qlora", deepspeed="zero3", quantization={"storage_dtype": "bfloat16"})
    assert precision.resolve_precision(qlora_zero3, 4096)[0] == "fp32"
    assert precision.resolve_precision(spec(kind="qlora"), 4096)[0] == "bf16"


def test_bf16_autocast_loss_curve_stays_close_to_fp32() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    batch = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    curves = {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        curve = []
        for _ in range(6):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
        curves[dtype] = curve
    assert curves["fp32"][-1] < curves["fp32"][0] and curves["bf16"][-1] < curves["bf16"][0]
    gaps = [abs(b - f) / f for f, b in zip(curves["fp32"], curves["bf16"])]
    print(f"bf16 vs fp32, relative loss gap per step: {', '.join(f'{g:.2e}' for g in gaps)}")
    assert max(gaps) < BF16_LOSS_TOLERANCE, curves


def test_lora_in_bf16_holds_frozen_linears_in_bf16_with_the_same_loss_curve(tiny_llama: Path) -> None:
    """On CPU, LoRA in bf16 keeps the frozen Linear weights in bf16 (autocast would cast them on
    every forward): the same loss curve as fp32 weights under autocast, while adapters,
    embeddings and the tied head stay fp32."""
    from rayft.model.loading import frozen_linears_to, load_model

    lora = spec(kind="lora", lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"})
    batch = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    curves, models = {}, {}
    for run_precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = load_model(lora, str(tiny_llama), "sdpa", run_precision)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for _ in range(5):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
        curves[run_precision], models[run_precision] = curve, model
    held = models["bf16"]
    dtypes = {name: p.dtype for name, p in held.named_parameters()}
    frozen_linear = [n for n in dtypes if "base_layer.weight" in n]
    assert len(frozen_linear) == 2 * 7 and all(dtypes[n] == torch.bfloat16 for n in frozen_linear)
    assert all(dtypes[n] == torch.float32 for n, p in held.named_parameters() if p.requires_grad)
    assert held.get_input_embeddings().weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in models["fp32"].parameters())
    assert frozen_linears_to(held, torch.bfloat16) == 2 * 7  # idempotent: the same layers again
    assert curves["bf16"][-1] < curves["bf16"][0]
    gaps = [abs(b - f) / f for f, b in zip(curves["fp32"], curves["bf16"])]
    assert max(gaps) < 1e-3, curves  # the same matmuls in bf16 either way: rounding order only
