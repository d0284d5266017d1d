"""Several nodes that come and go, on this machine: a head and two worker nodes started with
`ray start`, each worker node in a mount namespace of its own with a private tmpfs over its
"local disk" and its ~/.cache/rayft, as a second machine would have. Runs keep their storage on
the local S3-compatible server.

- a path only this node sees is refused before anything is prepared, naming the nodes;
- a node lost mid-run (its processes SIGKILLed) and started again: the run goes on with one
  worker, grows back to two, and every sample is trained exactly once per epoch, with the loss
  of every step that of an uninterrupted fixed-size run;
- a drained node (`ray drain-node`, as a spot reclaim notice): the workers checkpoint within the
  notice, and the run resumes from that step on the node that is left.

Elastic sizes keep the numerics: the global batch is the same rows in the same order at any
worker count, so 1 and 2 workers differ only in the order of float32 sums (about 1e-6
relative); the loss tolerance, 1e-3 relative per step, is far above that and far below what a
repeated, skipped or mis-weighted batch does (percent-level).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import (
    BIN,
    BUCKET,
    free_port,
    node_ports,
    run_cli,
    spec_dict,
    stop_cluster,
    wait_for,
    write_spec,
)

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 8  # 64 samples / global batch 8
STEP = re.compile(r"train: step (\d+)/")
PRIVATE_CACHE = Path.home() / ".cache" / "rayft"


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    family = [root, *root.children(recursive=True)]
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()  # SIGKILL: a node that vanishes, not one that shuts down
    psutil.wait_procs(family, timeout=15)


@dataclass
class MultiNode:
    address: str
    temp_dir: Path
    private: Path  # each worker node mounts a private empty tmpfs here
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # node name -> its node manager port

    def start_node(self, name: str) -> None:
        ports = node_ports()
        ray_start = " ".join(
            [
                str(BIN / "ray"),
                "start",
                f"--address={self.address}",
                "--num-cpus=1",
                f"--temp-dir={self.temp_dir}",
                "--disable-usage-stats",
                "--block",
                *[f"{flag}={port}" for flag, port in ports.items()],
            ]
        )
        mounts = f"mount -t tmpfs tmpfs {self.private} && mount -t tmpfs tmpfs {PRIVATE_CACHE}"
        self.nodes[name] = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mounts} && exec {ray_start}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        )
        self.ports[name] = ports["--node-manager-port"]
        wait_for(lambda: self.node_id(name) is not None, what=f"worker node {name} to join", timeout=120)

    def stop_node(self, name: str) -> None:
        _kill_tree(self.nodes.pop(name).pid)

    def alive(self) -> list[dict[str, Any]]:
        listed = subprocess.run(
            [str(BIN / "python"), "-c", NODES_SCRIPT, self.address], capture_output=True, text=True, timeout=120
        )
        return json.loads(listed.stdout or "[]")

    def node_id(self, name: str) -> str | None:
        port = self.ports.get(name)
        return next((n["NodeID"] for n in self.alive() if n["NodeManagerPort"] == port), None)

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "RAY_ADDRESS": self.address, **extra}


# The test process may be connected to another cluster (the suite's own): ask in a subprocess.
NODES_SCRIPT = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps([{"NodeID": n["NodeID"], "NodeManagerPort": n["NodeManagerPort"]} for n in ray.nodes() if n["Alive"]]))
"""


@pytest.fixture(scope="module")
def multinode() -> Any:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("the multi-node fixture gives each node a private disk with `unshare -m`, which needs root")
    temp = Path(tempfile.mkdtemp(prefix="mn", dir="/tmp"))  # short: Ray's socket paths have a length limit
    private = temp / "local-disk"
    private.mkdir()
    PRIVATE_CACHE.mkdir(parents=True, exist_ok=True)
    port = free_port()
    head = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=0",  # the driver's node: the run's helpers live here, its workers on the others
        "--include-dashboard=false",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        *[f"{flag}={port}" for flag, port in node_ports().items()],
    ]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(head, check=True, capture_output=True, text=True, timeout=180, env=env)
    cluster = MultiNode(f"127.0.0.1:{port}", temp, private)
    try:
        cluster.start_node("a")
        cluster.start_node("b")
        yield cluster
    finally:
        for name in list(cluster.nodes):
            cluster.stop_node(name)
        stop_cluster(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


class Output:
    """A `rayft train` subprocess whose output is collected as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [str(BIN / "rayft"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, words: str, timeout: float, since: int = 0) -> None:
        """Until `words` are in the output, from line `since` on."""
        self._wait(lambda: words in "".join(self.lines[since:]), f"{words!r} in the run's output", timeout)

    def wait_for_step(self, step: int, timeout: float) -> None:
        """Until the progress shows `step` or a later one (it prints what changed every 2 s)."""
        self._wait(lambda: max(map(int, STEP.findall(self.text)), default=0) >= step, f"step {step}", timeout)

    def _wait(self, done: Any, what: str, timeout: float) -> None:
        try:
            wait_for(done, what=what, timeout=timeout, every=0.5)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; the run printed:\n{self.text[-4000:]}") from None

    def finish(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            self.process.kill()
        self.reader.join(timeout=10)
        return code


def job_spec(tmp_path: Path, tiny_llama: Path, chat_data: dict[str, Path], name: str, **sections: Any) -> Path:
    from rayft.spec.yamlfile import deep_merge

    base = {
        "train": {"max_steps": None, "epochs": 3, "save_every": 2},
        "run": {
            "name": name,
            "storage_path": f"s3://{BUCKET}/multinode",
            "checkpoint_metric": None,
            "log_samples": True,
            "max_failures": 3,
        },
        "eval": {"before_after": False},
    }
    spec = spec_dict(tiny_llama, chat_data, tmp_path / "unused", **deep_merge(base, sections))
    return write_spec(tmp_path / f"{name}.yaml", spec)


def read(path: str) -> str:
    from rayft import storage

    return storage.read_text(path) or ""


def losses(run: str) -> dict[int, float]:
    lines = [json.loads(line) for line in read(f"s3://{BUCKET}/multinode/{run}/metrics.jsonl").splitlines() if line]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def samples_by_step(run: str) -> dict[int, list[int]]:
    """Each step's samples, from the attempt that trained it last: an attempt that resumed from
    step N supersedes what earlier attempts trained after N (work lost with them)."""
    from rayft import storage

    attempts: dict[int, dict[int, list[int]]] = {}
    directory = f"s3://{BUCKET}/multinode/{run}/samples"
    for name in storage.list_files(directory, ".jsonl"):  # rank<R>-from-step<N>.jsonl
        start = int(Path(name).stem.rsplit("from-step", 1)[1])
        steps = attempts.setdefault(start, {})
        for line in read(f"{directory}/{name}").splitlines():
            if line:
                record = json.loads(line)
                steps.setdefault(record["step"], []).extend(record["sample_ids"])
    trained: dict[int, list[int]] = {}
    for start in sorted(attempts):
        for step, ids in attempts[start].items():
            if step > start:
                trained[step] = ids
    return trained


def assert_every_sample_once_per_epoch(run: str, epochs: int) -> None:
    trained = samples_by_step(run)
    assert sorted(trained) == list(range(1, epochs * STEPS_PER_EPOCH + 1))
    every = None
    for epoch in range(epochs):
        steps = range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1)
        ids = [i for step in steps for i in trained[step]]
        assert len(ids) == len(set(ids)) == 64, f"epoch {epoch}: a sample repeated or skipped"
        every = every or set(ids)
        assert set(ids) == every


def test_a_path_one_node_cannot_see_is_refused_before_anything_is_prepared(
    multinode: MultiNode, tiny_llama: Path, chat_data: dict[str, Path], tmp_path: Path
) -> None:
    spec = write_spec(
        tmp_path / "local.yaml",
        spec_dict(
            tiny_llama, chat_data, multinode.private / "runs", run={"name": "local"}, eval={"before_after": False}
        ),
    )
    result = run_cli("train", str(spec), "--no-compare", "--address", multinode.address, env=multinode.env())
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert f"run.storage_path: {multinode.private / 'runs'} is not the same directory on every node" in output
    assert "2 of 2 nodes" in output and "s3://" in output and "NFS" in output, output
    for name in ("a", "b"):
        assert multinode.node_id(name)[:12] in output  # each node that cannot see it, named
    assert "data: preparing" not in output and "Traceback" not in output
    assert not list(multinode.private.iterdir())[1:], "a probe was left behind"


def test_a_node_lost_and_back_mid_run_changes_nothing_but_the_time(
    multinode: MultiNode, s3: dict[str, str], tiny_llama: Path, chat_data: dict[str, Path], tmp_path: Path
) -> None:
    epochs = 3
    fixed = job_spec(tmp_path, tiny_llama, chat_data, "fixed")
    reference = run_cli("train", str(fixed), "--no-compare", "--address", multinode.address, env=multinode.env())
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-2000:]

    elastic = job_spec(tmp_path, tiny_llama, chat_data, "elastic", scaling={"num_workers": [1, 2], "resize_check_s": 5})
    # The hold file stops the run at known steps (rayft.train.callbacks.StepThrottle): at step 5
    # until node b is gone, and at step 12 until it is back (tens of seconds on a busy machine).
    hold = tmp_path / "hold"
    hold.write_text("5")
    run = Output(
        ["train", str(elastic), "--no-compare", "--address", multinode.address],
        multinode.env(RAYFT_TEST_HOLD_FILE=str(hold)),
    )
    try:
        run.wait_for_step(4, timeout=300)
        lost = time.time()
        multinode.stop_node("b")
        run.wait_for("on 1 worker(s)", timeout=300)  # the run goes on without it
        back = time.time() - lost
        hold.write_text("12")
        run.wait_for_step(11, timeout=300)
        held_at = len(run.lines)
        multinode.start_node("b")
        # ... grows back when it returns. The printer shows only the latest state each second, so a
        # quick model load on restart may never show; the resumed attempt's progress line always does.
        run.wait_for("on 2 worker(s))", timeout=300, since=held_at)
        hold.unlink()  # ... and trains on both
        code = run.finish(timeout=600)
    finally:
        hold.unlink(missing_ok=True)
        run.process.kill()
        if "b" not in multinode.nodes:
            multinode.start_node("b")
    assert code == 0, run.text[-4000:]
    summary = json.loads(read(f"s3://{BUCKET}/multinode/elastic/summary.json"))
    assert summary["workers"][0] == 2 and 1 in summary["workers"] and summary["workers"][-1] == 2, summary
    assert summary["steps"] == epochs * STEPS_PER_EPOCH and summary["restarts"] >= 2
    assert "worker failure" in run.text and "restarting from the last checkpoint" in run.text

    assert_every_sample_once_per_epoch("elastic", epochs)
    assert_every_sample_once_per_epoch("fixed", epochs)
    expected, got = losses("fixed"), losses("elastic")
    assert sorted(got) == sorted(expected) == list(range(1, epochs * STEPS_PER_EPOCH + 1))
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-3 * abs(loss), f"step {step}: {got[step]} vs {loss}"
    print(f"node lost -> training on 1 worker: {back:.0f} s; summary's recovery: {summary['recovery_seconds']} s")


def test_a_drained_node_gets_a_checkpoint_in_its_notice_and_no_step_is_lost(
    multinode: MultiNode, s3: dict[str, str], tiny_llama: Path, chat_data: dict[str, Path], tmp_path: Path
) -> None:
    """No periodic checkpoint (save_every 100): the one the run resumes from was written in the
    notice period, at most one step before the node went."""
    epochs = 3
    steps = epochs * STEPS_PER_EPOCH
    spec = job_spec(
        tmp_path,
        tiny_llama,
        chat_data,
        "drained",
        scaling={"num_workers": [1, 2], "resize_check_s": 600},
        train={"max_steps": steps, "epochs": epochs, "save_every": 100},
    )
    command = ["train", str(spec), "--no-compare", "--address", multinode.address]
    run = Output(command, multinode.env(RAYFT_TEST_STEP_SECONDS="1.5"))
    notice = 12
    try:
        run.wait_for_step(4, timeout=300)
        drain = subprocess.run(
            [
                str(BIN / "ray"),
                "drain-node",
                f"--address={multinode.address}",
                f"--node-id={multinode.node_id('b')}",
                "--reason=DRAIN_NODE_REASON_PREEMPTION",
                "--reason-message=spot reclaim",
                f"--deadline-remaining-seconds={notice}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert drain.returncode == 0, drain.stdout + drain.stderr
        run.wait_for("is being drained", timeout=120)
        time.sleep(notice)
        before = max(map(int, STEP.findall(run.text)))
        multinode.stop_node("b")  # the cloud takes the node at the deadline
        code = run.finish(timeout=600)
    finally:
        run.process.kill()
        if "b" not in multinode.nodes:
            multinode.start_node("b")
    assert code == 0, run.text[-4000:]
    summary = json.loads(read(f"s3://{BUCKET}/multinode/drained/summary.json"))
    drained_at = int(re.search(r"is being drained.*from step (\d+)", run.text).group(1))
    # the step printed last before the node went finished; only its checkpoint may have been cut off
    assert summary["resumed_from_step"] >= max(drained_at, before - 1), run.text[-4000:]
    assert summary["steps"] == steps and summary["workers"][-1] == 1 and summary["restarts"] >= 1
    print(
        f"drain notice at step {drained_at}, node gone after step {before}, resumed from step "
        f"{summary['resumed_from_step']}; recovery {summary['recovery_seconds']} s"
    )
    trained = samples_by_step("drained")
    assert sorted(trained) == list(range(1, steps + 1))
    for epoch in range(epochs):
        first = epoch * STEPS_PER_EPOCH + 1
        ids = [i for step in range(first, first + STEPS_PER_EPOCH) for i in trained[step]]
        assert len(ids) == len(set(ids)) == 64, f"epoch {epoch}: a sample repeated or skipped"
