"""`method.precision: auto`: decided by measuring this CPU's bf16 matmul against fp32, and bf16
(autocast, as the trainer runs it on CPU) keeps the loss curve within a stated tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayft.spec import load_spec
from rayft.train import precision

# bf16 keeps 8 bits of mantissa: a few steps of a tiny model stay this close to fp32, relative, per step
BF16_LOSS_TOLERANCE = 5e-3


def spec(**method: object) -> object:
    return load_spec(data={"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "method": method})


def test_auto_follows_the_measured_matmul(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "CACHE", tmp_path / "precision.json")
    speedup = precision.bf16_speedup(64)  # measured here, then cached for this CPU and width
    cached = json.loads((tmp_path / "precision.json").read_text())
    assert speedup > 0 and list(cached.values()) == [round(speedup, 3)] and list(cached)[0].endswith("|64")
    key = list(cached)[0].rsplit("|", 1)[0]
    (tmp_path / "precision.json").write_text(json.dumps({f"{key}|64": 0.05, f"{key}|4096": 2.4}))
    assert precision.resolve_precision(spec(), 64) == (
        "fp32",
        "auto: fp32 (bf16 matmul 0.1x fp32 at width 64 on this CPU)",
    )
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
