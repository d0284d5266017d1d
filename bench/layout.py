"""Local worker layout: the quickstart on N workers x 1 thread against 1 worker x N threads, on
one machine, in one sitting (N = this machine's cores). Which layout `rayft train` should use
on one machine, measured rather than guessed.

    python bench/layout.py

Both runs are the whole quickstart job (25 LoRA steps, evaluation at every checkpoint) with
`--no-compare`, on an embedded local Ray, reusing the converted model and the prepared data.
The global batch is the same in both (accumulation makes up the difference), so the loss curves
are the same job's. From each run's summary.json: tokens/s, start-up, training, evaluation, the
whole wall time, the held-out loss and the peak RSS of a worker. Recorded in
bench/results/layout.{json,md}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RAYFT, REPO, cli_env, record  # noqa: E402

FIELDS = ("tokens_per_second", "startup_seconds", "train_seconds", "eval_seconds", "total_seconds", "eval_loss")


def run(workers: int, threads: int) -> dict[str, float]:
    name = f"layout-{workers}x{threads}"
    started = time.time()
    done = subprocess.run(
        [RAYFT, "train", "configs/quickstart.yaml", "--no-compare", "--fresh", f"run.name={name}"]
        + [f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={threads}"],
        env=cli_env(),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-2000:])
    summary = json.loads((REPO / "runs" / name / "summary.json").read_text())
    out = {field: summary[field] for field in FIELDS}
    out["command_seconds"] = round(time.time() - started, 1)
    out["worker_peak_rss_gib"] = round(summary["peak_rss_bytes"] / 2**30, 2)
    return out


def main() -> None:
    cores = os.cpu_count() or 1
    layouts = {f"{cores} workers x 1 thread": run(cores, 1), f"1 worker x {cores} threads": run(1, cores)}
    (wide_name, wide), (deep_name, deep) = layouts.items()
    lines = [
        "| layout | tokens/s | start-up (s) | training (s) | of it evaluation (s) | run wall (s) | "
        "held-out loss | worker peak RSS (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in layouts.items():
        lines.append(
            f"| {name} | {r['tokens_per_second']:.0f} | {r['startup_seconds']} | {r['train_seconds']} | "
            f"{r['eval_seconds']} | {r['total_seconds']} | {r['eval_loss']:.4f} | {r['worker_peak_rss_gib']} |"
        )
    faster = wide_name if wide["total_seconds"] <= deep["total_seconds"] else deep_name
    ratio = deep["total_seconds"] / wide["total_seconds"]
    speed = wide["tokens_per_second"] / deep["tokens_per_second"]
    text = (
        f"# Local worker layout: {cores} x 1 against 1 x {cores}\n\n"
        + __doc__.split("\n\n")[2].replace("\n", " ")
        + "\n\n"
        + "\n".join(lines)
        + f"\n\n- tokens/s, {cores} x 1 over 1 x {cores}: **{speed:.2f}x**"
        + f"\n- run wall time, 1 x {cores} over {cores} x 1: **{ratio:.2f}x**; faster: **{faster}**\n"
    )
    print(text)
    print(f"recorded {record('layout', layouts, text)}")


if __name__ == "__main__":
    main()
