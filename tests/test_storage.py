"""Runs on object storage: checkpoints, prepared data, the model and the run's files on s3://,
against a local S3-compatible server (moto's standalone server on 127.0.0.1), and a resume from
there. Credentials and endpoint come from the environment, as on a real cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import BUCKET, assert_secret_nowhere, run_cli, spec_dict, write_spec

pytestmark = pytest.mark.slow


def s3_files(prefix: str) -> set[str]:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(f"s3://{BUCKET}/{prefix}")
    return {
        info.path.removeprefix(f"{root}/")
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if info.type == pafs.FileType.File
    }


def test_training_on_s3_storage_and_resuming_from_it(
    ray_cluster: Any, s3: dict[str, str], tiny_llama: Path, chat_data: dict[str, Path], tmp_path: Path
) -> None:
    job = spec_dict(
        tiny_llama,
        chat_data,
        tmp_path,
        run={"name": "on-s3", "storage_path": f"s3://{BUCKET}/runs"},
        train={"max_steps": 4, "save_every": 2},
        eval={"num_prompts": 2},
    )
    job["data"]["cache_dir"] = None  # prepared data on S3 too: <storage_path>/prepared
    spec = write_spec(tmp_path / "s3.yaml", job)
    env = ray_cluster.env(**s3)
    result = run_cli("train", str(spec), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    files = s3_files("runs")
    for expected in (
        "on-s3/spec.yaml",
        "on-s3/summary.json",
        "on-s3/metrics.jsonl",
        "on-s3/eval.json",
        "on-s3/model/adapter_model.safetensors",
        "on-s3/model/README.md",  # the model card, written with the report
        "on-s3/command.json",
        "on-s3/checkpoint_000004/checkpoint/trainer_state.json",
        "on-s3/checkpoint_000002/checkpoint/adapter_model.safetensors",
    ):
        assert expected in files, sorted(files)[:40]
    prepared = [f for f in files if f.startswith("prepared/") and f.endswith("stats.json")]
    assert len(prepared) == 1 and any(f.startswith("prepared/") and f.endswith(".parquet") for f in files)
    assert "held-out prompts: base vs tuned" in result.stdout
    assert_secret_nowhere("testing-secret-key", tmp_path, *ray_cluster.logs, texts=(result.stdout, result.stderr))

    again = run_cli("train", str(spec), "--no-compare", env=env)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "resuming on-s3 from checkpoint_000004" in again.stdout and "reusing prepared data" in again.stdout
