"""Every shipped spec is valid, and each large-Llama spec fits its GPU profile by rayft plan."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from rayft.model import resolve_source
from rayft.plan import estimate
from rayft.spec import load_spec

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PROFILES = sorted((REPO / "configs" / "profiles").glob("*.yaml"))
LARGE = [
    ("llama3.1-8b-qlora.yaml", "gpu-1xA100-80G.yaml"),
    ("llama3.1-8b-lora-zero2.yaml", "gpu-8xA100-80G.yaml"),
    ("llama3.1-70b-qlora.yaml", "gpu-8xA100-80G.yaml"),
    ("llama3.1-70b-qlora.yaml", "gpu-8xL4-fsdp2.yaml"),
    ("llama3.1-70b-full-zero3-offload.yaml", "gpu-2x8xH100.yaml"),
]
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


@pytest.mark.parametrize("config, profile", LARGE)
def test_large_llama_specs_fit_their_gpu_profile(config: str, profile: str) -> None:
    base = load_spec(REPO / "configs" / config)
    gpu = load_spec(REPO / "configs" / config, profiles=[REPO / "configs" / "profiles" / profile])
    assert gpu.scaling.use_gpu and gpu.precision == "bf16"
    # the profile changes the scaling (and precision), nothing else
    assert gpu.model == base.model and gpu.data == base.data and gpu.train == base.train
    profile_method = yaml.safe_load((REPO / "configs" / "profiles" / profile).read_text()).get("method", {})
    kept = {key: getattr(base.method, key) for key in PROFILE_METHOD_KEYS if key in profile_method}
    assert gpu.method.model_copy(update={"precision": "auto", **kept}) == base.method
    plan = estimate(gpu, tokens=20_000_000)
    # packed rows on GPU: auto attention is planned as flash-attention's varlen kernel, with no T x T mask
    assert gpu.model.attn_implementation == "auto" and "flash_attention_2" in plan.method
    assert "packed attention mask" not in plan.why.get("activations", "")
    assert plan.fits, (
        f"{config} with {profile}: {plan.total_bytes / 2**30:.1f} GiB > {plan.capacity_bytes / 2**30:.0f} GiB"
    )


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
