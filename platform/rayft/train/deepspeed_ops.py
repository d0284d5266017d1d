"""Build and load DeepSpeed's JIT-compiled ops safely when many processes share a node.

torch guards each JIT build with a lock *file* (`<build dir>/lock`) that only a clean exit
removes. A worker killed while holding it (a trial stopped by ASHA, a crashed node, Ctrl-C during
the first build) leaves it behind, and every later DeepSpeed run on that node then waits on it
forever, silently. So rayft takes a kernel lock (flock: released when its holder dies, however it
dies) around loading the ops; whoever holds it knows any torch lock file left is stale.

And torch runs whichever `ninja` comes first on PATH. The system's and the one pip installs (for
DeepSpeed) can differ in version, and ninja 1.12 changed how .ninja_log hashes a command: a build
directory that both use looks "changed" to each, and every switch rebuilt the ops (a Ray worker,
whose PATH starts with the environment's bin, after a shell that started with the system's: about
100 s each on 2 cores). The build always runs the ninja beside this Python when there is one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def extensions_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def ops_needed(ds_config: dict[str, Any], *, use_gpu: bool) -> list[str]:
    """The JIT ops a ZeRO run loads: CPU collectives on CPU hosts, CPU Adam when offloading."""
    ops = [] if use_gpu else ["ShareMemCommBuilder"]
    if "offload_optimizer" in (ds_config.get("zero_optimization") or {}):
        ops.append("CPUAdamBuilder")
    return ops


def load_ops(names: Iterable[str]) -> list[str]:
    """Build (first time on this node) and load the named DeepSpeed ops into this process;
    DeepSpeed caches loaded ops per process, so its own later loads do not touch the build lock."""
    from deepspeed.accelerator import get_accelerator

    root = extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    loaded = []
    with open(root / "rayft-build.lock", "a") as guard, _environment_ninja_first():
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            for stale in root.glob("*/*/lock"):
                stale.unlink(missing_ok=True)
            for name in names:
                builder = get_accelerator().create_op_builder(name)
                if builder is not None and builder.is_compatible(verbose=False):
                    builder.load(verbose=False)
                    loaded.append(name)
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
    return loaded


@contextlib.contextmanager
def _environment_ninja_first() -> Iterator[None]:
    """PATH starts with this Python's bin directory while the ops build, if it holds a ninja."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if not os.access(os.path.join(bin_dir, "ninja"), os.X_OK) or path.split(os.pathsep)[0] == bin_dir:
        yield
        return
    os.environ["PATH"] = bin_dir + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path
