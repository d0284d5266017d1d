"""Time from a failure to the next training step, and what each failure loses, on a two-node
Ray cluster started here with `ray start` (a head and a second node, one CPU each).

    python bench/recovery.py [--step-seconds 1.5]

Three failures, each in its own `rayft train` run, as a user's job meets them:
- a training worker process SIGKILLed (the node stays): the fixed 2-worker group restarts from
  the last checkpoint;
- a node lost (its raylet and every process on it SIGKILLed): the elastic run (1-2 workers)
  goes on with 1 worker, then grows back to 2 when the node is started again;
- a drain notice (`ray drain-node`, a spot reclaim with a 10 s deadline): the workers write a
  checkpoint within the notice and the run resumes on the node that is left.

Times are read from the command's own output as it arrives (its progress prints what changed,
at most every 2 s, so each time is good to about 2 s): from the failure to the line that says
so, to the workers resuming, to the first step trained after it. Lost work is the steps trained
again: the last step printed before the failure minus the step the run resumed from. Ray's
default node health checks are used (a lost node is declared dead after about 30 s on this
version). Recorded in bench/results/recovery.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RAYFT, REPO, WORK, cli_env, llama_from_config, record  # noqa: E402

BIN = Path(sys.executable).parent
STEP = re.compile(r"train: step (\d+)/")
RESUMED = re.compile(r"train: step (\d+)/.*\(resumed from step (\d+) on (\d+) worker")
PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
    "--dashboard-agent-grpc-port",
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kill_tree(process: psutil.Process) -> None:
    family = [process, *process.children(recursive=True)]
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(family, timeout=15)


class TwoNodes:
    """A head (the driver's node) and a second node, both `ray start`ed with 1 CPU."""

    def __init__(self) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.second: subprocess.Popen | None = None
        self.second_port = 0
        # Ray 2.60 clusters use token authentication: this cluster gets a token of its own, which
        # every process that talks to it (nodes, the listing, drain-node, rayft) is given.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self._ray("start", "--head", f"--port={self.port}", "--include-dashboard=false")
        self.start_second()

    def _ray(self, *args: str) -> None:
        ports = [f"{flag}={free_port()}" for flag in PORT_FLAGS]
        common = ["--num-cpus=1", f"--temp-dir={self.temp}", "--disable-usage-stats", *ports]
        subprocess.run([str(BIN / "ray"), *args, *common], check=True, capture_output=True, timeout=180, env=self.env)

    def start_second(self) -> None:
        self.second_port = free_port()
        ports = [f"{flag}={free_port()}" for flag in PORT_FLAGS if flag != "--node-manager-port"]
        self.second = subprocess.Popen(
            [str(BIN / "ray"), "start", f"--address={self.address}", "--num-cpus=1", f"--temp-dir={self.temp}"]
            + ["--disable-usage-stats", "--block", f"--node-manager-port={self.second_port}", *ports],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self.env,
        )
        deadline = time.time() + 120
        while self.second_node_id() is None:
            if time.time() > deadline:
                raise SystemExit("the second node did not join in 120 s")
            time.sleep(1)

    def second_node_id(self) -> str | None:
        script = (
            "import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False);"
            "print(json.dumps([[n['NodeID'], n['NodeManagerPort']] for n in ray.nodes() if n['Alive']]))"
        )
        listed = subprocess.run(
            [sys.executable, "-c", script, self.address], capture_output=True, text=True, env=self.env
        )
        alive = json.loads(listed.stdout or "[]")
        return next((node for node, port in alive if port == self.second_port), None)

    def second_raylet(self) -> psutil.Process:
        assert self.second is not None
        block = psutil.Process(self.second.pid)
        return next(p for p in block.children(recursive=True) if "raylet" in p.name())

    def kill_a_training_worker(self) -> None:
        """The RayTrainWorker process on the second node (SIGKILL; the node stays up)."""
        workers = [p for p in self.second_raylet().children() if "RayTrainWorker" in " ".join(p.cmdline())]
        if not workers:
            raise SystemExit("no training worker found on the second node")
        workers[0].kill()

    def lose_second(self) -> None:
        assert self.second is not None
        kill_tree(psutil.Process(self.second.pid))
        self.second = None

    def drain_second(self, deadline_s: int) -> None:
        subprocess.run(
            [str(BIN / "ray"), "drain-node", f"--address={self.address}", f"--node-id={self.second_node_id()}"]
            + ["--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim"]
            + [f"--deadline-remaining-seconds={deadline_s}"],
            check=True,
            capture_output=True,
            timeout=120,
            env=self.env,
        )

    def stop(self) -> None:
        if self.second is not None:
            self.lose_second()
        roots = [
            p for p in psutil.process_iter(["cmdline"]) if any(str(self.temp) in a for a in p.info["cmdline"] or [])
        ]
        for root in roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                kill_tree(root)
        shutil.rmtree(self.temp, ignore_errors=True)


class Run:
    """A `rayft train` command whose output lines are kept with the time each arrived."""

    def __init__(self, spec: Path, cluster: TwoNodes, step_seconds: float):
        env = {**cluster.env, **cli_env(RAYFT_TEST_STEP_SECONDS=str(step_seconds)), "RAY_ADDRESS": cluster.address}
        self.lines: list[tuple[float, str]] = []
        self.process = subprocess.Popen(
            [RAYFT, "train", str(spec), "--no-compare", "--fresh"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.time(), line.rstrip()))

    def last_step(self) -> int:
        return max((int(m.group(1)) for _, line in self.lines if (m := STEP.search(line))), default=0)

    def after(self, moment: float, done: Any, what: str, timeout: float = 600) -> tuple[float, str]:
        """The first line printed at or after `moment` for which `done(line)`, and its time."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for when, line in list(self.lines):
                if when >= moment and done(line):
                    return when, line
            if self.process.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.2)
        raise SystemExit(f"waited for {what}; the run printed:\n" + "\n".join(line for _, line in self.lines[-40:]))

    def finish(self) -> None:
        code = self.process.wait(timeout=900)
        self.reader.join(timeout=10)
        if code != 0:
            raise SystemExit(f"rayft train exited {code}:\n" + "\n".join(line for _, line in self.lines[-40:]))


def job(directory: Path, model: Path, data: Path, name: str, workers: Any) -> Path:
    spec = directory / f"{name}.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(model)},
                "method": {"kind": "full"},
                "data": {"train": str(data / "train.jsonl"), "template": "chatml"},
                "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 30, "save_every": 4},
                "scaling": {"num_workers": workers, "cpus_per_worker": 1, "resize_check_s": 5},
                "run": {"name": name, "storage_path": str(directory / "runs"), "checkpoint_metric": None},
                "eval": {"before_after": False},
            }
        )
    )
    return spec


def failure(run: Run, at_step: int, act: Any) -> dict[str, Any]:
    """Wait until `at_step` was trained, act, and time what follows."""
    run.after(0, lambda line: (m := STEP.search(line)) is not None and int(m.group(1)) >= at_step, f"step {at_step}")
    before = run.last_step()
    failed = time.time()
    act()
    noticed, _ = run.after(failed, lambda line: "worker failure" in line or "is being drained" in line, "the notice")
    stepped, line = run.after(failed, lambda line: RESUMED.search(line) is not None, "a step after the resume")
    match = RESUMED.search(line)
    assert match is not None
    resumed_from = int(match.group(2))
    return {
        "last_step_before": before,
        "resumed_from_step": resumed_from,
        "steps_trained_again": max(0, before - resumed_from),
        "seconds_to_notice": round(noticed - failed, 1),
        "seconds_to_next_step": round(stepped - failed, 1),
        "workers_after": int(match.group(3)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step-seconds", type=float, default=1.5, help="sleep after each step (a slower job)")
    args = parser.parse_args()
    work = WORK / "recovery"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = llama_from_config(work / "model", hidden=256, layers=4)
    data = work / "data"
    subprocess.run([sys.executable, "-m", "rayft.data.quickstart", str(data)], check=True, capture_output=True)
    cluster = TwoNodes()
    results: dict[str, Any] = {"step_seconds_added": args.step_seconds}
    try:
        run = Run(job(work, model, data, "worker-killed", 2), cluster, args.step_seconds)
        results["worker process killed"] = failure(run, 6, cluster.kill_a_training_worker)
        run.finish()

        run = Run(job(work, model, data, "node-lost", [1, 2]), cluster, args.step_seconds)
        results["node lost"] = lost = failure(run, 6, cluster.lose_second)
        rejoined = time.time()
        cluster.start_second()
        grown, _ = run.after(
            rejoined, lambda line: bool(re.search(r"resumed from step \d+ on 2 worker", line)), "2 workers"
        )
        lost["seconds_from_node_start_to_2_workers"] = round(grown - rejoined, 1)
        run.finish()

        run = Run(job(work, model, data, "drained", [1, 2]), cluster, args.step_seconds)
        notice_s = 10

        def drain_then_go() -> None:
            cluster.drain_second(notice_s)
            threading.Timer(notice_s, cluster.lose_second).start()  # the cloud takes it at the deadline

        results["drain notice (10 s)"] = failure(run, 6, drain_then_go)
        run.finish()
    finally:
        cluster.stop()
    rows = [
        f"| {name} | {r['seconds_to_notice']} | {r['seconds_to_next_step']} | {r['workers_after']} | "
        f"{r['last_step_before']} -> {r['resumed_from_step']} ({r['steps_trained_again']} trained again) |"
        for name, r in results.items()
        if isinstance(r, dict)
    ]
    text = (
        "# From a failure to the next training step\n\n"
        "Two nodes on this machine (`ray start`, 1 CPU each), a full fine-tune of a 4-layer Llama "
        f"(hidden 256) on the quickstart data, global batch 8, a checkpoint every 4 steps, {args.step_seconds} s "
        "added to each step. Seconds from the failure; good to about 2 s (the progress line's cadence).\n\n"
        "| failure | noticed (s) | next step (s) | workers after | last step -> resumed from |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"The lost node, started again, brought the run back to 2 workers "
        f"{results['node lost']['seconds_from_node_start_to_2_workers']} s after its `ray start`.\n"
    )
    print(text)
    print(f"recorded {record('recovery', results, text)}")


if __name__ == "__main__":
    main()
