"""A sweep on the local cluster: every trial a 2-worker training run, ASHA stopping the poor
ones, a failing trial recorded while the sweep goes on, the driver killed and the same command
resuming it, W&B runs per trial grouped under the sweep, and best.yaml reproducing its metric."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import BIN, assert_secret_nowhere, run_cli, spec_dict, wait_for, write_spec
from wandb_records import find_runs, read_run

pytestmark = pytest.mark.slow

SECRET = "hf_rayft_secret_value_0123456789"
RATES = [1e-2, 1e-6, 3e-3, 1e-7, -1.0]  # -1 is invalid: that trial fails, the sweep goes on


def test_sweep_with_asha_failures_resume_tracking_and_best_yaml(
    ray_cluster: Any, tiny_llama: Path, chat_data: dict[str, Path], tmp_path: Path
) -> None:
    spec = write_spec(
        tmp_path / "sweep.yaml",
        spec_dict(
            tiny_llama,
            chat_data,
            tmp_path / "runs",
            run={"name": "lr-sweep"},
            train={"max_steps": 8, "save_every": 2},
            tune={
                "search_space": {"train.learning_rate": {"grid": RATES}},
                "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
            },
        ),
    )
    sweep_dir = tmp_path / "runs" / "lr-sweep"
    env = ray_cluster.env(HF_TOKEN=SECRET)

    # Start, and kill the driver once the first trial has finished.
    first = subprocess.Popen(
        [str(BIN / "rayft"), "tune", str(spec)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(
            lambda: list((sweep_dir / "trials").glob("*/summary.json")),
            what="the sweep's first trial to finish",
            timeout=600,
            every=0.5,
        )
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        first.kill()

    resumed = run_cli("tune", str(spec), env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-2000:]
    assert "resuming sweep lr-sweep" in resumed.stdout
    result = json.loads((sweep_dir / "sweep.json").read_text())
    trials = {t["params"]["train.learning_rate"]: t for t in result["trials"]}
    assert sorted(trials) == sorted(RATES)  # each configuration once, across both drivers
    assert trials[-1.0]["status"] == "failed" and "train.learning_rate" in trials[-1.0]["error"]
    assert any(t["status"] == "stopped early" for t in result["trials"]), "ASHA stopped nothing"
    assert trials[1e-2]["status"] == "finished" and result["best"] == trials[1e-2]["name"]
    stopped = [t for t in result["trials"] if t["status"] == "stopped early"]
    assert all(t["steps"] < 8 for t in stopped)
    assert (sweep_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best: " in resumed.stdout and "failed: invalid job spec" in resumed.stdout

    # W&B: one run per trial that trained, grouped under the sweep, with its params and metrics.
    runs = {}
    for path in find_runs(sweep_dir / "trials"):
        if "latest-run" not in path.parts:
            run = read_run(path)
            if run["history"]:
                runs.setdefault(run["name"], []).append(run)
    trained = {t["name"] for t in result["trials"] if t["status"] != "failed"}
    status = {t["name"]: t["status"] for t in result["trials"]}
    assert set(runs) == trained
    for name, segments in runs.items():
        assert all(run["group"] == "lr-sweep" for run in segments)
        # A trial running when the first driver was killed has a segment that never ended
        # cleanly (its tracker died with the driver); the resumed segment, the last, ends cleanly.
        assert segments[-1]["exit_code"] == 0, [run["exit_code"] for run in segments]
        if status[name] == "stopped early":  # finished by the sweep, not marked as crashed
            assert segments[-1]["summary"].get("status") == "stopped early", segments[-1]["summary"]
        assert any(any("eval/loss" in row for row in run["history"]) for run in segments)
        assert segments[0]["config"]["trial_params"]["train.learning_rate"] in RATES
        assert segments[0]["config"]["model"]["path"] == str(tiny_llama)
    # No secret anywhere in the sweep's files (W&B logs, specs, checkpoints, Tune state).
    assert_secret_nowhere(SECRET, sweep_dir, *ray_cluster.logs, texts=(resumed.stdout, resumed.stderr))

    # best.yaml is a ready spec that trains to the metric the sweep reported for it.
    best = run_cli("train", str(sweep_dir / "best.yaml"), "--no-compare", env=env)
    assert best.returncode == 0, best.stdout[-3000:]
    summary = json.loads((tmp_path / "runs" / "lr-sweep-best" / "summary.json").read_text())
    assert summary["eval_loss"] == pytest.approx(trials[1e-2]["metric"], rel=1e-4)
