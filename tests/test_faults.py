"""Fault tolerance on a real cluster: a worker killed with SIGKILL mid-epoch, a driver killed
and the command rerun, `--fresh`. Steps are throttled (RAYFT_TEST_STEP_SECONDS) so the kills
land between known checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import BIN, run_cli, spec_dict, wait_for, write_jsonl, write_spec

pytestmark = pytest.mark.slow

STEPS = 8  # one epoch: 64 samples / global batch 8 (61: the last step has 5)
SAVE_EVERY = 2
STEP_SECONDS = 1.0  # two steps (2 s) between checkpoints: a kill after one lands before the next


def latest_checkpoint(run_dir: Path) -> str | None:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return None
    try:
        return (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except json.JSONDecodeError:  # being rewritten
        return None


def train_workers_alive(cluster: Any) -> list[Any]:
    """The training workers alive on the test's own cluster (by address: another Ray cluster on
    the machine, a developer's say, must not confuse the test)."""
    from ray.util.state import list_actors

    return list_actors(
        address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    )


def start_training(spec: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "rayft"), "train", str(spec), "--no-compare"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def job(ray_cluster: Any, tiny_llama: Path, chat_data: dict[str, Path], tmp_path: Path):
    def make(name: str, workers: int, samples: int = 64, **run: Any) -> tuple[Path, Path]:
        data = dict(chat_data)
        if samples != 64:
            lines = chat_data["train"].read_text().splitlines()[:samples]
            data["train"] = write_jsonl(tmp_path / f"train-{samples}.jsonl", lines)
        spec = spec_dict(
            tiny_llama,
            data,
            tmp_path / "runs",
            scaling={"num_workers": workers},
            train={"max_steps": None, "epochs": 1, "save_every": SAVE_EVERY},
            run={"name": name, "checkpoints_to_keep": 2, "checkpoint_metric": None, **run},
            eval={"before_after": False},
        )
        return write_spec(tmp_path / f"{name}.yaml", spec), tmp_path / "runs" / name

    return make


def test_worker_killed_mid_epoch_resumes_from_the_last_checkpoint_exactly(job, ray_cluster: Any) -> None:
    """61 samples: the epoch's last step is short (5 of 8 rows), which accelerate would fill with
    samples from the epoch's start."""
    spec, run_dir = job("worker-kill", workers=2, samples=61, max_failures=1, log_samples=True)
    process = start_training(spec, ray_cluster.env(RAYFT_TEST_STEP_SECONDS=str(STEP_SECONDS)))
    try:
        wait_for(
            lambda: latest_checkpoint(run_dir) == "checkpoint_000004",
            what="checkpoint_000004 of the run",
            timeout=240,
            every=0.1,
            process=process,
        )
        victim = train_workers_alive(ray_cluster)[-1]
        os.kill(victim.pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=400)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["resumed_from_step"] == 4  # lost only the steps after checkpoint 4
    assert "resumed from step 4" in output

    # Exact mid-epoch resume: the steps kept from the first attempt plus the steps of the second
    # cover every training sample of the epoch exactly once.
    before = [
        json.loads(line)
        for path in run_dir.glob("samples/rank*-from-step0.jsonl")
        for line in path.read_text().splitlines()
        if line
    ]
    after = [
        json.loads(line)
        for path in run_dir.glob("samples/rank*-from-step4.jsonl")
        for line in path.read_text().splitlines()
        if line
    ]
    assert before and after and min(r["step"] for r in after) == 5 and max(r["step"] for r in after) == STEPS
    trained = [i for r in before if r["step"] <= 4 for i in r["sample_ids"]] + [
        i for r in after for i in r["sample_ids"]
    ]
    assert len(trained) == len(set(trained)) == 61, "a sample was repeated or skipped across the restart"
    # ... and those are exactly the prepared training set
    import pyarrow.parquet as pq

    prepared = json.loads(Path(summary["prepared"], "stats.json").read_text())
    every = {
        i
        for ids in pq.read_table(prepared["files"]["train"], columns=["sample_ids"]).column("sample_ids").to_pylist()
        for i in ids
    }
    assert set(trained) == every


def test_a_hung_worker_is_detected_and_the_group_restarts_from_the_last_checkpoint(job, ray_cluster: Any) -> None:
    """The last rank stops for good after step 5 (as in a collective that never returns); its
    watchdog ends it after run.hang_timeout_s and the run resumes from checkpoint 4. The timeout
    is far above a step here (1 s) even on a busy machine, and far below the test's patience."""
    spec, run_dir = job("hang", workers=2, max_failures=1, hang_timeout_s=20)
    env = ray_cluster.env(RAYFT_TEST_STEP_SECONDS=str(STEP_SECONDS), RAYFT_TEST_HANG_AT_STEP="5")
    result = subprocess.run(
        [str(BIN / "rayft"), "train", str(spec), "--no-compare"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "rank 1 made no progress for" in output and "run.hang_timeout_s=20" in output, output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["resumed_from_step"], summary["restarts"]) == (STEPS, 4, 1)


def test_killed_driver_then_the_same_command_resumes_and_fresh_starts_over(job, ray_cluster: Any) -> None:
    """Also: resuming with another method is refused, with more workers it goes through."""
    spec, run_dir = job("driver-kill", workers=1)
    process = start_training(spec, ray_cluster.env(RAYFT_TEST_STEP_SECONDS=str(STEP_SECONDS)))
    try:
        wait_for(
            lambda: latest_checkpoint(run_dir) == "checkpoint_000004",
            what="checkpoint_000004 of the run",
            timeout=240,
            every=0.1,
            process=process,
        )
        process.kill()  # SIGKILL: no cleanup, as when a laptop sleeps or a pod is evicted
        process.wait(timeout=60)
    finally:
        process.kill()
    # Ray reaps the dead driver's workers
    wait_for(
        lambda: not train_workers_alive(ray_cluster),
        what="Ray to reap the killed driver's training workers",
        timeout=120,
    )
    assert not (run_dir / "summary.json").exists()

    changed = run_cli("train", str(spec), "--no-compare", "method.lora.r=8", env=ray_cluster.env())
    assert changed.returncode == 2
    assert "has checkpoints of a different method (method.lora.r: 4 -> 8)" in changed.stdout
    assert "--fresh" in changed.stdout and "Traceback" not in changed.stdout + changed.stderr

    # more workers (same global batch) is a change it resumes through
    rerun = run_cli("train", str(spec), "--no-compare", "scaling.num_workers=2", env=ray_cluster.env())
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-2000:]
    assert "resuming with changes: scaling.num_workers: 1 -> 2" in rerun.stdout
    assert "resuming driver-kill from checkpoint_000004" in rerun.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["resumed_from_step"]) == (STEPS, 4)
    # the metrics timeline has each step once, across both attempts
    steps = [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line and "loss" in json.loads(line)
    ]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS

    fresh = run_cli("train", str(spec), "--no-compare", "--fresh", env=ray_cluster.env())
    assert fresh.returncode == 0, fresh.stdout[-3000:]
    assert "resuming" not in fresh.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["resumed_from_step"]) == (STEPS, 0)
