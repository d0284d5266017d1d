"""Shared by the benchmarks: where results go, and what machine produced them."""

from __future__ import annotations

import contextlib
import json
import os
import platform as stdlib_platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "work"  # scratch (git-ignored)
REPO = Path(__file__).resolve().parents[1]
RAYFT = str(Path(sys.executable).parent / "rayft")  # the CLI of the environment running the bench


def baseline_source(ref: str) -> Path:
    """platform/ of a worktree of git `ref` (made once, under bench/work/): a bench that runs
    `rayft` with PYTHONPATH set to it measures that commit's code with this environment."""
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True, check=True)
    tree = WORK / f"baseline-{commit.stdout.strip()}"
    if not tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=REPO, check=True)
    return tree / "platform"


def llama_from_config(directory: Path, *, hidden: int, layers: int) -> Path:
    """A Llama built from a config (random weights, seed 0) with stories260K's real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(REPO.parent / "shared" / "models" / "stories260K")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for `rayft` subprocesses: one thread per process (STACK.md), and an
    embedded local Ray rather than whatever cluster RAY_ADDRESS points at."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    gpu = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpu = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    versions = {}
    for package in ("torch", "ray", "transformers", "trl", "peft", "datasets"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "gpu": gpu,
        "python": stdlib_platform.python_version(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def record(name: str, results: dict[str, Any], markdown: str) -> Path:
    """bench/results/NAME.json (figures + machine) and NAME.md (the table a person reads)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": info, **results}, indent=2))
    header = (
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB"
        + (f", GPU {info['gpu']}" if info["gpu"] else ", no GPU")
        + f"; Python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + f"; {info['date']}.\n\n"
    )
    path = RESULTS / f"{name}.md"
    path.write_text(header + markdown.rstrip() + "\n")
    return path
