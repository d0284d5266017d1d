"""Where the start-up of `rayft train` goes: the quickstart, from the command to its first
training step, on an embedded local Ray, phase by phase.

    python bench/startup.py [--runs 2] [--baseline REF]

Each phase ends when the command prints the line that says it is done (read as it arrives):
Python and rayft imported, Ray started, the run planned (model, data, precision), the workers
started, the model loaded, the first step. The first run may convert the model and prepare the
data; later runs reuse both, as every rerun, restart and sweep trial does. With --baseline, the
same runs of the code at a git ref (a worktree of it, first on PYTHONPATH) alternate with this
tree's, so that before and after are measured in one sitting. Recorded in
bench/results/startup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RAYFT, REPO, WORK, baseline_source, cli_env, record  # noqa: E402

# (phase, the start of the line that ends it)
PHASES = [
    ("ray.init (after Python and rayft's imports)", "ray: "),
    ("planning: preflight, model, data, precision", "train: precision"),
    ("worker group: Ray Train controller and workers", "train: loading model"),
    ("workers: imports, model, trainer", "train: step"),
]


def timed_run(spec: Path, steps: int, source: Path | None = None) -> dict[str, float]:
    """`source`: a source root (platform/) to run instead of this tree's."""
    started = time.time()
    process = subprocess.Popen(
        [RAYFT, "train", str(spec), "--no-compare", "--fresh", f"train.max_steps={steps}"],
        env=cli_env(**({"PYTHONPATH": str(source)} if source else {})),
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
                if phase == PHASES[-1][0]:
                    seen["cpu"] = tree_cpu_seconds(process.pid)
    process.wait()
    if process.returncode != 0:
        raise SystemExit("".join(lines[-40:]))
    summary = json.loads((REPO / "runs" / "startup-bench" / "summary.json").read_text())
    seen["total"] = time.time() - started
    seen["summary: startup_seconds"] = summary["startup_seconds"]
    return seen


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by `root` and every process below it, alive:
    the embedded Ray's processes are the command's descendants. Steadier than wall time on a
    machine whose speed drifts."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, cpu = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    below, grown = {root}, True
    while grown:  # down the tree, one generation a pass
        grown = False
        for pid, parent in parents.items():
            if parent in below and pid not in below:
                below.add(pid)
                grown = True
    return sum(cpu[pid] for pid in below)


def table(columns: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| phase | " + " | ".join(f"{name} (s)" for name in columns) + " |", "|---|" + "---|" * len(columns)]
    previous = dict.fromkeys(columns, 0.0)
    for phase, _ in PHASES:
        cells = []
        for name, run in columns.items():
            cells.append(f"{run.get(phase, float('nan')) - previous[name]:.1f}")
            previous[name] = run.get(phase, previous[name])
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines.append(
        "| **command to first step** | " + " | ".join(f"**{r[PHASES[-1][0]]:.1f}**" for r in columns.values()) + " |"
    )
    lines.append("| whole command | " + " | ".join(f"{r['total']:.1f}" for r in columns.values()) + " |")
    lines.append(
        "| CPU seconds to the first step, all processes | "
        + " | ".join(f"{r.get('cpu', float('nan')):.1f}" for r in columns.values())
        + " |"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--baseline", help="a git ref to measure against, alternating with this tree")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    spec = WORK / "startup-bench.yaml"
    text = (REPO / "configs" / "quickstart.yaml").read_text()
    spec.write_text(text + "\n# bench/startup.py: the quickstart under its own run name\n")
    sources = {"": None}
    if args.baseline:
        sources = {f"{args.baseline} ": baseline_source(args.baseline), "this tree ": None}
    columns: dict[str, dict[str, float]] = {}
    for i in range(args.runs):  # run.name: the file's, startup-bench
        for label, source in sources.items():
            columns[f"{label}run {i + 1}"] = timed_run(spec, args.steps, source)
    text = (
        "# Start-up of `rayft train configs/quickstart.yaml`, phase by phase\n\n"
        f"Embedded local Ray, {args.steps} steps, `--no-compare`. Run 1 may convert the model and prepare the "
        "data; later runs reuse both."
        + (f" Runs of {args.baseline} and of this tree alternate." if args.baseline else "")
        + "\n\n"
        + "\n".join(table(columns))
    )
    print(text)
    print(f"recorded {record('startup', {'runs': columns, 'baseline': args.baseline}, text)}")


if __name__ == "__main__":
    main()
