"""Facts with one home: where a job's files go (a `~` storage path included), which environment
variables reach which Ray processes, and the token meter the callbacks read. No Ray needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayft.env import Target, env_names, env_values
from rayft.rundir import RunDir, checkpoint_name, local_models, models_cache, prepared_base
from rayft.spec import load_spec
from rayft.storage import Location, is_remote

BASE = {"model": {"path": "org/model"}, "data": {"train": "d.jsonl"}}


def spec(**sections):
    return load_spec(data={**BASE, **sections})


def test_a_home_relative_storage_path_means_home_for_every_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # a relative path would land here, not in $HOME
    job = spec(run={"storage_path": "~/runs", "name": "job"})
    home_runs = f"{tmp_path}/runs"
    run_dir = RunDir.of(job)
    assert run_dir.path == f"{home_runs}/job"
    assert run_dir.spec == f"{home_runs}/job/spec.yaml" and run_dir.model == f"{home_runs}/job/model"
    assert str(prepared_base(job)) == f"{home_runs}/prepared"  # once `./~/runs/prepared`
    assert str(models_cache(job)) == f"{home_runs}/.models"  # once `./~/runs/.models`
    assert str(prepared_base(spec(data={"train": "d.jsonl", "cache_dir": "~/cache"}))) == f"{tmp_path}/cache"


def test_object_store_locations_keep_their_scheme() -> None:
    job = spec(run={"storage_path": "s3://bucket/runs/", "name": "job"})
    assert RunDir.of(job).path == "s3://bucket/runs/job" and RunDir.of(job).remote
    assert str(prepared_base(job)) == "s3://bucket/runs/prepared"
    assert Location.of("gs://b/x/").join("y", "z/") == Location("gs://b/x/y/z")
    assert is_remote("file:///tmp/x") and not is_remote("/tmp/x") and not is_remote("~/x")
    assert str(models_cache(job)) == "s3://bucket/runs/.models"  # converted once per cluster, kept here
    assert not local_models(job).startswith("s3://")  # ... and read from each node's local copy


def test_checkpoint_names_are_safe_file_name_parts() -> None:
    assert checkpoint_name("runs/x/checkpoint_000040/checkpoint") == "checkpoint_000040"
    assert checkpoint_name("s3://b/runs/x/checkpoint_000008/") == "checkpoint_000008"
    assert checkpoint_name("/some dir/my model") == "my_model"
    assert RunDir("/r/x").eval_result("eval", "runs/x/checkpoint_000040") == "/r/x/eval-checkpoint_000040.json"


def test_environment_goes_where_the_table_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-secret")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "proj")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    monkeypatch.setenv("RAYFT_TEST_STEP_SECONDS", "1")
    local, on_s3 = spec(), spec(run={"storage_path": "s3://bucket/runs"})
    # storage credentials only for the schemes the spec uses
    assert "AWS_SECRET_ACCESS_KEY" not in env_names(local, Target.WORKERS)
    assert env_values(on_s3, Target.DATA_TASKS) == {"AWS_SECRET_ACCESS_KEY": "s3-secret"}
    assert "GOOGLE_CLOUD_PROJECT" not in env_values(on_s3, Target.WORKERS)
    # workers: quiet settings, storage, the forwarded tokens and the test hooks
    workers = env_values(on_s3, Target.WORKERS)
    assert workers["TOKENIZERS_PARALLELISM"] == "false" and workers["HF_TOKEN"] == "hf-secret"
    assert workers["RAYFT_TEST_STEP_SECONDS"] == "1" and workers["AWS_SECRET_ACCESS_KEY"] == "s3-secret"
    # data and evaluation tasks need storage only; the tracker the W&B settings and tokens
    assert "HF_TOKEN" not in env_values(on_s3, Target.EVAL_TASKS)
    assert set(env_names(local, Target.TRACKER)) >= {"WANDB_API_KEY", "WANDB_MODE", "HF_TOKEN"}
    # KubeRay pods read s3 credentials from the Secret, but not gs ones (Workload Identity)
    assert "AWS_ACCESS_KEY_ID" in env_names(on_s3, Target.KUBERAY)
    on_gs = spec(run={"storage_path": "gs://bucket/runs"})
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in env_names(on_gs, Target.KUBERAY)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in env_names(on_gs, Target.WORKERS)


def test_token_meter_counts_real_and_trained_tokens() -> None:
    import torch

    from rayft.train.callbacks import TokenMeter

    meter = TokenMeter()
    padded = {
        "labels": torch.tensor([[-100, 5, 6], [-100, 7, -100]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
    }
    packed = {"labels": torch.tensor([[-100, 1, 2, -100, 3]])}  # padding-free: no attention mask
    meter.count(padded)
    meter.count(packed)
    assert (meter.tokens, meter.trained) == (5 + 5, 3 + 3)
    assert meter.totals() == (10, 6)  # one process: no collective
    logs = {"loss": 1.0}
    meter.on_log(None, None, None, logs=logs)
    assert logs["tokens_per_second"] > 0
    evaluation = {"eval_loss": 1.0}
    meter.on_log(None, None, None, logs=evaluation)
    assert "tokens_per_second" not in evaluation  # a rate of training, not of evaluation


def test_a_checkpoint_is_ranked_only_by_its_own_evaluation() -> None:
    import json

    from rayft.rundir import CHECKPOINT_SCORE, UNRANKED
    from rayft.train.callbacks import checkpoint_metrics

    history = [
        {"loss": 2.0, "step": 1},
        {"eval_loss": 1.5, "eval_tokens": 90, "step": 2},
        {"loss": 1.8, "step": 3},
    ]
    evaluated = checkpoint_metrics(history[:2], 2, "eval_loss")
    assert (evaluated["eval_loss"], evaluated["eval_tokens"], evaluated["loss"], evaluated["step"]) == (1.5, 90, 2.0, 2)
    assert evaluated[CHECKPOINT_SCORE] == 1.5
    # step 3 was not evaluated: no eval metric of step 2's weights, and a score worse than any loss
    later = checkpoint_metrics(history, 3, "eval_loss")
    assert "eval_loss" not in later and "eval_tokens" not in later
    assert (later["loss"], later["step"], later[CHECKPOINT_SCORE]) == (1.8, 3, UNRANKED)
    assert checkpoint_metrics(history, 3, "eval_accuracy", mode="max")[CHECKPOINT_SCORE] == -UNRANKED
    # Ray snapshots its checkpoint list as JSON and reads it back on resume: the score survives
    assert json.loads(json.dumps(later))[CHECKPOINT_SCORE] == UNRANKED
    # ranked by a training metric, or kept by age: nothing is made up
    assert checkpoint_metrics(history, 3, "loss")[CHECKPOINT_SCORE] == 1.8
    assert CHECKPOINT_SCORE not in checkpoint_metrics(history, 3, None)
