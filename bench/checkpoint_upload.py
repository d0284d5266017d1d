"""Step time while a checkpoint uploads, against a step without one: asynchronous uploads (rayft's
default) against synchronous ones (RAYFT_TEST_SYNC_UPLOAD, as before), in one sitting.

    python bench/checkpoint_upload.py [--layers 6]

The job: a full fine-tune (weights and Adam states in every checkpoint) of a Llama built from a
config with stories260K's tokenizer, one worker with 1 thread on an embedded local Ray (the other
core is left to the S3 server and the upload, as storage elsewhere would take them), storage on
a local S3-compatible server (moto), a checkpoint every 3 steps. From the run's metrics.jsonl
(one line per step): the time of each step that ends with a checkpoint (save + upload, or save
and hand-off) against the median of the others. Recorded in bench/results/checkpoint_upload.*.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RAYFT, REPO, WORK, cli_env, llama_from_config, record  # noqa: E402

SAVE_EVERY, STEPS = 3, 13
BUCKET = "bench-ckpt"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(spec: Path, env: dict[str, str], name: str) -> dict[str, float]:
    started = time.time()
    done = subprocess.run(
        [RAYFT, "train", str(spec), "--no-compare", "--fresh", f"run.name={name}"],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-2000:])
    from rayft import storage

    lines = [json.loads(x) for x in (storage.read_text(f"s3://{BUCKET}/{name}/metrics.jsonl") or "").splitlines() if x]
    times = {line["step"]: line["time"] for line in lines if "loss" in line}
    steps = sorted(times)
    durations = {s: times[s] - times[p] for p, s in zip(steps, steps[1:], strict=False)}
    # a checkpoint is written after step s's log: it lands in the duration of step s + 1
    with_checkpoint = [d for s, d in durations.items() if (s - 1) % SAVE_EVERY == 0 and s - 1 > 0]
    without = [d for s, d in durations.items() if (s - 1) % SAVE_EVERY != 0]
    summary = json.loads(storage.read_text(f"s3://{BUCKET}/{name}/summary.json") or "{}")
    return {
        "step_s_without_checkpoint": round(statistics.median(without), 3),
        "step_s_with_checkpoint": round(statistics.median(with_checkpoint), 3),
        # an upload that runs on beside training slows the steps after it too: the mean says it all
        "step_s_mean": round(statistics.mean(durations.values()), 3),
        # the training loop's own time in checkpoints: the local save, the hand-off to Ray, a sync upload
        "training_blocked_s_per_checkpoint": round(summary["checkpoint_seconds"] / (STEPS // SAVE_EVERY + 1), 2),
        "wall_s": round(time.time() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    model = llama_from_config(WORK / "ckpt-model", hidden=512, layers=args.layers)
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    aws = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_REGION": "us-east-1",
    }
    os.environ.update(aws)
    try:
        import boto3

        for _ in range(60):
            try:
                boto3.client("s3").create_bucket(Bucket=BUCKET)
                break
            except Exception:
                time.sleep(0.5)
        spec = WORK / "ckpt.yaml"
        spec.write_text(
            yaml.safe_dump(
                {
                    "model": {"path": str(model)},
                    "method": {"kind": "full"},
                    "data": {"train": str(REPO / "data" / "quickstart" / "train.jsonl"), "template": "chatml"},
                    "train": {
                        "global_batch_size": 4,
                        "micro_batch_size": 4,
                        "max_steps": STEPS,
                        "save_every": SAVE_EVERY,
                        "log_every": 1,
                    },
                    "scaling": {"num_workers": 1, "cpus_per_worker": 1},
                    "run": {"storage_path": f"s3://{BUCKET}", "checkpoint_metric": None},
                    "eval": {"before_after": False},
                }
            )
        )
        from safetensors.torch import load_file

        params = sum(p.numel() for p in load_file(model / "model.safetensors").values())
        results = {
            "model_parameters": params,
            "checkpoint_mb_approx": round(params * 12 / 2**20),  # fp32 weights + two Adam moments
            "async": run(spec, {**cli_env(), **aws}, "async"),
            "sync": run(spec, {**cli_env(), **aws, "RAYFT_TEST_SYNC_UPLOAD": "1"}, "sync"),
        }
    finally:
        server.terminate()
    a, s = results["async"], results["sync"]
    results["ratio_async_checkpoint_step_to_plain_step"] = round(
        a["step_s_with_checkpoint"] / a["step_s_without_checkpoint"], 2
    )
    results["ratio_sync_checkpoint_step_to_plain_step"] = round(
        s["step_s_with_checkpoint"] / s["step_s_without_checkpoint"], 2
    )
    table = (
        f"Full fine-tune, {params / 1e6:.1f}M parameters (a checkpoint of about "
        f"{results['checkpoint_mb_approx']} MiB with Adam states), 1 worker x 1 thread (the other core left to "
        "the S3 server), storage on a local "
        f"S3-compatible server, a checkpoint every {SAVE_EVERY} steps. Median step times:\n\n"
        "| upload | step without a checkpoint | step that writes one | ratio | training loop blocked per "
        "checkpoint | mean step |\n|---|---|---|---|---|---|\n"
        f"| async (default) | {a['step_s_without_checkpoint']} s | {a['step_s_with_checkpoint']} s | "
        f"{results['ratio_async_checkpoint_step_to_plain_step']}x | {a['training_blocked_s_per_checkpoint']} s | "
        f"{a['step_s_mean']} s |\n"
        f"| sync (before) | {s['step_s_without_checkpoint']} s | {s['step_s_with_checkpoint']} s | "
        f"{results['ratio_sync_checkpoint_step_to_plain_step']}x | {s['training_blocked_s_per_checkpoint']} s | "
        f"{s['step_s_mean']} s |\n"
        f"\nMean step time, sync over async: **{s['step_s_mean'] / a['step_s_mean']:.2f}x**.\n"
        "\nThe training loop blocks only for the local save and the hand-off (the trainer's checkpoint "
        "directory is moved, not copied, to Ray's upload thread), then training goes on while the upload runs. "
        "What remains of the difference between a step with a checkpoint and one without is the CPU that the "
        "upload thread and the S3 server (moto, a Python process on this machine) take from training.\n"
    )
    print(table)
    record("checkpoint_upload", results, table)


if __name__ == "__main__":
    main()
