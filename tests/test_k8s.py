"""Kubernetes: every manifest in k8s/ and every rendered RayJob validates against the KubeRay
CRDs' OpenAPI v3 schemas (../shared/k8s/crds), and rendering follows the spec.

No cluster is needed: the CRD schemas are applied as the API server applies them with strict
field validation (kubectl's default), including unknown fields, which a plain JSON Schema
reading of a CRD would let through. CEL rules (x-kubernetes-validations) are not evaluated.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from rayft.errors import SpecError
from rayft.launch import k8s
from rayft.spec import JobSpec, load_spec

REPO = Path(__file__).resolve().parents[1]
CRDS = Path(__file__).resolve().parents[2] / "shared" / "k8s" / "crds"
K8S = REPO / "k8s"
QUICKSTART = "configs/quickstart.yaml"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
GPU_OVERRIDES = [
    "scaling.use_gpu=true",
    "scaling.num_workers=8",
    "scaling.accelerator_type=A100-80G",
    "train.global_batch_size=32",
]  # a whole number of accumulation steps on 8 workers
SECRET_VALUE = "wandb-test-key-7f3a9c2e51"

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# resource.Quantity ("2", "500m", "8Gi"), as the CRDs spell it
QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DATA_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
MAX_NAME = {"RayJob": 47, "RayCluster": 53}  # KubeRay's own checks: it derives longer names from these


# --------------------------------------------------------------------------- validation
def structural(schema: Any) -> Any:
    """A CRD schema node in JSON Schema terms, as the API server applies it: objects with
    declared properties refuse others (unless x-kubernetes-preserve-unknown-fields),
    int-or-string and nullable become types, set-lists refuse duplicates. Recurses only through
    schema positions, so a field that happens to be named `properties` stays a field."""
    if not isinstance(schema, dict):
        return schema
    node = dict(schema)
    if "properties" in node:
        node["properties"] = {name: structural(sub) for name, sub in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = structural(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [structural(sub) for sub in node[key]]
    if node.get("x-kubernetes-int-or-string"):
        node["type"] = ["integer", "string"]
    if node.get("nullable") and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-list-type") == "set":
        node["uniqueItems"] = True
    return node


def _unique_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict) -> Iterator[Any]:
    """x-kubernetes-list-type: map: entries are unique by their keys (two env vars named X)."""
    if not validator.is_type(instance, "array"):
        return
    seen: dict[tuple, int] = {}
    for index, item in enumerate(instance):
        if isinstance(item, dict):
            key = tuple(item.get(k) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(
                    f"entries {seen[key]} and {index} have the same {dict(zip(keys, key))}"
                )
            seen[key] = index


# Formats are not checked (no format_checker): k8s uses its own (int32, int-or-string, ...).
K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _unique_map_keys}
)


@pytest.fixture(scope="session")
def crd_validators() -> dict[str, Any]:
    """kind -> a validator for that CRD's ray.io/v1 schema (the files are large: loaded once)."""
    if not all((CRDS / name).is_file() for name in CRD_FILES.values()):
        pytest.skip(f"the KubeRay CRDs are not at {CRDS} (../shared/k8s/crds beside the repository)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    validators = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((CRDS / name).read_text(), Loader=loader)
        assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"
        [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = structural(version["schema"]["openAPIV3Schema"])
        K8sValidator.check_schema(schema)
        validators[kind] = K8sValidator(schema)
    return validators


def manifest_errors(doc: dict[str, Any], crd_validators: dict[str, Any]) -> list[str]:
    """What the API server (and KubeRay's own name checks) would refuse in one manifest."""
    kind = doc.get("kind")
    errors = metadata_errors(doc)
    if kind in crd_validators:
        if doc.get("apiVersion") != "ray.io/v1":
            errors.append(f"apiVersion {doc.get('apiVersion')!r} is not ray.io/v1")
        for error in sorted(crd_validators[kind].iter_errors(doc), key=lambda e: list(e.absolute_path)):
            errors.append(f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}")
        name = doc.get("metadata", {}).get("name", "")
        if not DNS1035_LABEL.match(name) or len(name) > MAX_NAME[kind]:
            errors.append(f"metadata.name {name!r}: KubeRay wants a DNS-1035 label of at most {MAX_NAME[kind]}")
    elif kind in CORE_CHECKS:
        if doc.get("apiVersion") != "v1":
            errors.append(f"apiVersion {doc.get('apiVersion')!r} is not v1")
        errors += CORE_CHECKS[kind](doc)
    else:
        errors.append(f"no schema for kind {kind!r}")
    return errors


def metadata_errors(doc: dict[str, Any]) -> list[str]:
    metadata = doc.get("metadata") or {}
    name = metadata.get("name", "")
    errors = (
        [] if DNS1123_SUBDOMAIN.match(name) and len(name) <= 253 else [f"metadata.name {name!r} is not a DNS-1123 name"]
    )
    for key, value in (metadata.get("labels") or {}).items():
        prefix, _, label = key.rpartition("/")
        if (prefix and not DNS1123_SUBDOMAIN.match(prefix)) or not LABEL_NAME.match(label) or len(label) > 63:
            errors.append(f"label key {key!r} is invalid")
        if not isinstance(value, str) or len(value) > 63 or (value and not LABEL_NAME.match(value)):
            errors.append(f"label {key}={value!r}: not a label value")
    for key, value in (metadata.get("annotations") or {}).items():
        if not isinstance(value, str):
            errors.append(f"annotation {key} is not a string")
    return errors


def _string_map_errors(mapping: Any, where: str) -> list[str]:
    if not isinstance(mapping, dict):
        return [f"{where} is not a mapping"]
    return [
        f"{where}.{key}: a key of [-._a-zA-Z0-9] with a string value"
        for key, value in mapping.items()
        if not DATA_KEY.match(str(key)) or not isinstance(value, str)
    ]


def _configmap_errors(doc: dict[str, Any]) -> list[str]:
    return _string_map_errors(doc.get("data"), "data")


def _secret_errors(doc: dict[str, Any]) -> list[str]:
    errors = [] if doc.get("type", "Opaque") == "Opaque" else [f"type {doc.get('type')!r} is not Opaque"]
    if "data" not in doc and "stringData" not in doc:
        errors.append("neither data nor stringData")
    return errors + [e for key in ("data", "stringData") if key in doc for e in _string_map_errors(doc[key], key)]


def _pvc_errors(doc: dict[str, Any]) -> list[str]:
    spec = doc.get("spec") or {}
    modes = spec.get("accessModes") or []
    errors = (
        []
        if modes and set(modes) <= {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"}
        else [f"spec.accessModes {modes!r}"]
    )
    size = (spec.get("resources") or {}).get("requests", {}).get("storage")
    return errors + (
        [] if isinstance(size, str) and QUANTITY.match(size) else [f"spec.resources.requests.storage {size!r}"]
    )


CORE_CHECKS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "ConfigMap": _configmap_errors,
    "Secret": _secret_errors,
    "PersistentVolumeClaim": _pvc_errors,
}


# ------------------------------------------------------------------------------ helpers
def quickstart(*overrides: str) -> JobSpec:
    return load_spec(REPO / QUICKSTART, overrides=list(overrides))


def rendered(*overrides: str, **options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    config_map, ray_job = k8s.render(quickstart(*overrides), spec_path=QUICKSTART, overrides=overrides, **options)
    assert (config_map["kind"], ray_job["kind"]) == ("ConfigMap", "RayJob")
    return config_map, ray_job


def worker_group(ray_job: dict[str, Any]) -> dict[str, Any]:
    [group] = ray_job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return group


def pod(group: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, its Ray container)."""
    spec = group["template"]["spec"]
    return spec, spec["containers"][0]


def head(ray_job: dict[str, Any]) -> dict[str, Any]:
    return ray_job["spec"]["rayClusterSpec"]["headGroupSpec"]


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}#{index}", doc)
        for path in sorted(K8S.glob("*.yaml"))
        for index, doc in enumerate(yaml.safe_load_all(path.read_text()))
        if doc is not None
    ]


# -------------------------------------------------------------------- k8s/ manifests
def test_k8s_directory_has_the_manifests() -> None:
    kinds = {(name.split("#")[0], doc["kind"]) for name, doc in k8s_documents()}
    assert {
        ("raycluster-cpu.yaml", "RayCluster"),
        ("raycluster-gpu.yaml", "RayCluster"),
        ("rayjob-quickstart.yaml", "RayJob"),
        ("rayjob-quickstart.yaml", "ConfigMap"),
        ("secrets.example.yaml", "Secret"),
        ("storage-pvc.yaml", "PersistentVolumeClaim"),
    } <= kinds


@pytest.mark.parametrize("name, doc", k8s_documents(), ids=[name for name, _ in k8s_documents()])
def test_every_manifest_in_k8s_validates(name: str, doc: dict[str, Any], crd_validators: dict[str, Any]) -> None:
    assert manifest_errors(doc, crd_validators) == []
    assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "rayft"


def test_checked_in_quickstart_job_is_what_render_produces() -> None:
    """k8s/rayjob-quickstart.yaml is the renderer's output (plus comments), not hand-kept YAML
    that drifts from the spec."""
    checked_in = [doc for doc in yaml.safe_load_all((K8S / "rayjob-quickstart.yaml").read_text()) if doc]
    fresh = k8s.render(quickstart(), spec_path=QUICKSTART)
    for doc in (*checked_in, *fresh):  # compare the embedded spec as data, not as text
        if doc["kind"] == "ConfigMap":
            doc["data"][k8s.SPEC_KEY] = yaml.safe_load(doc["data"][k8s.SPEC_KEY])
    assert checked_in == fresh, "k8s/rayjob-quickstart.yaml is stale: rayft k8s render configs/quickstart.yaml"


def test_clusters_run_the_image_the_dockerfile_builds() -> None:
    dockerfile = (K8S / "Dockerfile").read_text()
    assert re.search(rf"^ARG BASE_IMAGE=rayproject/ray:{re.escape(k8s.RAY_VERSION)}-py311$", dockerfile, re.M)
    assert re.search(rf"^WORKDIR {re.escape(k8s.IMAGE_WORKDIR)}$", dockerfile, re.M)
    for name, doc in k8s_documents():
        if doc["kind"] == "RayCluster":
            spec = doc["spec"]
            assert spec["rayVersion"] == k8s.RAY_VERSION, name
            assert spec["authOptions"] == {"mode": "token"}, name
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                _, container = pod(group)
                assert container["image"].startswith("rayft:") and container["workingDir"] == k8s.IMAGE_WORKDIR


def test_secret_template_and_pvc_match_what_rendered_jobs_reference() -> None:
    docs = {doc["kind"]: doc for _, doc in k8s_documents()}
    secret, pvc = docs["Secret"], docs["PersistentVolumeClaim"]
    assert secret["metadata"]["name"] == k8s.SECRET_NAME
    assert set(JobSpec.model_fields["run"].default_factory().forward_env) <= set(secret["stringData"])
    for key, value in secret["stringData"].items():  # placeholders, clearly not keys
        assert re.fullmatch(r"<[^<>]+>", value), f"{key}: {value!r} is not a <placeholder>"
    assert pvc["metadata"]["name"] == k8s.DEFAULT_PVC and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# ---------------------------------------------------------------------------- rendering
def test_quickstart_renders_a_cpu_job_sized_by_the_spec(crd_validators: dict[str, Any]) -> None:
    config_map, ray_job = rendered()
    for doc in (config_map, ray_job):
        assert manifest_errors(doc, crd_validators) == []
        assert doc["metadata"]["labels"] == {
            "app.kubernetes.io/name": "rayft",
            "app.kubernetes.io/instance": "quickstart",
            "app.kubernetes.io/managed-by": "rayft",
        }
    job = ray_job["spec"]
    assert (job["submissionMode"], job["shutdownAfterJobFinishes"], job["backoffLimit"]) == (
        "K8sJobMode",
        True,
        3,
    )  # run.max_failures
    assert job["ttlSecondsAfterFinished"] > 0
    assert job["rayClusterSpec"]["rayVersion"] == k8s.RAY_VERSION

    group = worker_group(ray_job)
    spec, container = pod(group)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    assert group["rayStartParams"] == {"num-cpus": "1"}
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "4Gi"},
        "limits": {"cpu": "1", "memory": "4Gi"},
    }
    assert container["image"] == "rayft:0.1.0"
    assert "tolerations" not in spec and "nodeSelector" not in spec
    assert not any(GPU in str(container) for GPU in ("nvidia.com/gpu", "/dev/shm"))
    assert head(ray_job)["rayStartParams"] == {"num-cpus": "0"}  # the driver's pod trains nothing

    # The run storage: the PVC on every pod, and the spec pointed at it.
    for spec, container in (pod(head(ray_job)), pod(group)):
        assert {"name": "runs", "persistentVolumeClaim": {"claimName": k8s.DEFAULT_PVC}} in spec["volumes"]
        assert {"name": "runs", "mountPath": k8s.RUNS_MOUNT} in container["volumeMounts"]
    assert yaml.safe_load(config_map["data"][k8s.SPEC_KEY])["run"]["storage_path"] == k8s.RUNS_MOUNT
    # The spec reaches the driver on the head at the path the entrypoint names.
    head_spec, head_container = pod(head(ray_job))
    assert {"name": "spec", "configMap": {"name": config_map["metadata"]["name"]}} in head_spec["volumes"]
    assert {"name": "spec", "mountPath": str(Path(k8s.SPEC_PATH).parent), "readOnly": True} in head_container[
        "volumeMounts"
    ]


def test_gpu_variant_gets_gpus_tolerations_shm_and_a_node_selector(crd_validators: dict[str, Any]) -> None:
    config_map, ray_job = rendered(*GPU_OVERRIDES)
    assert manifest_errors(ray_job, crd_validators) == []
    group = worker_group(ray_job)
    spec, container = pod(group)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 8
    assert group["rayStartParams"] == {"num-cpus": "1", "num-gpus": "1"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in spec["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["image"] == "rayft:0.1.0-gpu"
    head_spec, head_container = pod(head(ray_job))  # the driver needs no GPU node
    assert "tolerations" not in head_spec and "nvidia.com/gpu" not in head_container["resources"]["limits"]


@pytest.mark.parametrize("cpus, gpus, want_cpu, want_gpu", [(1.5, 0.5, "2", "1"), (8, 2, "8", "2")])
def test_fractional_resources_round_up_to_whole_pods(
    cpus: float, gpus: float, want_cpu: str, want_gpu: str, crd_validators: dict[str, Any]
) -> None:
    _, ray_job = rendered(*GPU_OVERRIDES, f"scaling.cpus_per_worker={cpus}", f"scaling.gpus_per_worker={gpus}")
    group = worker_group(ray_job)
    limits = pod(group)[1]["resources"]["limits"]
    assert group["rayStartParams"] == {"num-cpus": want_cpu, "num-gpus": want_gpu}
    assert (limits["cpu"], limits["nvidia.com/gpu"]) == (want_cpu, want_gpu)
    assert manifest_errors(ray_job, crd_validators) == []


def test_gpu_without_accelerator_type_has_no_node_selector() -> None:
    spec, _ = pod(worker_group(rendered(*GPU_OVERRIDES[:2], GPU_OVERRIDES[3])[1]))
    assert "nodeSelector" not in spec and spec["tolerations"]


def test_object_storage_passes_through_with_credentials_from_the_secret(crd_validators: dict[str, Any]) -> None:
    config_map, ray_job = rendered("run.storage_path=s3://team-bucket/rayft")
    assert manifest_errors(ray_job, crd_validators) == []
    assert yaml.safe_load(config_map["data"][k8s.SPEC_KEY])["run"]["storage_path"] == "s3://team-bucket/rayft"
    for spec, container in (pod(head(ray_job)), pod(worker_group(ray_job))):
        assert "runs" not in str(spec.get("volumes", [])) and "securityContext" not in spec
        names = [e["name"] for e in container["env"]]
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(names) and len(names) == len(set(names))


def test_storage_option_names_the_pvc_and_namespace_lands_on_everything() -> None:
    config_map, ray_job = rendered(storage="team-nfs", namespace="ml")
    assert config_map["metadata"]["namespace"] == ray_job["metadata"]["namespace"] == "ml"
    for spec, _ in (pod(head(ray_job)), pod(worker_group(ray_job))):
        assert {"name": "runs", "persistentVolumeClaim": {"claimName": "team-nfs"}} in spec["volumes"]


def test_an_elastic_range_bounds_the_worker_group(crd_validators: dict[str, Any]) -> None:
    _, job = rendered("scaling.num_workers=[1, 2]")
    group = worker_group(job)
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 1, 2)
    assert manifest_errors(job, crd_validators) == []


def test_max_failures_becomes_the_job_retry_budget() -> None:
    assert rendered("run.max_failures=3")[1]["spec"]["backoffLimit"] == 3
    assert rendered("run.max_failures=-1")[1]["spec"]["backoffLimit"] == k8s.MAX_JOB_RETRIES


def test_secrets_are_referenced_never_inlined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", SECRET_VALUE)
    # Even a key pasted into the spec (here a W&B group) and into an override stays out.
    overrides = [f"tracking.wandb.group={SECRET_VALUE}", "run.forward_env=[WANDB_API_KEY, HF_TOKEN, MY_TOKEN]"]
    manifests = k8s.render(quickstart(*overrides), spec_path=QUICKSTART, overrides=overrides)
    text = k8s.to_yaml(manifests)
    assert SECRET_VALUE not in text
    ray_job = manifests[1]
    for _, container in (pod(head(ray_job)), pod(worker_group(ray_job))):
        assert [e["name"] for e in container["env"]] == ["WANDB_API_KEY", "HF_TOKEN", "MY_TOKEN"]
        for entry in container["env"]:
            assert "value" not in entry
            assert entry["valueFrom"] == {
                "secretKeyRef": {"name": k8s.SECRET_NAME, "key": entry["name"], "optional": True}
            }


@pytest.mark.parametrize(
    "overrides", [(), GPU_OVERRIDES, ("run.storage_path=gs://bucket/runs",)], ids=["quickstart", "gpu", "gs"]
)
def test_configmap_spec_loads_back_to_the_same_spec(overrides: tuple[str, ...], tmp_path: Path) -> None:
    original = quickstart(*overrides)
    config_map, _ = rendered(*overrides)
    path = tmp_path / "spec.yaml"  # a different file name: run.name must come from the spec itself
    path.write_text(config_map["data"][k8s.SPEC_KEY])
    loaded = load_spec(path)
    storage = original.run.storage_path if "://" in original.run.storage_path else k8s.RUNS_MOUNT
    assert loaded == original.model_copy(update={"run": original.run.model_copy(update={"storage_path": storage})})
    assert loaded.eval.max_new_tokens == original.eval.max_new_tokens  # not redacted as a "token"


def test_entrypoint_is_the_documented_ray_job_submit_command() -> None:
    """The RayJob runs what `ray job submit` runs locally, with the spec path swapped: the
    documented command, plus only options that `rayft train` accepts."""
    from typer.main import get_command

    from rayft.cli import app

    _, ray_job = rendered()
    entrypoint = ray_job["spec"]["entrypoint"]
    assert entrypoint == k8s.entrypoint_for(k8s.SPEC_PATH) == f"python jobs/train.py {k8s.SPEC_PATH} --no-compare"
    documented = documented_submit_commands()
    assert documented, "no `ray job submit ... -- python jobs/train.py SPEC` documented in jobs/"
    train = get_command(app).commands["train"]
    for command in documented:
        words = shlex.split(command)
        local = shlex.split(entrypoint.replace(k8s.SPEC_PATH, words[2]))
        assert local[: len(words)] == words, f"{command!r} is not how the RayJob starts: {entrypoint!r}"
        # jobs/train.py hands its arguments to `rayft train`: they must parse there.
        params = train.make_context("train", local[2:]).params
        assert str(params["spec"]) == words[2] and params["compare"] is False
    assert (REPO / "jobs" / "train.py").is_file()  # relative to the repository, which the image has at /app


def documented_submit_commands() -> list[str]:
    """The command after `--` in `ray job submit ... -- python jobs/train.py SPEC` lines of
    jobs/README.md (or, without one, the entrypoint's own docstring)."""
    readme = REPO / "jobs" / "README.md"
    text = readme.read_text() if readme.is_file() else (REPO / "jobs" / "train.py").read_text()
    text = re.sub(r"\\\n\s*", " ", text)  # join shell line continuations
    commands = re.findall(r"ray job submit\b[^\n]*? -- (python jobs/train\.py [^\n`]+)", text)
    return [
        command.strip().rstrip("\\").strip() for command in commands if not shlex.split(command)[2].isupper()
    ]  # skip placeholders like SPEC


def test_to_yaml_is_plain_multi_document_yaml() -> None:
    manifests = k8s.render(quickstart(*GPU_OVERRIDES), spec_path=QUICKSTART, overrides=GPU_OVERRIDES)
    text = k8s.to_yaml(manifests)
    assert text.startswith("# Generated by `rayft k8s render configs/quickstart.yaml scaling.use_gpu=true")
    assert list(yaml.safe_load_all(text)) == manifests
    assert "&id" not in text and "*id" not in text  # shared dicts must not become YAML anchors
    assert f"  {k8s.SPEC_KEY}: |\n" in text  # the spec reads as a block, not an escaped string


@pytest.mark.parametrize(
    "overrides, options, field",
    [
        (("scaling.use_gpu=true", "scaling.accelerator_type=B7000"), {}, "scaling.accelerator_type"),
        (("run.name=" + "x" * 48,), {}, "run.name"),
        (("run.storage_path=s3://bucket/runs",), {"storage": "team-nfs"}, "run.storage_path"),
        (("run.storage_path=hdfs://namenode/runs",), {}, "run.storage_path"),
        (("run.forward_env=[WANDB-KEY]",), {}, "run.forward_env"),
        (("scaling.use_gpu=true", "scaling.gpus_per_worker=0"), {}, "scaling.gpus_per_worker"),
    ],
)
def test_specs_that_cannot_run_on_kubernetes_name_the_field(
    overrides: tuple[str, ...], options: dict[str, Any], field: str
) -> None:
    with pytest.raises(SpecError) as error:
        k8s.render(quickstart(*overrides), spec_path=QUICKSTART, **options)
    assert error.value.field == field and str(error.value).startswith(f"{field}: ")


@pytest.mark.parametrize(
    "run_name, k8s_name",
    [("quickstart", "quickstart"), ("Llama_8B.v2", "llama-8b-v2"), ("2024-sweep", "run-2024-sweep")],
)
def test_run_names_become_kubernetes_names(run_name: str, k8s_name: str) -> None:
    assert k8s.k8s_name(run_name) == k8s_name


# ------------------------------------------------------ the validator catches real errors
def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = doc
        for part in parents:
            node = node[part]
        node[last] = value

    return mutate


WORKER = "spec.rayClusterSpec.workerGroupSpecs.0"
CONTAINER = f"{WORKER}.template.spec.containers.0"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (_set(f"{WORKER}.replicas", "two"), "replicas: 'two' is not of type 'integer'"),
        (_set(f"{WORKER}.replica", 2), "Additional properties are not allowed ('replica'"),
        (_set(f"{CONTAINER}.imagePullPolicyy", "Always"), "Additional properties are not allowed ('imagePullPolicyy'"),
        (_set(f"{CONTAINER}.resources.limits.cpu", "lots"), "limits.cpu: 'lots' does not match"),
        (_set(f"{WORKER}.rayStartParams.num-cpus", 1), "num-cpus: 1 is not of type 'string'"),
        (_set("spec.shutdownAfterJobFinishes", "yes"), "shutdownAfterJobFinishes: 'yes' is not of type 'boolean'"),
        (
            lambda doc: doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
            "'groupName' is a required property",
        ),
        (
            lambda doc: doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
                "env"
            ].append({"name": "HF_TOKEN", "value": "x"}),
            "have the same {'name': 'HF_TOKEN'}",
        ),
        (_set("metadata.name", "Quick_Start"), "metadata.name 'Quick_Start'"),
        (_set("apiVersion", "ray.io/v1alpha1"), "is not ray.io/v1"),
    ],
    ids=[
        "replicas-string",
        "unknown-group-field",
        "unknown-container-field",
        "bad-quantity",
        "start-param-int",
        "bool-as-string",
        "missing-required",
        "duplicate-env",
        "bad-name",
        "old-api-version",
    ],
)
def test_validator_refuses_broken_manifests(
    mutate: Callable[[dict[str, Any]], Any], expected: str, crd_validators: dict[str, Any]
) -> None:
    _, ray_job = rendered()
    assert manifest_errors(ray_job, crd_validators) == []
    broken = copy.deepcopy(ray_job)
    mutate(broken)
    errors = manifest_errors(broken, crd_validators)
    assert any(expected in error for error in errors), errors


def test_structural_keeps_a_field_named_properties() -> None:
    schema = structural({"type": "object", "properties": {"properties": {"type": "string"}}})
    assert schema["properties"] == {"properties": {"type": "string"}} and schema["additionalProperties"] is False


def test_validator_refuses_a_broken_raycluster(crd_validators: dict[str, Any]) -> None:
    [cluster] = yaml.safe_load_all((K8S / "raycluster-gpu.yaml").read_text())
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["nodeSelectors"] = {}
    errors = manifest_errors(cluster, crd_validators)
    assert any("maxReplicas: '4' is not of type 'integer'" in e for e in errors), errors
    assert any("('nodeSelectors' was unexpected)" in e for e in errors), errors
