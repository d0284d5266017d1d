"""The embedded local Ray that a command starts when it is given no cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CONNECT = """
import json, os, sys, psutil, ray
from rayft.launch.cluster import connect
connect(verbose=sys.argv[1] == "verbose", dashboard=sys.argv[2] == "dashboard")

@ray.remote
def square(x):
    print("a worker's line")
    return x * x

squares = ray.get([square.remote(i) for i in range(3)])
started = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
print(json.dumps({"squares": squares, "started": started}), flush=True)
ray.shutdown()
"""


@pytest.mark.parametrize(("verbose", "dashboard"), [(False, False), (True, False), (False, True)])
def test_a_single_run_starts_only_the_head_processes_it_uses(verbose: bool, dashboard: bool) -> None:
    """rayft.launch.local_node: a single run's instance has no API server and no autoscaler
    monitor, and a log monitor only when it shows worker output (--verbose); tasks run as on
    any instance. A sweep's (dashboard) keeps the full set: its placement-group cleaner asks the
    State API."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", CONNECT, "verbose" if verbose else "quiet", "dashboard" if dashboard else "bare"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # forwarded worker output (verbose) may come after the driver's own line
    seen = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"squares"')))
    assert seen["squares"] == [0, 1, 4]
    started = "\n".join(seen["started"])
    assert "gcs_server" in started and "raylet" in started, started
    assert ("dashboard/dashboard.py" in started) == dashboard, started
    assert ("autoscaler/_private/monitor.py" in started) == dashboard, started
    assert ("log_monitor.py" in started) == (verbose or dashboard), started
    if not verbose:
        assert "a worker's line" not in done.stdout + done.stderr  # worker output stays in Ray's log files
