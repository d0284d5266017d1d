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


def test_a_gguf_is_converted_once_per_cluster_and_other_nodes_download_it(
    s3: dict[str, str], stories260k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With object storage, the first node converts the GGUF and uploads it beside the runs; a
    node without a local copy, whose GGUF is the same file at another path (installed there
    separately), downloads it instead of converting. Named by content, not path or mtime."""
    import shutil

    from rayft import storage
    from rayft.model import source
    from rayft.model.gguf_export import write_gguf
    from rayft.spec import load_spec

    gguf = Path(write_gguf(stories260k, tmp_path / "here" / "stories.gguf", "f32", name="stories").path)
    job = load_spec(
        data={
            "model": {"path": str(gguf)},
            "data": {"train": "d.jsonl"},
            "run": {"storage_path": f"s3://{BUCKET}/once", "name": "job"},
        }
    )
    monkeypatch.setenv("HOME", str(tmp_path / "node-1"))  # each node's ~/.cache/rayft
    converted = source.materialized_dir(job)
    name = Path(converted).name
    assert Path(converted, "config.json").is_file() and name.startswith("stories-")
    assert storage.exists(f"s3://{BUCKET}/once/.models/{name}/{source.UPLOADED}")

    elsewhere = tmp_path / "there" / "stories.gguf"
    elsewhere.parent.mkdir()
    shutil.copyfile(gguf, elsewhere)  # the same file, another path and mtime
    monkeypatch.setenv("HOME", str(tmp_path / "node-2"))

    def no_conversion(*args: Any) -> None:
        raise AssertionError("converted again on a second node")

    monkeypatch.setattr(source, "_convert_gguf", no_conversion)
    downloaded = source.materialized_dir(
        job.model_copy(update={"model": job.model.model_copy(update={"path": str(elsewhere)})})
    )
    assert Path(downloaded).name == name and str(tmp_path / "node-2") in downloaded
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(downloaded).config.vocab_size == 512
