"""Training on a real local Ray cluster: 1 and 2 workers, checkpoints in storage, a final model
that plain transformers/PEFT load, and the same loss curve at any worker count."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_secret_nowhere, spec_dict, wait_for
from rayft.errors import ClusterError
from rayft.spec import load_spec

pytestmark = pytest.mark.slow

STEPS = 6
# Same global batch (8) and seed: 1 worker accumulates 2 micro-batches of 4, 2 workers each
# run 1 micro-batch of 4 and DDP averages. The loss is normalized by the trained-token count of
# the whole global batch in both cases, so the curves agree to float32 rounding.
LOSS_TOLERANCE = 1e-4  # relative, per step
SECRET = "hf_rayft_test_secret_9876543210"


@pytest.fixture(scope="module")
def runs(
    ray_cluster: Any, tiny_llama: Path, chat_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[int, Any]:
    from rayft.train.driver import train

    storage = tmp_path_factory.mktemp("runs")
    results = {}
    os.environ["HF_TOKEN"] = SECRET  # forwarded to the workers by name; must appear in no file
    here = os.getcwd()
    for workers in (1, 2):
        # The 2-worker run names its model and storage relative to where it is started, as a
        # user's spec does (`storage_path: ./runs`): Ray's workers run in directories of their own.
        os.chdir(storage.parent)
        model, root = (Path(os.path.relpath(tiny_llama)), Path(storage.name)) if workers == 2 else (tiny_llama, storage)
        spec = load_spec(
            data=spec_dict(
                model,
                chat_data,
                root,
                run={"name": f"workers-{workers}"},
                scaling={"num_workers": workers},
                train={"max_steps": STEPS, "save_every": 3, "learning_rate": 1e-2},
            )
        )
        lines: list[str] = []
        try:
            summary = train(spec, log=lines.append)
        finally:
            os.chdir(here)
        results[workers] = (spec, summary, lines)
    os.environ.pop("HF_TOKEN")
    return results


def losses(checkpoint: Path) -> list[float]:
    state = json.loads((checkpoint / "checkpoint" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.parametrize("workers", [1, 2])
def test_run_writes_checkpoints_and_summary(runs: dict[int, Any], workers: int) -> None:
    spec, summary, lines = runs[workers]
    run_dir = Path(summary.run_dir)
    assert summary.steps == STEPS
    assert summary.tokens > summary.trained_tokens > 0
    assert summary.tokens_per_second > 0 and summary.train_seconds > 0
    assert math.isfinite(summary.eval_loss) and math.isfinite(summary.train_loss)
    for step in (3, 6):
        checkpoint = run_dir / f"checkpoint_{step:06d}" / "checkpoint"
        assert (checkpoint / "adapter_model.safetensors").is_file()
        assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json").is_file()
        assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
        assert not list(checkpoint.glob("*model*.bin")), "weights must be safetensors"
    assert summary.checkpoint.endswith(f"checkpoint_{STEPS:06d}")
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    saved = load_spec(run_dir / "spec.yaml")  # the saved spec reproduces the run, from anywhere:
    assert saved.run.storage_path == str(run_dir.parent)  # its paths anchored where the run started
    assert (Path(saved.model.path) / "config.json").is_file() and Path(saved.model.path).is_absolute()
    assert saved.model_copy(update={"model": spec.model, "run": spec.run}) == spec
    # progress reached the user while it ran
    assert any(line.startswith("train: step") for line in lines)
    assert any(f"step {STEPS}/{STEPS}" in line for line in lines)


def test_final_model_loads_with_plain_transformers_and_peft(runs: dict[int, Any], tiny_llama: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, summary, _ = runs[2]
    model_dir = Path(summary.model_dir)
    assert (model_dir / "adapter_model.safetensors").is_file() and (model_dir / "adapter_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template  # the template the data was rendered with travels with the model
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), model_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        base_logits, tuned_logits = base(**ids).logits, tuned(**ids).logits
    assert tuned_logits.shape == base_logits.shape
    assert not torch.allclose(base_logits, tuned_logits), "the adapter changed nothing"


def test_one_and_two_workers_give_the_same_loss_curve(runs: dict[int, Any]) -> None:
    one, two = (losses(Path(runs[w][1].checkpoint)) for w in (1, 2))
    assert len(one) == len(two) == STEPS
    for step, (a, b) in enumerate(zip(one, two), start=1):
        assert abs(a - b) <= LOSS_TOLERANCE * abs(a), f"step {step}: 1 worker {a}, 2 workers {b}"
    assert one[-1] < one[0], "the loss did not fall"


@pytest.mark.parametrize("workers, eval_every", [(1, 1), (2, 2)])
def test_checkpoints_kept_by_count_and_metric(
    ray_cluster: Any, tiny_llama: Path, chat_data: dict[str, Path], tmp_path: Path, workers: int, eval_every: int
) -> None:
    """run.checkpoints_to_keep=2 ranked by eval_loss, with checkpoint_mode=max here so that the
    best are the earliest checkpoints while the loss falls, not the latest: what stays in storage
    is the two best by the metric, plus the latest (Ray Train keeps it to resume from). A
    checkpoint without an evaluation of its own (eval_every 2) ranks below every evaluated one,
    not by the loss of an older checkpoint."""
    from rayft.train.driver import train

    steps = 5
    spec = load_spec(
        data=spec_dict(
            tiny_llama,
            chat_data,
            tmp_path,
            scaling={"num_workers": workers},
            run={"name": "retention", "checkpoints_to_keep": 2, "checkpoint_mode": "max"},
            train={"max_steps": steps, "save_every": 1, "eval_every": eval_every, "learning_rate": 1e-2},
        )
    )
    summary = train(spec, log=lambda _: None)
    state = json.loads((Path(summary.checkpoint) / "checkpoint" / "trainer_state.json").read_text())
    eval_loss = {entry["step"]: entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry}
    # every eval_every steps, and the final weights
    assert sorted(eval_loss) == sorted({*range(eval_every, steps + 1, eval_every), steps})
    best = sorted(eval_loss, key=lambda step: eval_loss[step], reverse=True)[: spec.run.checkpoints_to_keep]
    expected = {f"checkpoint_{step:06d}" for step in [*best, steps]}
    kept = {p.name for p in Path(summary.run_dir).glob("checkpoint_0*")}
    assert kept == expected, eval_loss
    assert kept != {f"checkpoint_{step:06d}" for step in (steps - 1, steps)}, "kept by count, not by the metric"


def test_too_many_workers_is_a_clear_error_not_a_hang(
    ray_cluster: Any, tiny_llama: Path, chat_data: dict[str, Path], tmp_path: Path
) -> None:
    from rayft.train.driver import train

    spec = load_spec(
        data=spec_dict(
            tiny_llama,
            chat_data,
            tmp_path,
            scaling={"num_workers": 4, "cpus_per_worker": 2},
            train={"global_batch_size": 16},
        )
    )
    with pytest.raises(ClusterError) as error:
        train(spec, log=lambda _: None)
    message = str(error.value)
    assert "6 more CPU" in message and "scaling.num_workers=4" in message and "cluster has 2 CPU" in message


def test_one_wandb_run_per_job_with_metrics_config_and_no_secret(
    runs: dict[int, Any], tiny_llama: Path, ray_cluster: Any
) -> None:
    from wandb_records import find_runs, read_run

    spec, summary, lines = runs[2]
    run_dir = Path(summary.run_dir)
    files = [p for p in find_runs(run_dir / "wandb") if "latest-run" not in p.parts]
    assert len(files) == 1, "one W&B run per training job, not one per worker"
    run = read_run(files[0])
    assert run["name"] == spec.run_name and run["exit_code"] == 0
    assert run["config"]["model"]["path"] == str(tiny_llama) and run["config"]["train"]["max_steps"] == STEPS
    steps_with_loss = [row["_step"] for row in run["history"] if "train/loss" in row]
    assert steps_with_loss == list(range(1, STEPS + 1))
    assert all(
        "train/learning_rate" in row and "train/grad_norm" in row and "train/tokens_per_second" in row
        for row in run["history"]
        if "train/loss" in row
    )
    assert any("eval/loss" in row for row in run["history"])
    assert run["summary"]["final/steps"] == STEPS and run["summary"]["final/eval_loss"] == pytest.approx(
        summary.eval_loss
    )
    assert summary.wandb and f"wandb: {summary.wandb}" in lines  # where it was tracked, printed as it started
    # nowhere: the run's files, W&B's, and every log of the cluster's processes
    assert assert_secret_nowhere(SECRET, run_dir, *ray_cluster.logs) > 10


def test_the_controller_sets_up_the_process_group_and_never_imports_torch(ray_cluster: Any, tmp_path: Path) -> None:
    """rayft's torch backend (rayft.train.in_controller) runs in Ray Train's controller process and
    sets up the workers' gloo group from there; every call that needs torch runs on the workers.
    Ray's own backend imported torch in the controller (about 3 CPU-s and 180 MB) while the
    workers imported theirs, on the same cores."""
    import threading
    import time

    import psutil
    from ray.train import RunConfig, ScalingConfig

    from rayft.train.controller import RayftTorchTrainer

    out = str(tmp_path)

    def loop() -> None:  # on each worker; holds the group until the test has looked at the processes
        import os
        import time

        import torch
        import torch.distributed as dist

        total = torch.tensor([dist.get_rank() + 1.0])
        dist.all_reduce(total)  # over the group the controller set up
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        seen = {"rank": dist.get_rank(), "size": dist.get_world_size(), "sum": total.item()}
        Path(out, f"rank{dist.get_rank()}.json").write_text(
            json.dumps({**seen, **{n: os.environ.get(n) for n in names}})
        )
        deadline = time.time() + 300
        while not Path(out, "release").exists() and time.time() < deadline:
            time.sleep(0.2)

    started = time.time()
    trainer = RayftTorchTrainer(
        loop,
        scaling_config=ScalingConfig(num_workers=2),
        unused_packages=("wandb", "bitsandbytes"),
        run_config=RunConfig(name="controller-without-torch", storage_path=str(tmp_path / "storage")),
    )
    fit = threading.Thread(target=trainer.fit, daemon=True)
    fit.start()

    def ray_processes(title: str) -> list[psutil.Process]:  # this test's, by the title Ray gives them
        return [
            process
            for process in psutil.process_iter(["cmdline", "create_time"])
            if title in " ".join(process.info["cmdline"] or []) and process.info["create_time"] >= started - 1
        ]

    def has_torch(process: psutil.Process) -> bool:
        return "libtorch_cpu" in Path(f"/proc/{process.pid}/maps").read_text()

    try:
        wait_for(
            lambda: all(Path(out, f"rank{r}.json").exists() for r in (0, 1)), what="both ranks' reports", timeout=300
        )
        controllers, workers = ray_processes("ray::TrainController"), ray_processes("ray::RayTrainWorker")
        assert len(controllers) == 1 and len(workers) == 2, (controllers, workers)
        assert all(has_torch(worker) for worker in workers)  # torch shows in a process's maps once imported
        assert not has_torch(controllers[0])
    finally:
        Path(out, "release").touch()
        fit.join(timeout=300)
    assert not fit.is_alive()
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, seen in enumerate(ranks):
        assert seen["size"] == 2 and seen["sum"] == 3.0 and seen["rank"] == rank
        assert seen["RANK"] == str(rank) and seen["WORLD_SIZE"] == "2" and seen["LOCAL_RANK"] == str(rank)
    assert ranks[0]["MASTER_ADDR"] == ranks[1]["MASTER_ADDR"] and ranks[0]["MASTER_PORT"] == ranks[1]["MASTER_PORT"]


def test_an_elastic_restart_leaves_out_a_lost_or_drained_node(ray_cluster: Any) -> None:
    """After a failed attempt Ray's elastic policy sizes the new group by the nodes Ray lists as
    alive. A lost node stays listed for a while after its workers became unreachable, a drained
    one until its deadline, and a group sized for them waited 60 s for a placement group that
    could not be placed (test_multinode times the whole recovery). rayft's policy leaves such a
    node out: the node of an unreachable worker (found in the GCS by the worker's actor id), or
    of a drain notice. A worker that died leaves its node in."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2._internal.execution.controller.state import RestartingState, RunningState
    from ray.train.v2.api.config import ScalingConfig
    from ray.train.v2.api.exceptions import PreemptionError, WorkerGroupError
    from ray.train.v2.api.preemption import PreemptionInfo

    from rayft.train.in_controller import ElasticWithoutLostNodes

    @ray.remote(num_cpus=0)
    class Worker:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    worker = Worker.remote()
    here = ray.get(worker.node.remote())
    elsewhere = "ab" * 28
    free = {here: {"CPU": 1.0}, elsewhere: {"CPU": 1.0}}

    def workers_after(error: Exception) -> int:
        policy = ElasticWithoutLostNodes(ScalingConfig(num_workers=(1, 2)))
        policy.after_controller_state_update(RunningState(), RestartingState(training_failed_error=error))
        return policy._count_possible_workers(free)

    def failed(failure: Exception) -> WorkerGroupError:
        return WorkerGroupError("rank 1", {1: WorkerHealthCheckFailedError("health check", failure=failure)})

    assert workers_after(failed(ActorUnavailableError("RpcError: failed to connect", worker._actor_id.binary()))) == 1
    assert workers_after(failed(ActorDiedError())) == 2
    notice = PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={elsewhere: [1]})
    assert workers_after(PreemptionError(notice)) == 1
    assert workers_after(failed(ActorUnavailableError("RpcError", None))) == 2  # no actor id: Ray's count
    ray.kill(worker)
