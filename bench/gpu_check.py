"""One-shot GPU benchmark: what rayft's GPU path really does on one GPU, next to what `rayft plan`
says it will do.

    python bench/gpu_check.py                       # one GPU, at most ~8 minutes
    python bench/gpu_check.py --dry-run --out DIR   # CPU, tiny sizes: the same code (tests run it)

Models: the Llama-3.2-1B config and the SmolLM2-135M config, random weights (nothing is
downloaded). Methods: LoRA (r=16, all linear layers), QLoRA (nf4) and full fine-tuning, bf16,
rows of 2048 tokens packed from samples of 64-1024 tokens. Each runs with sdpa and with
flash-attention 2 (where installed), and with Liger's kernels off and on (where installed), through
rayft's own model loading and trainer (rayft.model.load_model, rayft.train.trainer), on one
process without Ray.

Recorded per run: tokens/s over the timed steps (after warm-up), MFU = model FLOPs per token x
tokens/s / the GPU's dense bf16 peak, where model FLOPs per token are 6N (full) or 4N (LoRA,
QLoRA: no weight gradients for the frozen N) plus attention, 3 x 2 x layers x width x the token's
sample length (causal QK^T and AV, forward and backward) averaged over the packed samples; and
the peak of torch.cuda.max_memory_allocated next to `rayft plan`'s peak tensors and total.
Results: bench/results/gpu-<gpu>.md and .json (the dry run writes into --out).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

BUDGET_SECONDS = 7.5 * 60  # the whole command stays under 8 minutes: later runs are skipped, and said so
LLAMA_3_2_1B = dict(  # meta-llama/Llama-3.2-1B config.json
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128001,
)
SMOLLM2_135M = dict(  # HuggingFaceTB/SmolLM2-135M config.json
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
)
TINY = dict(  # the dry run: wide enough for 4-bit blocks of 64
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
METHODS = {
    "lora": {"kind": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
    "qlora": {"kind": "qlora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
    "full": {"kind": "full"},
}


@dataclass
class Sizes:
    max_length: int
    micro_batch: int
    sample_lengths: tuple[int, int]
    warmup_steps: int
    timed_steps: int


GPU_SIZES = Sizes(2048, 4, (64, 1024), 3, 8)
DRY_SIZES = Sizes(64, 1, (8, 32), 1, 1)


@dataclass
class Outcome:
    model: str
    method: str
    attention: str
    liger: bool
    status: str = "ok"  # or why it did not run
    tokens_per_second: float = 0.0
    mfu: float = 0.0
    flops_per_token: float = 0.0
    peak_gib: float | None = None  # torch.cuda.max_memory_allocated
    plan_peak_gib: float = 0.0  # `rayft plan`: tensors at the peak (what max_memory_allocated measures)
    plan_total_gib: float = 0.0  # ... with the allocator margin and the runtime
    step_seconds: float = 0.0


# ------------------------------------------------------------------------------------ data
def packed_rows(vocab: int, sizes: Sizes, rows: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows of at most max_length tokens, each packed from random samples (first-fit in order,
    as many as fit), labels on the second half of every sample: rayft's prepared-row layout."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        ids: list[int] = []
        labels: list[int] = []
        lengths: list[int] = []
        while True:
            low, high = sizes.sample_lengths
            length = rng.randint(low, high)
            if sum(lengths) + length > sizes.max_length:
                length = sizes.max_length - sum(lengths)
                if length < low:
                    break
            sample = [rng.randrange(3, vocab) for _ in range(length)]
            ids += sample
            labels += [-100] * (length // 2) + sample[length // 2 :]
            lengths.append(length)
        out.append({"input_ids": ids, "labels": labels, "seq_lengths": lengths})
    return out


def attention_flops_per_token(rows: list[dict[str, Any]], layers: int, width: int) -> float:
    """Causal attention, forward and backward (3 x forward), per token of these packed rows:
    a token of a sample of length n attends to n/2 keys on average within its own sample."""
    tokens = sum(sum(r["seq_lengths"]) for r in rows)
    squares = sum(n * n for r in rows for n in r["seq_lengths"])
    return 3 * 2 * layers * width * squares / tokens


# ------------------------------------------------------------------------------------ runs
def build_model_dir(root: Path, name: str, config: dict[str, Any], device: str) -> Path:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = root / name
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    model.save_pretrained(directory)
    del model
    # the rows are token ids already: the tokenizer only has to name the pad and end tokens
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.save_pretrained(directory)
    return directory


def one_run(
    model_dir: Path,
    model_name: str,
    method: str,
    attention: str,
    liger: bool,
    rows: list[dict[str, Any]],
    sizes: Sizes,
    device: Any,
    scratch: str,
) -> Outcome:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from rayft.errors import SpecError
    from rayft.model import load_model
    from rayft.plan import GiB, estimate
    from rayft.plan.shapes import model_shape
    from rayft.spec import StepPlan, load_spec
    from rayft.train.callbacks import TokenMeter
    from rayft.train.trainer import MeteredSFTTrainer, sft_config

    gpu = device.kind == "gpu"
    steps = sizes.warmup_steps + sizes.timed_steps
    spec = load_spec(
        data={
            "model": {"path": str(model_dir), "attn_implementation": attention},
            "method": {**METHODS[method], "precision": "bf16", "liger": liger},
            "data": {"train": "unused.jsonl", "max_length": sizes.max_length, "packing": True},
            "train": {
                "global_batch_size": sizes.micro_batch,
                "micro_batch_size": sizes.micro_batch,
                "max_steps": steps,
                "learning_rate": 1e-5,
                "log_every": steps,
                "save_every": steps + 1,  # no checkpoint inside the timed steps
            },
            "scaling": {"num_workers": 1, "use_gpu": gpu, **({"accelerator_type": device.name} if gpu else {})},
            "eval": {"before_after": False},
        }
    )
    outcome = Outcome(model_name, method, attention, liger)
    shape = model_shape(spec)
    try:
        plan = estimate(
            spec, tokens=0, accelerator=device.name, memory_gib=device.memory_gib, shape=shape, suggest=False
        )
        outcome.plan_peak_gib, outcome.plan_total_gib = plan.peak_bytes / GiB, plan.total_bytes / GiB
    except SpecError:  # a GPU the planner's table does not know
        outcome.plan_peak_gib = outcome.plan_total_gib = float("nan")
    dense = (6 if method == "full" else 4) * shape.matmul_params
    outcome.flops_per_token = dense + attention_flops_per_token(rows, shape.layers, shape.heads * shape.head_size)

    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = load_model(spec, str(model_dir), attention)
    if gpu and method != "qlora":  # QLoRA is placed by its device_map
        model = model.to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = sft_config(spec, scratch, has_eval=False, steps=StepPlan(steps, steps, steps + 1, steps + 1))
    args.save_strategy = "no"

    meter = TokenMeter()
    clock = StepClock(sizes.warmup_steps, gpu, meter)
    trainer = MeteredSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True),
        meter=meter,
    )
    trainer.add_callback(clock)
    trainer.train()
    seconds, tokens = clock.timed()
    outcome.step_seconds = seconds / sizes.timed_steps
    outcome.tokens_per_second = tokens / seconds if seconds else 0.0
    peak = device.bf16_tflops * 1e12 if gpu else device.fp32_tflops * 1e12
    outcome.mfu = outcome.flops_per_token * outcome.tokens_per_second / peak if peak else 0.0
    if gpu:
        outcome.peak_gib = torch.cuda.max_memory_allocated() / GiB
    del trainer, model
    return outcome


class StepClock(TrainerCallback):
    """Wall time and tokens of the steps after warm-up (CUDA synchronized at both ends)."""

    def __init__(self, warmup: int, gpu: bool, meter: Any):
        self.warmup, self.gpu, self.meter = warmup, gpu, meter
        self.started: float | None = None
        self.ended: float | None = None
        self.start_tokens = self.end_tokens = 0

    def _now(self) -> float:
        if self.gpu:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.warmup:
            self.started, self.start_tokens = self._now(), self.meter.tokens
        elif state.global_step == state.max_steps:
            self.ended, self.end_tokens = self._now(), self.meter.tokens

    def timed(self) -> tuple[float, int]:
        if self.started is None or self.ended is None:
            return 0.0, 0
        return self.ended - self.started, self.end_tokens - self.start_tokens


# ----------------------------------------------------------------------------------- plan
def configurations(dry_run: bool) -> list[tuple[str, str, str, bool]]:
    """(model, method, attention, liger) in the order they run: the most telling first, so that
    the time budget, if it runs out, cuts the least."""
    from transformers.utils import is_flash_attn_2_available, is_liger_kernel_available

    attentions = ["sdpa"] + ([] if dry_run or not is_flash_attn_2_available() else ["flash_attention_2"])
    ligers = [False] + ([True] if not dry_run and is_liger_kernel_available() else [])
    models = ["tiny-llama", "tiny-smollm2"] if dry_run else ["llama-3.2-1b", "smollm2-135m"]
    return [
        (model, method, attention, liger)
        for model in models
        for method in METHODS
        for attention in reversed(attentions)  # flash first: it is the default where installed
        for liger in ligers
    ]


def unavailable() -> list[str]:
    from transformers.utils import is_flash_attn_2_available, is_liger_kernel_available

    missing = []
    if not is_flash_attn_2_available():
        missing.append("flash-attention 2 (flash-attn not installed or no CUDA)")
    if not is_liger_kernel_available():
        missing.append("Liger (liger-kernel not installed)")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same code path")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the .md and .json go")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS, help="seconds before later runs are skipped")
    options = parser.parse_args(argv)

    import torch

    from rayft.plan.shapes import accelerator

    started = time.time()
    if options.dry_run:
        device, sizes, slug = accelerator("cpu", field="--dry-run", memory_gib=8), DRY_SIZES, "cpu-dry-run"
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            print("bench/gpu_check.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
            return 2
        device, sizes = gpu_accelerator(torch.cuda.get_device_name(0)), GPU_SIZES
        slug = device.name.lower()
    configs = {
        "tiny-llama": TINY,
        "tiny-smollm2": {**TINY, "num_hidden_layers": 3},
        "llama-3.2-1b": LLAMA_3_2_1B,
        "smollm2-135m": SMOLLM2_135M,
    }
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="rayft-gpu-check-") as scratch:
        root, dirs = Path(scratch), {}
        for model, method, attention, liger in configurations(options.dry_run):
            if time.time() - started > options.budget:
                outcomes.append(Outcome(model, method, attention, liger, status="skipped: time budget"))
                continue
            if model not in dirs:
                dirs[model] = build_model_dir(root, model, configs[model], "cuda" if device.kind == "gpu" else "cpu")
            rows = packed_rows(
                configs[model]["vocab_size"], sizes, sizes.micro_batch * (sizes.warmup_steps + sizes.timed_steps)
            )
            try:
                outcome = one_run(dirs[model], model, method, attention, liger, rows, sizes, device, str(root / "out"))
            except Exception as exc:  # one failing combination is a finding, not the end of the check
                traceback.print_exc()
                outcome = Outcome(model, method, attention, liger, status=f"failed: {type(exc).__name__}: {exc}"[:300])
            outcomes.append(outcome)
            print(json.dumps(asdict(outcome)), flush=True)
    path = write(options.out, slug, outcomes, device, sizes, time.time() - started)
    print(f"wrote {path}")
    return 0 if all(o.status == "ok" or o.status.startswith("skipped") for o in outcomes) else 1


def gpu_accelerator(name: str) -> Any:
    """The planner's table entry for this GPU (its dense bf16 peak and memory), by name."""
    import torch

    from rayft.plan.shapes import ACCELERATORS, Accelerator

    upper = name.upper()  # "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "NVIDIA H200", "Tesla T4"
    for key, found in ACCELERATORS.items():
        stem, _, size = key.partition("-")
        if re.search(rf"\b{stem}\b", upper) and (not size or size.rstrip("G") + "GB" in upper):
            return found
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"{name}: not in rayft.plan.shapes.ACCELERATORS; MFU is reported against 0", file=sys.stderr)
    return Accelerator(name.replace(" ", "-"), memory, 0, 0)


def write(out: Path, slug: str, outcomes: list[Outcome], device: Any, sizes: Sizes, seconds: float) -> Path:
    info = machine()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu-{slug}.json").write_text(
        json.dumps({"machine": info, "sizes": asdict(sizes), "runs": [asdict(o) for o in outcomes]}, indent=2)
    )
    peak = device.bf16_tflops if device.kind == "gpu" else device.fp32_tflops
    lines = [
        f"# bench/gpu_check.py on {device.name}",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM, GPU {info['gpu'] or 'none'}; "
        f"Python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + f"; {info['date']}.",
        "",
        f"Rows of {sizes.max_length} tokens packed from samples of "
        f"{sizes.sample_lengths[0]}-{sizes.sample_lengths[1]} tokens, "
        f"micro-batch {sizes.micro_batch}, {sizes.warmup_steps} warm-up then {sizes.timed_steps} timed steps, bf16. "
        f"MFU against {peak:g} TFLOP/s ({'dense bf16' if device.kind == 'gpu' else 'the CPU table entry'}); "
        "model FLOPs 6N (full) or 4N (LoRA, QLoRA) + attention over the packed samples' own lengths. "
        f"Whole check: {seconds:.0f} s.",
        "",
        "| model | method | attention | liger | tokens/s | MFU | peak GiB (measured) | plan peak GiB | plan total GiB "
        "| status |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for o in outcomes:
        measured = f"{o.peak_gib:.2f}" if o.peak_gib is not None else "n/a"
        lines.append(
            f"| {o.model} | {o.method} | {o.attention} | {'on' if o.liger else 'off'} | {o.tokens_per_second:,.0f} | "
            f"{o.mfu:.1%} | {measured} | {o.plan_peak_gib:.2f} | {o.plan_total_gib:.2f} | {o.status} |"
        )
    missing = unavailable()
    if missing:
        lines += ["", "Not run here: " + "; ".join(missing) + "."]
    path = out / f"gpu-{slug}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
