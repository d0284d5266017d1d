"""Shared fixtures: a real local Ray cluster (`ray start --head` on free ports), tiny real HF
models built from a config with tokenizers trained on the spot, and job specs for them.

Nothing here downloads anything: HF_HUB_OFFLINE and WANDB_MODE=offline are set for the session.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).parent

os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "RAY_AUTH_MODE": "token",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TQDM_DISABLE": "1",
    }
)
os.environ.pop("WANDB_API_KEY", None)
# Ray 2.60 clusters use token authentication. The suite's clusters get a token of their own,
# in the environment that `ray start`, the clients and the CLI subprocesses all inherit: a fresh
# machine has no ~/.ray/auth_token, and a developer's own token stays untouched.
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ------------------------------------------------------------------------- DeepSpeed ops
DEEPSPEED_OPS = ["ShareMemCommBuilder", "CPUAdamBuilder"]  # CPU collectives, CPU Adam (offload)
_deepspeed_build: dict[str, Any] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Compiling DeepSpeed's CPU ops takes 100-110 s of both cores. If a collected test needs them,
    the compile starts now, in its own process at the lowest priority: it takes the cores only
    while the tests before that one leave them idle (they wait on Ray much of the time)."""
    if any("deepspeed_ops" in getattr(item, "fixturenames", ()) for item in session.items):
        _start_deepspeed_build()


def _start_deepspeed_build() -> None:
    if _deepspeed_build:
        return
    log = tempfile.NamedTemporaryFile(prefix="rayft-deepspeed-ops-", suffix=".log", delete=False)  # noqa: SIM115
    code = f"from rayft.train.deepspeed_ops import load_ops; assert load_ops({DEEPSPEED_OPS!r}) == {DEEPSPEED_OPS!r}"
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(19)
    )
    log.close()
    _deepspeed_build.update(started=time.time(), log=Path(log.name), process=process)
    atexit.register(Path(log.name).unlink, missing_ok=True)
    atexit.register(process.kill)  # first (atexit runs last in, first out): no compile outlives the run


@pytest.fixture(scope="session")
def deepspeed_ops() -> float:
    """DeepSpeed's CPU ops, compiled once per suite the way workers do (rayft's build lock; a
    stale torch lock is cleared); workers then load them from the cache. Seconds since the
    compile started."""
    _start_deepspeed_build()  # at collection already, unless the fixture was asked for by name
    process = _deepspeed_build["process"]
    process.wait(timeout=1800)
    assert process.returncode == 0, _deepspeed_build["log"].read_text()[-3000:]
    return time.time() - _deepspeed_build["started"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


NODE_PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
    "--dashboard-agent-grpc-port",
)


def node_ports() -> dict[str, int]:
    """A free port for every per-node listener of `ray start` (flag -> port), so that several
    nodes (and other clusters) share this machine."""
    return {flag: free_port() for flag in NODE_PORT_FLAGS}


@dataclass
class Cluster:
    address: str  # GCS address, for ray.init and RAY_ADDRESS
    dashboard: str  # http address of the job server
    temp_dir: Path  # Ray's session files: logs of every process, runtime environments

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "RAY_ADDRESS": self.address, **extra}

    @property
    def logs(self) -> list[Path]:
        """The log directories of the cluster's sessions: every Ray process's output, the
        runtime-env agent's records, the job supervisor's."""
        return sorted(self.temp_dir.glob("session_*/logs"))


@pytest.fixture(scope="session")
def ray_cluster() -> Cluster:
    """A real Ray cluster on this machine, started with `ray start --head` and stopped after."""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard = free_port(), free_port()
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=true",
        f"--dashboard-port={dashboard}",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        *[f"{flag}={port}" for flag, port in node_ports().items()],
    ]
    # The venv's bin first on PATH: job entrypoints (`python jobs/train.py`) run in the cluster's
    # environment, which is inherited from `ray start`.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=180, env=env)
    cluster = Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", Path(temp))
    from rayft.launch.cluster import connect

    connect(cluster.address)
    yield cluster
    import ray

    ray.shutdown()
    stop_cluster(temp)
    shutil.rmtree(temp, ignore_errors=True)


def stop_cluster(temp_dir: str) -> int:
    """Stop the cluster whose daemons carry `temp_dir` on their command line, with their
    children (workers, agents). Unlike `ray stop`, which ends every Ray process on the machine,
    this leaves other clusters (a parallel test run, a developer's own) alone. In `ray stop`'s
    order: raylets, then the rest, then the GCS, each group given 15 s before SIGKILL. Signalled
    all at once, the GCS and the autoscaler monitor outlived any grace period (15 s each time)."""
    import psutil

    roots = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in part for part in (p.info["cmdline"] or []))]
    family = set(roots)
    for process in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            family.update(process.children(recursive=True))

    def stage(process: psutil.Process) -> int:
        with contextlib.suppress(psutil.Error, IndexError):
            program = Path(process.cmdline()[0]).name
            return {"raylet": 0, "gcs_server": 2}.get(program, 1)
        return 1

    stages: dict[int, list[psutil.Process]] = {}
    for process in family:
        stages.setdefault(stage(process), []).append(process)
    for _, group in sorted(stages.items()):
        for process in group:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        _, alive = psutil.wait_procs(group, timeout=15)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    return len(family)


# ------------------------------------------------------------------------ object storage
BUCKET = "rayft-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A local S3-compatible server (moto's standalone server on 127.0.0.1) with bucket BUCKET;
    its endpoint and credentials in the environment, as on a real cluster."""
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        def bucket_created() -> bool:
            try:
                boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
                return True
            except Exception:
                return False

        wait_for(bucket_created, what=f"moto_server on port {port} to create bucket {BUCKET}", timeout=60)
        yield env
    finally:
        server.terminate()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------- models
def build_tokenizer(texts: list[str], vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer trained on `texts` in a second, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def build_llama(directory: Path, tokenizer: Any, seed: int = 0, **config: Any) -> Path:
    """A real LlamaForCausalLM (random weights) saved with its tokenizer, as from the hub."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(config)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def sample_records() -> tuple[list[dict], list[dict]]:
    from rayft.data import quickstart as samples

    return samples.generate(seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(sample_records: tuple[list[dict], list[dict]]) -> Any:
    train, evals = sample_records
    texts = [m["content"] for r in train + evals for m in r["messages"]]
    return build_tokenizer(texts * 3)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    return build_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def stories260k() -> Path:
    path = SHARED / "models" / "stories260K"
    if not (path / "config.json").is_file():
        pytest.skip("../shared/models/stories260K is not available")
    return path


# ----------------------------------------------------------------------------------- data
def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture(scope="session")
def chat_data(
    tmp_path_factory: pytest.TempPathFactory, sample_records: tuple[list[dict], list[dict]]
) -> dict[str, Path]:
    """64 training and 16 eval conversations from rayft's sample generator."""
    train, evals = sample_records
    root = tmp_path_factory.mktemp("chat-data")
    return {
        "train": write_jsonl(root / "train.jsonl", train[:64]),
        "eval": write_jsonl(root / "eval.jsonl", evals[:16]),
    }


# Prepared data shared by every test's runs (the cache is keyed by data, tokenizer and template),
# so a test pays for a Ray Data pipeline only when its data is new.
PREPARED_CACHE = Path(tempfile.mkdtemp(prefix="rayft-test-prepared-"))
atexit.register(shutil.rmtree, PREPARED_CACHE, True)


def spec_dict(model: Path, data: dict[str, Path], storage: Path, **sections: Any) -> dict[str, Any]:
    """A small, fast job spec; sections given as keyword arguments are merged in."""
    from rayft.spec.yamlfile import deep_merge

    base = {
        "model": {"path": str(model)},
        # fp32 unless a test says otherwise: `auto` picks bf16 on AMX CPUs, and tests that compare
        # losses across worker counts and methods must not depend on the machine they run on
        "method": {"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "precision": "fp32"},
        "data": {
            "train": str(data["train"]),
            "eval": str(data["eval"]) if "eval" in data else None,
            "max_length": 128,
            "format": "messages",
            "cache_dir": str(PREPARED_CACHE),
        },
        "train": {
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "max_steps": 4,
            "learning_rate": 1e-3,
            "log_every": 1,
            "save_every": 2,
            "warmup": 0,
        },
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "run": {"storage_path": str(storage), "checkpoints_to_keep": 2},
        "eval": {"num_prompts": 4, "max_new_tokens": 8},
    }
    return deep_merge(base, sections)


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: int = 600, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """`rayft ARGS` in a subprocess, as a user runs it."""
    return subprocess.run(
        [str(BIN / "rayft"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or os.environ.copy(),
        cwd=cwd,
    )


def python_json(code: str, *, env: dict[str, str] | None = None, timeout: int = 300) -> Any:
    """Run `code` in a fresh interpreter (nothing this test process imported is there) and
    return its last line of output, read as JSON; a failure shows its stderr."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def secret_forms(secret: str) -> list[bytes]:
    """A secret as it could leak: raw, lowercased (names made for Kubernetes or W&B), base64."""
    import base64

    return [secret.encode(), secret.lower().encode(), base64.b64encode(secret.encode())]


def assert_secret_nowhere(secret: str, *places: Path, texts: tuple[str, ...] = ()) -> int:
    """No form of `secret` in any file under `places` (run directories, W&B files, Ray's session
    logs) or in `texts` (a command's output, a job's record). Returns how many files were read."""
    forms = secret_forms(secret)
    for text in texts:
        assert not any(form in text.encode() for form in forms), f"a secret in: {text[:200]}"
    read = 0
    for place in places:
        for path in [place] if place.is_file() else place.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.suffix not in (".sock",):
                try:
                    content = path.read_bytes()
                except OSError:  # a socket or a file a process is rotating
                    continue
                read += 1
                leaked = [form for form in forms if form in content]
                assert not leaked, f"{path} holds the secret ({leaked[0][:6]!r}...)"
    return read


def wait_for(
    predicate: Any, *, what: str, timeout: float = 60, every: float = 0.5, process: subprocess.Popen | None = None
) -> Any:
    """Poll `predicate` until it is true, for at most `timeout` seconds. Gives up at once if
    `process` (the command whose progress is awaited) has ended. Either way the error says what
    was awaited, for how long, and what the process printed."""
    started = time.time()
    while time.time() - started < timeout:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            output = process.stdout.read()[-3000:] if process.stdout else ""
            raise AssertionError(
                f"gave up waiting for {what}: the process ended (exit code {process.returncode})"
                f" after {time.time() - started:.0f}s\n{output}"
            )
        time.sleep(every)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f}s")
