"""Every shipped spec is valid, and each large-Llama spec fits its GPU profile by rayft plan."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from rayft.model import resolve_source
from rayft.plan import estimate
from rayft.spec import load_spec

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PROFILES = sorted((REPO / "configs" / "profiles").glob("*.yaml"))
# What a preset's header says: the profile it is meant for, and the plan's figures for it.
PROFILE_IN_HEADER = re.compile(r"^#.*rayft (?:plan|train)\s+configs/\S+ -p (configs/profiles/\S+\.yaml)", re.M)
PLAN_NOTE = re.compile(r"^# rayft plan says: fits, ([\d.]+) GiB of (\d+) GiB a worker; ([\d.]+) h an epoch", re.M)
NOTE_TOKENS = 10_000_000
WITH_PROFILE = [p for p in CONFIGS if PROFILE_IN_HEADER.search(p.read_text())]
# What a GPU profile may set in the method section: precision, and the sharding a GPU's memory
# calls for (FSDP2 with the 4-bit storage dtype it needs).
PROFILE_METHOD_KEYS = {"precision", "fsdp", "quantization"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_is_valid_on_cpu(path: Path) -> None:
    spec = load_spec(path)
    assert not spec.scaling.use_gpu, "a base spec must run on CPU workers; GPUs come from a profile"
    if spec.model.path.startswith("pkg:") and importlib.util.find_spec(spec.model.path[4:].split("/")[0]) is None:
        pytest.skip(f"{spec.model.path}: its package is not installed (make setup installs it)")
    resolve_source(spec.model)


def test_every_config_header_shows_its_command() -> None:
    for path in CONFIGS:
        header = path.read_text().split("\nmodel:")[0]
        assert re.search(rf"^#\s+rayft (train|tune|plan)\s+configs/{re.escape(path.name)}", header, re.M), path.name


@pytest.mark.parametrize("path", WITH_PROFILE, ids=lambda p: p.name)
def test_every_preset_fits_its_gpu_profile_as_its_header_says(path: Path) -> None:
    """Offline: the shapes come from rayft's table, nothing is downloaded."""
    text = path.read_text()
    profiles = set(PROFILE_IN_HEADER.findall(text))
    assert len(profiles) == 1, f"{path.name}: its commands name different profiles {profiles}"
    profile = REPO / profiles.pop()
    base, gpu = load_spec(path), load_spec(path, profiles=[profile])
    assert gpu.scaling.use_gpu and gpu.precision == "bf16"
    # the profile changes the scaling (and precision), nothing else
    assert gpu.model == base.model and gpu.data == base.data and gpu.train == base.train
    profile_method = yaml.safe_load(profile.read_text()).get("method", {})
    kept = {key: getattr(base.method, key) for key in PROFILE_METHOD_KEYS if key in profile_method}
    assert gpu.method.model_copy(update={"precision": "auto", **kept}) == base.method
    plan = estimate(gpu, tokens=NOTE_TOKENS)
    if gpu.data.packing and gpu.model.attn_implementation == "auto":
        # packed rows on GPU: auto attention is planned as flash-attention's varlen kernel, no T x T mask
        assert "flash_attention_2" in plan.method
        assert "packed attention mask" not in plan.why.get("activations", "")
    assert plan.fits, f"{path.name}: {plan.total_bytes / 2**30:.1f} GiB > {plan.capacity_bytes / 2**30:.0f} GiB"
    note = PLAN_NOTE.search(text)
    assert note, f"{path.name}: no '# rayft plan says: ...' line in its header"
    total, capacity, hours = float(note[1]), float(note[2]), float(note[3])
    # the note is what the planner says today (rerun `rayft plan ... --tokens 10000000` when it changes)
    assert total == pytest.approx(plan.total_bytes / 2**30, abs=0.02), path.name
    assert capacity == pytest.approx(plan.capacity_bytes / 2**30, abs=0.5), path.name
    assert plan.seconds_per_epoch is not None
    assert hours == pytest.approx(plan.seconds_per_epoch / 3600, abs=0.051), path.name


@pytest.mark.parametrize("path", [p for p in CONFIGS if p not in WITH_PROFILE], ids=lambda p: p.name)
def test_cpu_configs_plan_offline(path: Path) -> None:
    spec = load_spec(path)
    if spec.model.path.startswith("pkg:") and importlib.util.find_spec(spec.model.path[4:].split("/")[0]) is None:
        pytest.skip(f"{spec.model.path}: its package is not installed (make setup installs it)")
    plan = estimate(spec, tokens=NOTE_TOKENS, accelerator="cpu", memory_gib=16)
    assert plan.fits and plan.workers == 2


def test_the_sweep_config_searches_learning_rate_and_rank_with_asha() -> None:
    from rayft.tune.space import scheduler, search_space

    spec = load_spec(REPO / "configs" / "sweep-quickstart.yaml")
    assert spec.tune is not None and set(spec.tune.search_space) == {"train.learning_rate", "method.lora.r"}
    assert spec.tune.scheduler.kind == "asha" and spec.tune.num_samples >= 4
    assert set(search_space(spec.tune)) == {"train.learning_rate", "method.lora.r"}
    assert type(scheduler(spec)).__name__ == "AsyncHyperBandScheduler"
    # ASHA needs several reports a trial to stop the poor ones
    assert spec.step_plan(198).eval_every * 3 <= spec.train.max_steps


def test_profiles_only_touch_scaling_precision_and_sharding() -> None:
    for profile in PROFILES:
        sections = yaml.safe_load(profile.read_text())
        assert set(sections) <= {"scaling", "method"} and set(sections.get("method", {})) <= PROFILE_METHOD_KEYS, (
            profile
        )


def test_fsdp2_profile_is_what_fits_70b_qlora_on_24_gb_gpus() -> None:
    config, profiles = REPO / "configs" / "llama3.1-70b-qlora.yaml", REPO / "configs" / "profiles"
    fsdp = estimate(load_spec(config, profiles=[profiles / "gpu-8xL4-fsdp2.yaml"]), tokens=0)
    replicated = estimate(
        load_spec(config, profiles=[profiles / "gpu-8xL4-fsdp2.yaml"], overrides=["method.fsdp=null"])
    )
    assert fsdp.fits and not replicated.fits
    assert fsdp.memory["weights"] == pytest.approx(replicated.memory["weights"] / 8, rel=1e-6)


def test_validate_cli_with_a_profile() -> None:
    result = run_cli("validate", "configs/llama3.1-70b-qlora.yaml", "-p", "configs/profiles/gpu-8xA100-80G.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "num_workers: 8" in result.stdout and "valid: gradient accumulation 2, precision bf16" in result.stdout
