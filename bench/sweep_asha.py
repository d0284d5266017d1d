"""Sweeps: wall time of the same learning-rate sweep with ASHA and without early stopping, and
trial throughput, on an embedded local Ray cluster, in one run.

    python bench/sweep_asha.py [--steps 12]

Model: stories260K (a real pretrained 260K-parameter Llama, ../shared/models) with LoRA; data:
rayft's quickstart tasks; 2 workers per trial, so one trial at a time on a 2-core machine. The
grid holds 2 good and 4 poor learning rates, the situation early stopping is for.
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

RATES = [3e-2, 1e-2, 1e-5, 3e-6, 1e-6, 3e-7]


def sweep_spec(storage: Path, name: str, scheduler: str, steps: int) -> dict:
    return {
        "model": {"path": str(REPO.parent / "shared" / "models" / "stories260K")},
        "method": {"kind": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {
            "train": str(REPO / "data/quickstart/train.jsonl"),
            "eval": str(REPO / "data/quickstart/eval.jsonl"),
            "format": "messages",
            "max_length": 128,
            "packing": True,
        },
        "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": steps, "save_every": 2, "warmup": 0},
        "scaling": {"num_workers": 2},
        "run": {"name": name, "storage_path": str(storage)},
        "tracking": {"wandb": {"mode": "disabled"}},
        "tune": {
            "search_space": {"train.learning_rate": {"grid": RATES}},
            "scheduler": {"kind": scheduler, "grace_period": 1, "reduction_factor": 2},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    storage = WORK / "sweep-bench"
    env = cli_env()
    runs = {}
    for scheduler in ("none", "asha"):
        name = f"sweep-{scheduler}"
        path = storage / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(sweep_spec(storage, name, scheduler, args.steps)))
        started = time.time()
        subprocess.run([RAYFT, "tune", str(path), "--fresh"], check=True, env=env, capture_output=True)
        wall = time.time() - started
        result = json.loads((storage / name / "sweep.json").read_text())
        best = next(t for t in result["trials"] if t["name"] == result["best"])
        runs[scheduler] = {
            "wall_seconds": wall,
            "trials": len(result["trials"]),
            "stopped_early": sum(t["status"] == "stopped early" for t in result["trials"]),
            "steps_trained": sum(t["steps"] for t in result["trials"]),
            "trials_per_minute": 60 * len(result["trials"]) / wall,
            "best_rate": best["params"]["train.learning_rate"],
            "best_metric": best["metric"],
        }
    lines = [
        "| scheduler | wall s | trials | stopped early | steps trained | trials/min | best lr | best eval_loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in runs.items():
        lines.append(
            f"| {name} | {row['wall_seconds']:.0f} | {row['trials']} | {row['stopped_early']} | "
            f"{row['steps_trained']} | {row['trials_per_minute']:.2f} | {row['best_rate']:g} | "
            f"{row['best_metric']:.4f} |"
        )
    speedup = runs["none"]["wall_seconds"] / runs["asha"]["wall_seconds"]
    text = (
        f"# Sweep: ASHA vs no early stopping ({len(RATES)} trials x 2 workers, {args.steps} steps each)\n\n"
        + __doc__.split("\n\n")[2]
        + "\n\n"
        + "\n".join(lines)
        + f"\n\n- wall time without early stopping / with ASHA: **{speedup:.2f}x**"
        f"\n- both found the same best learning rate: {runs['none']['best_rate'] == runs['asha']['best_rate']}\n"
    )
    print(text)
    print(f"recorded {record('sweep_asha', {'runs': runs, 'speedup': speedup}, text)}")


if __name__ == "__main__":
    main()
