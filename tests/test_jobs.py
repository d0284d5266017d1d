"""The same job through `ray job submit` to a cluster started with `ray start --head`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import BIN, REPO, spec_dict, write_spec

pytestmark = pytest.mark.slow


def test_ray_job_submit_runs_the_job_on_the_cluster(ray_cluster: Any, tiny_llama: Path,
                                                    chat_data: dict[str, Path], tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "job.yaml", spec_dict(tiny_llama, chat_data, tmp_path / "runs",
                                                       run={"name": "submitted"}, train={"max_steps": 2}))
    command = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard, "--working-dir", ".",
               "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "jobs/train.py", str(spec)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=ray_cluster.env())
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
