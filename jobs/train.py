#!/usr/bin/env python
"""Entrypoint for `ray job submit`: the same `rayft train` a user runs locally.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train.py configs/quickstart.yaml

Inside a job RAY_ADDRESS is set, so rayft connects to the cluster instead of starting Ray.
The repository's `platform/` is put on the path, so the cluster needs no rayft install: only
the stack in pyproject.toml (the Ray image plus `pip install -e .` or a runtime_env).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from rayft.cli import app  # noqa: E402
from rayft.launch.submit import adopt_job_secrets  # noqa: E402

if __name__ == "__main__":
    adopt_job_secrets()  # what `rayft submit` passed: never in the job's recorded runtime env
    app(["train", *sys.argv[1:]], prog_name="rayft")
