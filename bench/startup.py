"""Where the start-up of `rayft train` goes: the quickstart, from the command to its first
training step, on an embedded local Ray, phase by phase.

    python bench/startup.py [--runs 2]

Each phase ends when the command prints the line that says it is done (read as it arrives):
Python and rayft imported, Ray started, the run planned (model, data, precision), the workers
started, the model loaded, the first step. The first run may convert the model and prepare the
data; later runs reuse both, as every rerun, restart and sweep trial does. Recorded in
bench/results/startup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RAYFT, REPO, WORK, cli_env, record  # noqa: E402

# (phase, the start of the line that ends it)
PHASES = [
    ("ray.init (after Python and rayft's imports)", "ray: "),
    ("planning: preflight, model, data, precision", "train: precision"),
    ("worker group: Ray Train controller and workers", "train: loading model"),
    ("workers: imports, model, trainer", "train: step"),
]


def timed_run(spec: Path, steps: int) -> dict[str, float]:
    started = time.time()
    process = subprocess.Popen(
        [RAYFT, "train", str(spec), "--no-compare", "--fresh", f"train.max_steps={steps}"],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    seen: dict[str, float] = {}
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        for phase, marker in PHASES:
            if phase not in seen and line.startswith(marker):
                seen[phase] = time.time() - started
    process.wait()
    if process.returncode != 0:
        raise SystemExit("".join(lines[-40:]))
    summary = json.loads((REPO / "runs" / "startup-bench" / "summary.json").read_text())
    seen["total"] = time.time() - started
    seen["summary: startup_seconds"] = summary["startup_seconds"]
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    spec = WORK / "startup-bench.yaml"
    text = (REPO / "configs" / "quickstart.yaml").read_text()
    spec.write_text(text + "\n# bench/startup.py: the quickstart under its own run name\n")
    runs = [timed_run(spec, args.steps) for _ in range(args.runs)]  # run.name: the file's, startup-bench
    header = "| phase | " + " | ".join(f"run {i + 1} (s)" for i in range(len(runs))) + " |"
    lines = [header, "|---|" + "---|" * len(runs)]
    previous = [0.0] * len(runs)
    for phase, _ in PHASES:
        cells = []
        for i, run in enumerate(runs):
            cells.append(f"{run.get(phase, float('nan')) - previous[i]:.1f}")
            previous[i] = run.get(phase, previous[i])
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines.append("| **command to first step** | " + " | ".join(f"**{r[PHASES[-1][0]]:.1f}**" for r in runs) + " |")
    lines.append("| whole command | " + " | ".join(f"{r['total']:.1f}" for r in runs) + " |")
    text = (
        "# Start-up of `rayft train configs/quickstart.yaml`, phase by phase\n\n"
        f"Embedded local Ray, {args.steps} steps, `--no-compare`. Run 1 may convert the model and prepare the "
        "data; later runs reuse both.\n\n" + "\n".join(lines)
    )
    print(text)
    print(f"recorded {record('startup', {'runs': runs}, text)}")


if __name__ == "__main__":
    main()
