"""The same job through `ray job submit` to a cluster started with `ray start --head`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import BIN, REPO, assert_secret_nowhere, spec_dict, write_spec

pytestmark = pytest.mark.slow


def test_ray_job_submit_runs_the_job_on_the_cluster(
    ray_cluster: Any, tiny_llama: Path, chat_data: dict[str, Path], tmp_path: Path
) -> None:
    spec = write_spec(
        tmp_path / "job.yaml",
        spec_dict(tiny_llama, chat_data, tmp_path / "runs", run={"name": "submitted"}, train={"max_steps": 2}),
    )
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        ray_cluster.dashboard,
        "--working-dir",
        ".",
        "--runtime-env",
        "jobs/runtime_env.yaml",
        "--",
        "python",
        "jobs/train.py",
        str(spec),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=ray_cluster.env())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output
    # the job's own output is the CLI's: progress, summary and the base-vs-tuned comparison
    assert "train: step 2/2" in output
    assert "held-out prompts: base vs tuned" in output
    assert "Traceback" not in output
    run_dir = tmp_path / "runs" / "submitted"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens"] > 0
    assert (run_dir / "model" / "adapter_model.safetensors").is_file()
    scores = json.loads((run_dir / "eval.json").read_text())["scores"]
    assert set(scores) == {"base", "tuned"} and "exact_match" in scores["tuned"]


def test_rayft_submit_follows_the_job_and_returns_its_status(
    ray_cluster: Any, tiny_llama: Path, chat_data: dict[str, Path], tmp_path: Path
) -> None:
    from conftest import run_cli

    good = write_spec(
        tmp_path / "good.yaml",
        spec_dict(
            tiny_llama,
            chat_data,
            tmp_path / "runs",
            run={"name": "via-submit"},
            train={"max_steps": 2},
            eval={"before_after": False},
        ),
    )
    env = ray_cluster.env(WANDB_API_KEY="secret-value-9876543210")
    result = run_cli("submit", str(good), "--address", ray_cluster.dashboard, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "submitted raysubmit_" in result.stdout and "(passing WANDB_API_KEY" in result.stdout
    assert "train: step 2/2" in result.stdout and ": SUCCEEDED" in result.stdout
    job_id = result.stdout.split("submitted ", 1)[1].split(":", 1)[0]
    # the job's record (what `ray job list` and the dashboard show) holds the key sealed only
    from ray.job_submission import JobSubmissionClient

    record = json.dumps(JobSubmissionClient(ray_cluster.dashboard).get_job_info(job_id).dict(), default=str)
    assert_secret_nowhere("secret-value-9876543210", *ray_cluster.logs, texts=(result.stdout, result.stderr, record))

    listed = run_cli("jobs", "list", "--address", ray_cluster.dashboard, env=env)
    assert job_id in listed.stdout and "via-submit" in listed.stdout and "SUCCEEDED" in listed.stdout
    logs = run_cli("jobs", "logs", job_id, "--address", ray_cluster.dashboard, env=env)
    assert "run via-submit" in logs.stdout

    # a bad spec fails the job; the exit code says so and the error is the user's, not a traceback
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    bad = write_spec(
        tmp_path / "bad.yaml",
        spec_dict(
            tiny_llama, {"train": bad_data}, tmp_path / "runs", run={"name": "bad"}, eval={"before_after": False}
        ),
    )
    failed = run_cli("submit", str(bad), "--address", ray_cluster.dashboard, env=env)
    assert failed.returncode == 1, failed.stdout[-2000:]
    assert "bad.jsonl:1" in failed.stdout and "no assistant turn" in failed.stdout and ": FAILED" in failed.stdout


def test_jobs_stop(ray_cluster: Any, tiny_llama: Path, chat_data: dict[str, Path], tmp_path: Path) -> None:
    from conftest import run_cli, wait_for

    spec = write_spec(
        tmp_path / "slow.yaml",
        spec_dict(
            tiny_llama,
            chat_data,
            tmp_path / "runs",
            run={"name": "to-stop"},
            train={"max_steps": 40},
            eval={"before_after": False},
        ),
    )
    env = ray_cluster.env(RAYFT_TEST_STEP_SECONDS="1")
    submitted = run_cli("submit", str(spec), "--address", ray_cluster.dashboard, "--no-wait", env=env)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.split("submitted ", 1)[1].split(":", 1)[0]
    wait_for(
        lambda: "train: step" in run_cli("jobs", "logs", job_id, "--address", ray_cluster.dashboard, env=env).stdout,
        what=f"job {job_id} to log a training step",
        timeout=180,
        every=2,
    )
    stopped = run_cli("jobs", "stop", job_id, "--address", ray_cluster.dashboard, env=env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    wait_for(
        lambda: (
            f"{job_id}" in (listed := run_cli("jobs", "list", "--address", ray_cluster.dashboard, env=env).stdout)
            and "STOPPED" in listed
        ),
        what=f"job {job_id} to be listed as STOPPED",
        timeout=120,
        every=2,
    )
