"""The GPU path as far as a CPU machine can take it: the attention choice per hardware and its
refusals, FSDP2 from the spec to accelerate's plugin, Liger's option, and the planner's FSDP2
and attention arithmetic. Training under FSDP2 needs GPUs (accelerate enables FSDP only on
accelerators: bench/results/fsdp2_cpu.md); tests/test_methods.py checks what torch does on gloo."""

from __future__ import annotations

from typing import Any

import pytest

from rayft.errors import SpecError
from rayft.model.attention import auto_attention, check_liger, resolve_attention
from rayft.plan import estimate
from rayft.plan.shapes import KNOWN_SHAPES
from rayft.spec import load_spec
from rayft.spec.yamlfile import deep_merge


def job(**sections: Any) -> Any:
    base = {
        "model": {"path": "meta-llama/Llama-3.2-1B"},
        "data": {"train": "data.jsonl", "max_length": 2048, "packing": True},
        "train": {"global_batch_size": 8, "micro_batch_size": 2},
        "scaling": {"num_workers": 4, "use_gpu": True, "accelerator_type": "H100"},
    }
    return load_spec(data=deep_merge(base, sections))


def refused(match: str, **sections: Any) -> None:
    with pytest.raises(SpecError, match=match):
        job(**sections)


# ------------------------------------------------------------------------------- attention
def test_auto_attention_picks_the_fastest_correct_one_for_the_hardware() -> None:
    assert auto_attention(False, None, True, True)[0] == "sdpa"  # CPU
    assert auto_attention(True, (9, 0), True, True)[0] == "flash_attention_3"  # H100 with flash-attn-3
    assert auto_attention(True, (9, 0), True, False)[0] == "flash_attention_2"
    assert auto_attention(True, (8, 0), True, True)[0] == "flash_attention_2"  # A100: FA3 is Hopper-only
    assert auto_attention(True, (7, 5), True, False) == (
        "sdpa",
        "auto: sdpa (sm_75 predates flash-attention 2's Ampere minimum)",
    )
    name, why = auto_attention(True, (8, 0), False, False)
    assert name == "sdpa" and "flash-attn is not installed" in why and "rayft[gpu]" in why


def test_auto_resolves_to_sdpa_on_this_cpu_and_says_why() -> None:
    spec = job(scaling={"num_workers": 1, "use_gpu": False, "accelerator_type": None})
    assert spec.model.attn_implementation == "auto"
    assert resolve_attention(spec) == ("sdpa", "auto: sdpa on CPU")
    explicit = job(model={"attn_implementation": "eager"}, scaling={"use_gpu": False, "accelerator_type": None})
    assert resolve_attention(explicit) == ("eager", "as the spec says")


def test_attention_that_would_mix_packed_samples_is_refused_naming_the_field() -> None:
    refused(
        r"model.attn_implementation=paged\|eager with data.packing=true would let packed samples attend",
        model={"attn_implementation": "paged|eager"},
    )
    # without packing there are no boundaries to cross
    assert job(model={"attn_implementation": "paged|eager"}, data={"packing": False}).data.packing is False


def test_flash_attention_needs_a_gpu_half_precision_and_its_package() -> None:
    cpu = {"use_gpu": False, "accelerator_type": None}
    refused("flash_attention_2 needs a GPU", model={"attn_implementation": "flash_attention_2"}, scaling=cpu)
    refused(
        "runs in bf16 or fp16 only", model={"attn_implementation": "flash_attention_2"}, method={"precision": "fp32"}
    )
    spec = job(model={"attn_implementation": "flash_attention_2"})  # valid as a spec: a GPU job
    with pytest.raises(SpecError, match="model.attn_implementation: .*needs a CUDA GPU and this worker has none"):
        resolve_attention(spec)  # this worker (the test machine) has no CUDA


def test_liger_needs_a_gpu_and_its_package() -> None:
    refused("method.liger needs a GPU", method={"liger": True}, scaling={"use_gpu": False, "accelerator_type": None})
    spec = job(method={"liger": True})
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(SpecError, match="method.liger: .*liger-kernel .* is not installed"):
            check_liger(spec)
    check_liger(job())  # off: nothing to check


# ------------------------------------------------------------------------------------ FSDP2
def test_fsdp_refusals_name_the_field() -> None:
    refused("method.fsdp and method.deepspeed=zero3 both shard", method={"fsdp": True, "deepspeed": "zero3"})
    refused(
        "method.fsdp needs GPUs .* silently fall back to DDP",
        method={"fsdp": True},
        scaling={"use_gpu": False, "accelerator_type": None},
    )
    refused("qlora with method.fsdp needs method.quantization.storage_dtype", method={"kind": "qlora", "fsdp": True})
    ok = job(method={"kind": "qlora", "fsdp": True, "quantization": {"storage_dtype": "bfloat16"}})
    assert ok.method.fsdp is not None and ok.method.fsdp.reshard_after_forward
    assert job(method={"fsdp": False}).method.fsdp is None


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fsdp_spec_becomes_accelerates_fsdp2_plugin(kind: str, tmp_path: Any) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    from rayft.spec import StepPlan
    from rayft.train.trainer import sft_config

    spec = job(
        method={"kind": kind, "gradient_checkpointing": True, "fsdp": {"cpu_offload": True, "state_dict": "sharded"}}
    )
    # fp32: this CPU machine cannot build bf16 GPU arguments; the FSDP part is the same
    args = sft_config(spec, str(tmp_path), has_eval=False, steps=StepPlan(1, 1, 1, 1), precision="fp32")
    assert args.gradient_checkpointing is False  # FSDP's own activation checkpointing instead
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2
    assert plugin.activation_checkpointing is True
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.reshard_after_forward is True
    plugin.set_state_dict_type("FULL_STATE_DICT")  # what SFTRecipe does before saving the final model
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    plain = sft_config(job(), str(tmp_path), has_eval=False, steps=StepPlan(1, 1, 1, 1), precision="fp32")
    assert plain.fsdp_plugin_args is None


# ---------------------------------------------------------------------------------- planner
def test_plan_shards_weights_gradients_and_optimizer_with_fsdp2() -> None:
    shape = KNOWN_SHAPES["llama-3.2-1b"]
    full = {"kind": "full", "precision": "bf16"}
    ddp = estimate(job(method=full), tokens=0)
    fsdp = estimate(job(method={**full, "fsdp": True}), tokens=0)
    # fp32 masters, fp32 gradients, Adam states: each a quarter on each of 4 workers
    assert fsdp.memory["weights"] == pytest.approx(shape.params * 4 / 4, rel=1e-6)
    assert fsdp.memory["optimizer states"] == pytest.approx(shape.params * 8 / 4, rel=1e-6)
    assert "DDP gradient buckets" in ddp.memory and "DDP gradient buckets" not in fsdp.memory
    gathered = fsdp.memory["FSDP gathered weights"]
    assert gathered == pytest.approx(2 * shape.embedding_params * 2, rel=1e-6)  # bf16 head/embedding and the next
    assert "autocast weight copies" not in fsdp.memory  # MixedPrecisionPolicy gathers 16-bit copies per layer
    assert fsdp.total_bytes < ddp.total_bytes / 2
    kept = estimate(job(method={**full, "fsdp": {"reshard_after_forward": False}}), tokens=0)
    assert kept.memory["FSDP gathered weights"] > shape.params * 2 * 0.95  # every layer stays gathered
    offload = estimate(job(method={**full, "fsdp": {"cpu_offload": True}}), tokens=0)
    assert "weights" not in offload.memory and "optimizer states" not in offload.memory
    assert offload.host_bytes == pytest.approx(shape.params * (4 + 4 + 8) / 4, rel=1e-6)
    assert "fsdp2 cpu-offload" in offload.method


def test_plan_of_fsdp2_qlora_shards_the_4bit_weights() -> None:
    qlora = {"kind": "qlora", "quantization": {"storage_dtype": "bfloat16"}}
    single = estimate(job(method=qlora), tokens=0)
    sharded = estimate(job(method={**qlora, "fsdp": True}), tokens=0)
    assert sharded.memory["weights"] == pytest.approx(single.memory["weights"] / 4, rel=1e-6)


def test_plan_counts_the_packed_mask_only_for_attention_that_needs_one() -> None:
    flash = estimate(job(), tokens=0)  # auto on a GPU: flash-attention 2 assumed, varlen
    sdpa = estimate(job(model={"attn_implementation": "sdpa"}), tokens=0)
    T = 2 * 2048
    assert sdpa.memory["activations"] - flash.memory["activations"] == T * T
    assert flash.method.endswith("flash_attention_2; micro-batch 2 x 2048 tokens")
    assert any(note.startswith("attention: auto is flash_attention_2") for note in flash.notes)


def test_plan_states_logits_memory_with_and_without_the_chunked_head() -> None:
    plan = estimate(job(method={"liger": True}), tokens=0)
    note = next(note for note in plan.notes if note.startswith("logits:"))
    # 4,096 tokens x 128,256 vocabulary: fp32 logits and their gradient would be 3.9 GiB; one tile 0.5 GiB
    assert "one 4096 x 32768 tile (0.50 GiB)" in note and "(3.9 GiB at 4,096 tokens x 128,256)" in note
    assert "Liger's fused linear cross-entropy" in note
    assert "liger" in plan.method


# ------------------------------------------------------------------------- bench/gpu_check
def gpu_check() -> Any:
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    module_spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert module_spec and module_spec.loader
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    module_spec.loader.exec_module(module)
    return module


def test_gpu_check_packs_rows_and_knows_the_gpus() -> None:
    check = gpu_check()
    rows = check.packed_rows(1000, check.GPU_SIZES, 8)
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["seq_lengths"]) <= 2048
        assert len(row["seq_lengths"]) >= 2 and min(row["seq_lengths"]) >= 64
    assert sum(len(r["input_ids"]) for r in rows) > 0.95 * 8 * 2048  # packed, not padded
    names = {
        "NVIDIA H100 80GB HBM3": "H100-80G",
        "NVIDIA H200": "H200",
        "NVIDIA A100-SXM4-40GB": "A100-40G",
        "NVIDIA A100-SXM4-80GB": "A100-80G",
        "NVIDIA L4": "L4",
        "Tesla T4": "T4",
    }
    assert {name: check.gpu_accelerator(name).name for name in names} == names


def test_gpu_check_dry_run_runs_every_method_and_writes_the_table(tmp_path: Any) -> None:
    """The GPU benchmark's own code on CPU at tiny sizes, so that it cannot rot before a GPU runs it."""
    import json

    check = gpu_check()
    assert check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "gpu-cpu-dry-run.json").read_text())["runs"]
    assert [(r["model"], r["method"]) for r in runs] == [
        (model, method) for model in ("tiny-llama", "tiny-smollm2") for method in ("lora", "qlora", "full")
    ]
    assert all(r["status"] == "ok" and r["tokens_per_second"] > 0 and 0 < r["mfu"] < 1 for r in runs), runs
    assert all(r["plan_peak_gib"] > 0 and r["attention"] == "sdpa" for r in runs)
    by = {(r["model"], r["method"]): r for r in runs}
    # the same rows for every method: full counts 6N, LoRA 4N, attention alike (N: linear layers and head)
    n = 2 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256) + 512 * 128
    assert by[("tiny-llama", "full")]["flops_per_token"] - by[("tiny-llama", "lora")]["flops_per_token"] == 2 * n
    table = (tmp_path / "gpu-cpu-dry-run.md").read_text()
    assert table.count("| ok |") == 6 and "Not run here: flash-attention 2" in table


def test_a_run_resumes_across_attention_kernels_but_not_across_sharding(tmp_path: Any) -> None:
    """A run whose spec.yaml says sdpa (the default before `auto`) resumes under auto: the kernel
    computes the same function on the same weights. Switching DeepSpeed for FSDP2 does not: the
    checkpoint's format differs."""
    import yaml

    from rayft.rundir import RunDir
    from rayft.train.run import check_resumable

    def spec(**method: Any) -> Any:
        return job(run={"name": "resumed", "storage_path": str(tmp_path)}, method=method)

    old = spec(deepspeed="zero2")
    run_dir = RunDir.of(old)
    recorded = old.to_dict()
    recorded["model"]["attn_implementation"] = "sdpa"
    (tmp_path / "resumed").mkdir()
    (tmp_path / "resumed" / "spec.yaml").write_text(yaml.safe_dump(recorded))
    assert str(run_dir.spec) == str(tmp_path / "resumed" / "spec.yaml")
    logged: list[str] = []
    check_resumable(spec(deepspeed="zero2", liger=True), run_dir, logged.append)
    assert logged and "model.attn_implementation: 'sdpa' -> 'auto'" in logged[0]
    with pytest.raises(SpecError, match="different method"):
        check_resumable(spec(fsdp=True), run_dir, logged.append)
