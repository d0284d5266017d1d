"""Small pure pieces: DeepSpeed configs from the spec, the sweep's search space, loading a prepared split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import python_json
from rayft.errors import SpecError
from rayft.spec import load_spec

BASE = {"model": {"path": "org/model"}, "data": {"train": "d.jsonl"}}


def spec(**sections):
    return load_spec(data={**BASE, **sections})


@pytest.mark.parametrize(
    "preset, stage, offload", [("zero2", 2, False), ("zero3", 3, False), ("zero3-offload", 3, True)]
)
def test_deepspeed_presets(preset: str, stage: int, offload: bool) -> None:
    from rayft.train.deepspeed import deepspeed_config

    config = deepspeed_config(spec(method={"kind": "full", "deepspeed": preset}))
    zero = config["zero_optimization"]
    assert zero["stage"] == stage and ("offload_optimizer" in zero) == offload
    # batch sizes and precision come from the trainer's own arguments, stated once in the spec
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["bf16"] == {"enabled": "auto"}
    assert config["zero_allow_untested_optimizer"] is True
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # one consolidated model at the end
    if offload:
        assert zero["offload_optimizer"]["pin_memory"] is False  # CPU workers: nothing to pin for


def test_deepspeed_json_file_and_its_errors(tmp_path: Path) -> None:
    from rayft.train.deepspeed import deepspeed_config

    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert deepspeed_config(spec(method={"deepspeed": str(good)}))["zero_optimization"]["stage"] == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {\n    "stage": 2,\n  }\n}')
    with pytest.raises(SpecError, match=r"method.deepspeed: .*bad.json:4: not valid JSON"):
        deepspeed_config(spec(method={"deepspeed": str(bad)}))
    with pytest.raises(SpecError, match="no such DeepSpeed config"):
        deepspeed_config(spec(method={"deepspeed": str(tmp_path / "missing.json")}))


def test_search_space_domains() -> None:
    from ray.tune.search.sample import Categorical, Float, Integer

    from rayft.tune.space import search_space

    job = spec(
        tune={
            "search_space": {
                "train.learning_rate": {"loguniform": [1e-5, 1e-3]},
                "method.lora.r": {"choice": [8, 16]},
                "train.seed": {"randint": [1, 3]},
                "train.epochs": {"grid": [1, 2]},
            }
        }
    )
    space = search_space(job.tune)
    assert isinstance(space["train.learning_rate"], Float) and isinstance(space["method.lora.r"], Categorical)
    assert isinstance(space["train.seed"], Integer) and space["train.seed"].upper == 4  # inclusive bounds
    assert space["train.epochs"] == {"grid_search": [1, 2]}


def test_bad_search_spaces_are_spec_errors() -> None:
    from rayft.tune.space import data_variants, search_algorithm

    with pytest.raises(SpecError, match="tune.search_space: .*train.learning_rate: loguniform takes a list of 2"):
        spec(tune={"search_space": {"train.learning_rate": {"loguniform": [1e-5]}}})
    with pytest.raises(SpecError, match="expected one of"):
        spec(tune={"search_space": {"train.learning_rate": {"normal": [0, 1]}}})
    optuna_grid = spec(tune={"search_space": {"train.epochs": {"grid": [1, 2]}}, "search_alg": "optuna"})
    with pytest.raises(SpecError, match="grid values need tune.search_alg=random"):
        search_algorithm(optuna_grid)
    assert (
        type(
            search_algorithm(spec(tune={"search_space": {"train.epochs": {"choice": [1, 2]}}, "search_alg": "optuna"}))
        ).__name__
        == "OptunaSearch"
    )
    with pytest.raises(SpecError, match="sweeping data.max_length needs grid or choice values"):
        data_variants(spec(tune={"search_space": {"data.max_length": {"randint": [64, 512]}}}))
    variants = data_variants(
        spec(
            tune={
                "search_space": {
                    "data.max_length": {"grid": [64, 128]},
                    "data.packing": {"choice": [True, False]},
                    "train.learning_rate": {"uniform": [0.1, 0.2]},
                }
            }
        )
    )
    assert len(variants) == 4 and {"data.max_length": 64, "data.packing": True} in variants


def test_trial_spec_applies_params_and_groups_under_the_sweep() -> None:
    from rayft.tune.space import trial_spec

    job = spec(tune={"search_space": {"train.learning_rate": {"grid": [1e-3]}}}, run={"name": "sweep"})
    trial = trial_spec(
        job.model_dump(mode="json"),
        {"train.learning_rate": 0.5, "method.lora.r": 4},
        sweep="sweep",
        trial="trial-1",
        trial_storage="/s/sweep/trials",
        prepared="/s/prepared",
    )
    assert (trial.train.learning_rate, trial.method.lora.r) == (0.5, 4)
    assert (trial.run.name, trial.run.storage_path, trial.data.cache_dir) == (
        "trial-1",
        "/s/sweep/trials",
        "/s/prepared",
    )
    assert trial.tracking.wandb.group == "sweep" and trial.tune is None and not trial.eval.before_after


def test_load_split_streams_parquet_into_one_memory_mapped_local_copy(tmp_path: Path, monkeypatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayft.data import prepared as prepare

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the node's local cache: ~/.cache/rayft/prepared
    rows = [
        {"input_ids": [i, i + 1], "labels": [-100, i + 1], "seq_lengths": [2], "sample_ids": [i], "text": "x"}
        for i in range(2500)
    ]
    files = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    pq.write_table(pa.Table.from_pylist(rows[:1200]), files[0])
    pq.write_table(pa.Table.from_pylist(rows[1200:]), files[1])
    prepared = prepare.Prepared(root=str(tmp_path), key="k", stats={"files": {"train": files}})

    dataset = prepare.load_split(prepared, "train")
    assert dataset.column_names == prepare.TOKEN_COLUMNS  # only what training reads
    assert len(dataset) == 2500 and dataset[1300]["sample_ids"] == [1300] and dataset[7]["labels"] == [-100, 8]
    local = tmp_path / "home" / ".cache" / "rayft" / "prepared"
    [copy] = local.iterdir()
    assert copy.suffix == ".arrow" and not list(local.glob("*.tmp"))
    # the second worker on the node maps the same copy; a re-written split gets a new one
    assert len(prepare.load_split(prepared, "train")) == 2500 and len(list(local.iterdir())) == 1
    pq.write_table(pa.Table.from_pylist(rows[:10]), files[1])
    assert len(prepare.load_split(prepared, "train")) == 1210
    assert prepare.load_split(prepared, "eval") is None


def test_an_epoch_of_whole_steps_trains_every_sample_once_at_any_worker_count() -> None:
    """accelerate's even-batches sharding, as the trainer uses it, over a split topped up to
    whole global batches: every sample exactly once per epoch, the same order on 1, 2 or 4
    workers, and the filler rows carry no trained label."""
    import datasets
    import torch
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, RandomSampler

    from rayft.data.tokenize import IGNORE
    from rayft.train.epoch import whole_steps

    rows = 61  # 7 global batches of 8 and 5 rows
    split = datasets.Dataset.from_dict(
        {
            "input_ids": [[5, 6, 7]] * rows,
            "labels": [[IGNORE, 6, 7]] * rows,
            "seq_lengths": [[3]] * rows,
            "sample_ids": [[100 + i] for i in range(rows)],
        }
    )
    padded = whole_steps(split, rows_per_step=8, pad_token_id=0)
    assert len(padded) == 64 and padded.features == split.features
    assert all(row["labels"] == [IGNORE] and row["sample_ids"] == [] for row in padded.select(range(61, 64)))
    assert whole_steps(padded, 8, 0) is padded

    def shard(dataset, workers: int, rank: int) -> list[list[int]]:
        # each worker shuffles with the same seed (the trainer's data_seed), then takes its batches
        order = torch.Generator().manual_seed(0)
        batches = BatchSampler(RandomSampler(dataset, generator=order), micro, drop_last=False)
        return list(BatchSamplerShard(batches, num_processes=workers, process_index=rank, even_batches=True))

    micro = 2
    orders = {}
    for workers in (1, 2, 4):
        shards = [shard(padded, workers, rank) for rank in range(workers)]
        # step s = the next (8 / micro) micro-batches, taken round-robin from the ranks
        trained = [i for step in zip(*shards, strict=True) for batch in step for i in batch]
        ids = [sid for index in trained for sid in padded[index]["sample_ids"]]
        assert sorted(ids) == list(range(100, 100 + rows)), f"{workers} workers: a sample repeated or skipped"
        orders[workers] = ids
    assert orders[1] == orders[2] == orders[4]

    # without the top-up, the same sharding trains samples twice: the defect this guards against
    shards = [shard(split, 2, rank) for rank in (0, 1)]
    assert sum(len(batch) for rank in shards for batch in rank) > rows


@pytest.mark.parametrize("embedded", [None, "bare", "dashboard"])
def test_ray_train_controller_starts_only_the_helpers_a_run_uses(embedded: str | None) -> None:
    """Ray Train's own callbacks and scaling policy, as its trainer builds them: rayft passes no
    Ray Datasets (no DatasetManager); on the embedded local Ray no autoscaler takes requests, and
    a single run's (no dashboard, no State API) has no use for the placement-group cleaner."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy, create_scaling_policy

    from rayft.train.controller import RayftTorchTrainer, without_unused_helpers
    from rayft.train.in_controller import ElasticWithoutLostNodes

    def kwargs(scaling: ScalingConfig) -> dict:
        trainer = RayftTorchTrainer(lambda: None, scaling_config=scaling, run_config=RunConfig(name="unit"))
        return {"callbacks": trainer._create_default_callbacks(), "scaling_policy": create_scaling_policy(scaling)}

    fixed = kwargs(ScalingConfig(num_workers=2))
    kinds = {type(c) for c in fixed["callbacks"]}
    assert {DatasetsCallback, PlacementGroupCleanerCallback} <= kinds  # what Ray Train would start
    lean = without_unused_helpers(fixed, has_datasets=False, embedded=embedded)
    left = {type(c) for c in lean["callbacks"]}
    assert DatasetsCallback not in left
    assert (PlacementGroupCleanerCallback in left) == (embedded != "bare")
    assert left | {DatasetsCallback, PlacementGroupCleanerCallback} == kinds  # nothing else is dropped
    policy = lean["scaling_policy"]
    assert isinstance(policy, FixedScalingPolicy) and policy.scaling_config.num_workers == 2
    assert (type(policy) is FixedScalingPolicy) == (embedded is None)  # sends autoscaler requests on a cluster
    kept = without_unused_helpers(fixed, has_datasets=True, embedded=None)
    assert {type(c) for c in kept["callbacks"]} == kinds

    # elastic resizing asks the coordinator what the cluster holds, less the nodes just lost
    elastic = kwargs(ScalingConfig(num_workers=(1, 2)))
    for where in (None, "bare"):
        policy = without_unused_helpers(elastic, has_datasets=False, embedded=where)["scaling_policy"]
        assert type(policy) is ElasticWithoutLostNodes
        assert policy.scaling_config is elastic["scaling_policy"].scaling_config


def test_the_driver_and_the_controller_build_and_unpickle_a_run_without_torch() -> None:
    """Ray Train's controller unpickles its arguments (callbacks, scaling policy, run context)
    when it starts, before any worker exists: with Ray's TorchConfig among them it imported torch
    first (about 2 s). rayft's TorchLater is the same configuration (TorchTrainer fills it in).
    The driver builds the trainer and its train function without importing torch either."""
    import dataclasses
    import subprocess
    import sys

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig
    from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy

    from rayft.train.controller import RayftTorchTrainer, without_unused_helpers
    from rayft.train.services import FailureNotes

    scaling = ScalingConfig(num_workers=2)
    trainer = RayftTorchTrainer(
        lambda: None, scaling_config=scaling, run_config=RunConfig(name="unit", callbacks=[FailureNotes(None, 1)])
    )
    config = trainer.backend_config
    fields = [f.name for f in dataclasses.fields(config)]
    assert fields == [f.name for f in dataclasses.fields(TorchConfig)] + ["unused_packages"]
    assert (
        TorchConfig(**config.to_dict()) == TorchConfig(backend="gloo")
        and config.to_dict() == TorchConfig(backend="gloo").to_dict()
    )
    arguments = {
        "callbacks": trainer._create_default_callbacks(),
        "scaling_policy": create_scaling_policy(scaling),
        "train_run_context": trainer.train_run_context,
    }
    payload = ray.cloudpickle.dumps(without_unused_helpers(arguments, has_datasets=False, embedded="bare"))
    code = (
        "import sys, ray.cloudpickle as p; p.loads(sys.stdin.buffer.read()); "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr.decode()[-2000:]
    assert loaded.stdout.decode().strip() == "[]"

    driver = (
        "import json, sys; from ray.train import ScalingConfig, RunConfig;"
        "from rayft.train.controller import RayftTorchTrainer;"
        "t = RayftTorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=2),"
        " run_config=RunConfig(name='u'));"
        "t._get_train_func(); print(json.dumps([t.backend_config.backend, 'torch' in sys.modules]))"
    )
    assert python_json(driver) == ["gloo", False]


def test_a_worker_skips_only_the_packages_its_run_never_calls() -> None:
    """PEFT imports bitsandbytes (and, through its torch.compile'd kernels, torch's inductor), TRL
    imports wandb, transformers' Trainer scipy and accelerate deepspeed whenever they are
    installed: 3-4 CPU-s per worker. A run that uses none of them goes without; QLoRA and
    bitsandbytes' optimizers keep bitsandbytes, ZeRO keeps deepspeed, and LoRA still wraps the
    model in such a worker."""
    from rayft.train.worker import packages_unused_by

    def unused(**spec: Any) -> tuple[str, ...]:
        base = {"model": {"path": "/m"}, "data": {"train": "/d.jsonl"}, "method": {"kind": "lora"}}
        return packages_unused_by(load_spec(data={**base, **spec}))

    everything = ("wandb", "scipy", "bitsandbytes", "deepspeed")
    assert unused() == everything
    assert unused(method={"kind": "full"}) == everything
    assert unused(method={"kind": "qlora"}) == ("wandb", "scipy", "deepspeed")
    assert unused(train={"optimizer": "paged_adamw_8bit"}) == ("wandb", "scipy", "deepspeed")
    assert unused(train={"optimizer": "adamw_torch_fused"}) == everything
    assert unused(method={"kind": "lora", "deepspeed": "zero3"}) == ("wandb", "scipy", "bitsandbytes")

    # accelerate's unwrap (the trainer calls it as it starts) asks for deepspeed only if installed
    code = (
        "import gc, json, sys; from rayft.train.worker import import_training_loop;"
        "import_training_loop(('wandb', 'scipy', 'bitsandbytes', 'deepspeed'));"
        "import accelerate.utils, peft, transformers, trl;"
        "from rayft.train.recipe import SFTRecipe;"
        "config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=2, vocab_size=64);"
        "lora = peft.LoraConfig(r=4, target_modules='all-linear');"
        "model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora);"
        "unwrapped = accelerate.utils.extract_model_from_parallel(model) is model;"
        "print(json.dumps([model.get_nb_trainable_parameters()[0] > 0, unwrapped,"
        " [n for n in ('bitsandbytes', 'wandb', 'scipy', 'deepspeed', 'torch._inductor.compile_fx')"
        "  if sys.modules.get(n)],"
        " gc.isenabled(), gc.get_freeze_count() > 100_000]))"
    )
    # the collector is back on, and the imports' objects are out of its reach
    assert python_json(code) == [True, True, [], True, True]
