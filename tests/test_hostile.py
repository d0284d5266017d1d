"""Broken and hostile input, one case or more per class, none of which needs Ray: nothing outside
a run's own directory is deleted, secrets stay names, nothing is silently wrong, no library
traceback, no hang, clear messages, and `validate` catches what can be known before Ray starts."""

from __future__ import annotations

import base64
import gzip
import json
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from rayft.data.sources import Chunk, read_chunk
from rayft.errors import DataError, ModelError, SpecError
from rayft.spec import load_spec

SECRET = "hf_HostileSecretValue_0123456789"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write(tmp_path / "d.jsonl", json.dumps({"prompt": "p", "response": "an answer"}) + "\n")


def base(train_file: Path, /, **sections: Any) -> dict[str, Any]:
    return {"model": {"path": "org/model"}, "data": {"train": str(train_file)}, **sections}


def records(path: Path) -> list[Any]:
    return [record for _, _, record in read_chunk(Chunk(0, str(path)))]


def secret_forms(secret: str) -> list[bytes]:
    return [secret.encode(), secret.lower().encode(), base64.b64encode(secret.encode())]


# --------------------------------------------------------------------------- destructive
@pytest.mark.parametrize("name", [".", "..", "a/b", "../escape", "", "-x", "___"])
def test_a_run_name_that_is_not_one_path_component_is_refused(data: Path, name: str) -> None:
    with pytest.raises(SpecError, match="run.name: .*is not a run name"):
        load_spec(data=base(data, run={"name": name}))


def test_fresh_deletes_only_a_directory_that_rayft_made(tmp_path: Path) -> None:
    from rayft.rundir import delete_for_fresh_start, mark

    parent = tmp_path / "runs"
    foreign = write(parent / "not-a-run" / "precious.txt", "keep me").parent
    with pytest.raises(SpecError, match="holds no run of rayft's .* --fresh will not delete it"):
        delete_for_fresh_start(str(foreign))
    assert (foreign / "precious.txt").read_text() == "keep me"
    run = parent / "a-run"
    write(run / "checkpoint_000001" / "x", "old")
    mark(str(run))
    delete_for_fresh_start(str(run))
    assert not run.exists() and (foreign / "precious.txt").exists() and parent.is_dir()
    delete_for_fresh_start(str(parent / "never-made"))  # nothing there: nothing to do


# ------------------------------------------------------------------------------- secrets
def test_redaction_survives_any_letter_case(monkeypatch: pytest.MonkeyPatch) -> None:
    from rayft.spec.secrets import contains_secret, redact_text

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("MY_SERVICE_TOKEN", "another-secret-value")  # secret by its name
    text = f"a {SECRET} b {SECRET.lower()} c {SECRET.upper()} d another-secret-value"
    assert redact_text(text) == "a *** b *** c *** d ***"
    assert contains_secret(SECRET.lower()) and not contains_secret("harmless")


def test_secrets_never_go_into_a_ray_runtime_environment(monkeypatch: pytest.MonkeyPatch, data: Path) -> None:
    from rayft.env import Target, runtime_env, secrets

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", "wandb-" + SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-" + SECRET)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    spec = load_spec(data=base(data, run={"storage_path": "s3://bucket/runs"}))
    for target in Target:
        recorded = json.dumps(runtime_env(spec, target) or {})
        assert SECRET not in recorded, target
    assert secrets(spec, Target.WORKERS) == {
        "HF_TOKEN": SECRET,
        "WANDB_API_KEY": "wandb-" + SECRET,
        "AWS_SECRET_ACCESS_KEY": "aws-" + SECRET,
    }
    assert runtime_env(spec, Target.DATA_TASKS) == {"env_vars": {"AWS_REGION": "eu-west-1"}}


def test_a_submitted_job_gets_its_secrets_sealed(monkeypatch: pytest.MonkeyPatch, data: Path) -> None:
    from rayft.launch import submit

    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "cluster-token-0123456789")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    spec = load_spec(data=base(data))
    sealed = submit.seal(submit.secrets(spec, submit.Target.JOB), submit.ray_auth_token())
    env = submit.runtime_env(spec, Path("."), "http://127.0.0.1:8265", sealed)
    recorded = json.dumps(env).encode()
    assert not any(form in recorded for form in secret_forms(SECRET))
    # inside the job: unsealed into the environment, the sealed copy gone
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv(submit.SEALED_SECRETS, sealed)
    assert submit.adopt_job_secrets() == ["WANDB_API_KEY"]
    import os

    assert os.environ["WANDB_API_KEY"] == SECRET and submit.SEALED_SECRETS not in os.environ


def test_every_string_given_to_wandb_is_redacted(monkeypatch: pytest.MonkeyPatch, data: Path, tmp_path: Path) -> None:
    from rayft.data.prepared import Prepared
    from rayft.rundir import RunDir
    from rayft.spec import StepPlan
    from rayft.train.run import RunPlan
    from rayft.train.tracking import run_settings

    monkeypatch.setenv("HF_TOKEN", SECRET)
    spec = load_spec(
        data=base(
            data,
            run={"storage_path": str(tmp_path)},
            tracking={
                "wandb": {
                    "entity": SECRET.lower(),
                    "group": f"g-{SECRET}",
                    "tags": [SECRET.upper(), "ok"],
                    "project": "p",
                }
            },
        )
    )
    plan = RunPlan(spec, RunDir.of(spec), "/m", Prepared("/p", "k"), StepPlan(1, 1, 1, 1), None)
    settings = json.dumps(run_settings(plan), default=str).encode()
    assert not any(form.lower() in settings.lower() for form in secret_forms(SECRET)), settings
    assert b'"ok"' in settings


def test_k8s_refuses_a_run_name_holding_a_secret(monkeypatch: pytest.MonkeyPatch, data: Path) -> None:
    from rayft.launch import k8s

    monkeypatch.setenv("HF_TOKEN", SECRET)
    spec = load_spec(data=base(data, run={"name": SECRET}))
    with pytest.raises(SpecError, match="run.name: holds the value of a secret"):
        k8s.render(spec, spec_path="x.yaml")


# -------------------------------------------------------------------------- silent, wrong
def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path: Path, data: Path) -> None:
    spec = write(tmp_path / "dup.yaml", f"model:\n  path: a\ndata:\n  train: {data}\nmodel:\n  path: b\n")
    with pytest.raises(SpecError, match=r"dup.yaml:5: key 'model' is given twice, on lines 1 and 5"):
        load_spec(spec)
    nested = write(tmp_path / "nested.yaml", f"model:\n  path: a\n  path: b\ndata:\n  train: {data}\n")
    with pytest.raises(SpecError, match="key 'path' is given twice, on lines 2 and 3"):
        load_spec(nested)


@pytest.mark.parametrize("field, value", [("learning_rate", ".inf"), ("epochs", ".inf"), ("warmup", ".nan")])
def test_numbers_must_be_finite(tmp_path: Path, data: Path, field: str, value: str) -> None:
    spec = write(tmp_path / "s.yaml", f"model:\n  path: a\ndata:\n  train: {data}\ntrain:\n  {field}: {value}\n")
    with pytest.raises(SpecError, match=rf"s.yaml:6: train.{field}: Input should be a finite number"):
        load_spec(spec)


def test_eval_files_and_an_eval_fraction_conflict(data: Path) -> None:
    with pytest.raises(SpecError, match="give data.eval .* or data.eval_fraction .*, not both"):
        load_spec(data=base(data, data={"train": str(data), "eval": str(data), "eval_fraction": 0.1}))
    assert load_spec(data=base(data, data={"train": str(data), "eval": str(data)})).data.held_out_fraction == 0.0
    assert load_spec(data=base(data)).data.held_out_fraction == 0.05


def test_a_utf8_bom_loses_no_record(tmp_path: Path) -> None:
    items = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)]
    array = write(tmp_path / "a.json", b"\xef\xbb\xbf" + json.dumps(items, indent=1).encode())
    lines = write(tmp_path / "a.jsonl", b"\xef\xbb\xbf" + "\n".join(json.dumps(i) for i in items).encode())
    excel = write(
        tmp_path / "a.csv", b"\xef\xbb\xbfprompt,response\n" + b"".join(f"p{i},r{i}\n".encode() for i in range(5))
    )
    for path in (array, lines, excel):
        assert records(path) == items, path


# ------------------------------------------------------------------- library tracebacks
def test_unreadable_files_are_data_errors_naming_the_file(tmp_path: Path) -> None:
    parquet = write(tmp_path / "bad.parquet", b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable parquet file"):
        records(parquet)
    not_gzip = write(tmp_path / "bad.jsonl.gz", b'{"a": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl.gz:1: cannot read the file"):
        records(not_gzip)
    truncated = write(tmp_path / "cut.jsonl.gz", gzip.compress(b'{"a": 1}\n' * 1000)[:60])
    with pytest.raises(DataError, match=r"cut.jsonl.gz:\d+: cannot read the file"):
        records(truncated)


def test_a_file_that_is_not_a_model_is_named_as_such(tmp_path: Path, data: Path) -> None:
    from rayft.model.source import resolve_source

    notes = write(tmp_path / "notes.txt", "my notes")
    with pytest.raises(SpecError, match="model.path: .*notes.txt is a file, not a model"):
        resolve_source(load_spec(data=base(data, model={"path": str(notes)})).model)
    fake = write(tmp_path / "model.gguf", b"not a gguf at all")
    with pytest.raises(SpecError, match="model.gguf is not a GGUF file"):
        resolve_source(load_spec(data=base(data, model={"path": str(fake)})).model)


def test_a_truncated_gguf_is_a_model_error(tmp_path: Path, data: Path) -> None:
    from rayft.model import materialized_dir

    truncated = write(tmp_path / "cut.gguf", b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 10)
    spec = load_spec(data=base(data, model={"path": str(truncated)}, run={"storage_path": str(tmp_path / "r")}))
    with pytest.raises(ModelError, match="cannot read the GGUF file .*cut.gguf"):
        materialized_dir(spec)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"train": {"lr_scheduler": "cosin"}}, "unknown learning-rate scheduler 'cosin'; did you mean 'cosine'"),
        ({"train": {"optimizer": "adamw"}}, "unknown optimizer 'adamw'"),
        ({"run": {"storage_path": "ftp://host/runs"}}, "unknown storage scheme ftp://"),
        (
            {"tune": {"search_space": {"train.lerning_rate": {"grid": [1]}}}},
            "'train.lerning_rate' names no field: train has no 'lerning_rate' .did you mean 'learning_rate'",
        ),
    ],
)
def test_names_the_libraries_would_reject_later_are_refused_at_load(data: Path, section: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_spec(data=base(data, **section))


def test_the_spec_knows_the_names_transformers_knows() -> None:
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from rayft.spec.schema import LR_SCHEDULERS, OPTIMIZERS

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}
    assert set(OPTIMIZERS) <= {o.value for o in OptimizerNames}


@pytest.mark.parametrize(
    "text, message",
    [
        (b"model:\n  path: caf\xe9\n", r"s.yaml:2: not UTF-8 text \(byte 0xe9\)"),
        (b"model: !!python/object/apply:os.system ['true']\n", "python/object/apply:os.system' is not allowed"),
        (b"? [a, b]\n: 1\n", "s.yaml:1: a mapping key must be a plain value, not list"),
        (b"model: [unclosed\n", r"s.yaml:\d+: not valid YAML"),
    ],
)
def test_unreadable_specs_name_file_and_line(tmp_path: Path, text: bytes, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_spec(write(tmp_path / "s.yaml", text))


def test_no_library_traceback_reaches_the_terminal_and_debug_shows_it(tmp_path: Path) -> None:
    bad = write(tmp_path / "s.yaml", "model:\n  path: ./missing-model\ndata:\n  train: d.jsonl\n")
    quiet = run_cli("validate", str(bad))
    assert quiet.returncode == 2 and "model.path: no such model directory" in quiet.stdout
    assert "Traceback" not in quiet.stdout + quiet.stderr
    loud = run_cli("--debug", "validate", str(bad))
    assert loud.returncode == 2 and "Traceback" in loud.stdout + loud.stderr


def test_bracketed_library_text_is_printed_as_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    """A gloo error in a failure note ("[/__w/.../pair.cc:537] Connection closed by peer") was read
    as rich markup: the progress printer raised MarkupError and printed nothing more of the run."""
    from rayft.cli.views import log

    note = "train: worker failure (rank 1: RuntimeError: [/__w/pytorch/gloo/tcp/pair.cc:537] closed [bold]x)"
    log(note)
    assert capsys.readouterr().out.replace("\n", "") == note


# -------------------------------------------------------------------------------- hangs
def test_an_alias_bomb_is_refused_in_under_a_second(tmp_path: Path) -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for level, name in enumerate("bcdefghij"):
        previous = "abcdefghij"[level]
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 10) + "]")
    bomb = write(tmp_path / "bomb.yaml", "\n".join(lines) + "\n")
    started = time.time()
    with pytest.raises(SpecError, match="expands to more than 100,000 values through YAML aliases"):
        load_spec(bomb)
    assert time.time() - started < 1.0
    from rayft.spec.yamlfile import parse_yaml  # what parses an override's value

    with pytest.raises(SpecError, match="expands to more than"):
        parse_yaml(bomb.read_text())


# -------------------------------------------------------------------------------- vague
def test_a_bad_byte_in_a_csv_is_blamed_on_its_own_line(tmp_path: Path) -> None:
    rows = b"prompt,response\n" + b"".join(f"question {i},answer {i}\n".encode() for i in range(1, 4))
    bad = write(tmp_path / "bad.csv", rows + b"question 4,answ\xffer\n" + b"question 5,answer 5\n")
    with pytest.raises(DataError, match=r"bad.csv:5: not valid UTF-8 \(byte 0xff\)"):
        records(bad)


def test_an_override_that_adds_a_section_is_blamed_on_the_override(tmp_path: Path, data: Path) -> None:
    spec = write(tmp_path / "s.yaml", f"model:\n  path: a\ndata:\n  train: {data}\n")
    with pytest.raises(SpecError, match="override foo.bar: foo: unknown key 'foo'"):
        load_spec(spec, overrides=["foo.bar=1"])


def test_nothing_left_after_truncation_names_max_length_and_truncation(data: Path) -> None:
    from rayft.data.cache import CacheEntry
    from rayft.data.prepare import _nothing_left

    spec = load_spec(data=base(data, data={"train": str(data), "max_length": 64}))
    entry = CacheEntry("/p/k", "k", [[str(data)]], None)
    message = _nothing_left(spec, entry, {"counts": {"records": 7, "kept": 7, "no_trained_tokens": 7}, "errors": []})
    assert str(data) in message and "data.max_length=64" in message and "data.truncation: keep_end" in message
    empty = _nothing_left(spec, entry, {"counts": {"records": 0}, "errors": []})
    assert str(data) in empty and "the files hold no records" in empty


# ------------------------------------------------------------------- late -> validate
def test_validate_catches_what_the_file_system_knows(tmp_path: Path, data: Path) -> None:
    from rayft.train.preflight import preflight

    model = tmp_path / "model"
    write(model / "config.json", "{}")
    ok = {"model": {"path": str(model)}, "data": {"train": str(data), "template": "chatml"}}
    preflight(load_spec(data=ok), storage_probe=False)
    empty = write(tmp_path / "empty.jsonl", "")
    cases = [
        ({"data": {"train": str(tmp_path / "missing.jsonl")}}, "data.train.0.path: no such file or directory"),
        ({"data": {"train": str(tmp_path / "*.parquet")}}, "data.train.0.path: .* matches no data files"),
        ({"data": {"train": str(empty)}}, "data.train.0.path: .*empty.jsonl is empty"),
        ({"data": {"train": str(data), "template": "chatmll"}}, "data.template: unknown template 'chatmll'"),
        ({"data": {"train": str(data), "template": str(tmp_path / "t.jinja")}}, "no such template file"),
        ({"method": {"deepspeed": str(tmp_path / "ds.json")}}, "method.deepspeed: no such DeepSpeed config"),
    ]
    for change, message in cases:
        spec = load_spec(data={**ok, **{k: {**ok.get(k, {}), **v} for k, v in change.items()}})
        with pytest.raises(SpecError, match=message):
            preflight(spec, storage_probe=False)
    result = run_cli("validate", "configs/quickstart.yaml", f"data.train={tmp_path / 'missing.jsonl'}")
    assert result.returncode == 2 and "no such file or directory" in result.stdout, result.stdout


@pytest.mark.parametrize("command", ["train", "prepare"])
def test_a_mistyped_path_fails_before_ray_starts(tmp_path: Path, command: str) -> None:
    """The commands that run a job check the rest of preflight while Ray starts; the files are
    checked before, so that a typo costs no Ray start-up."""
    result = run_cli(command, "configs/quickstart.yaml", f"data.train={tmp_path / 'missing.jsonl'}")
    assert result.returncode == 2 and "data.train.0.path: no such file or directory" in result.stdout, result.stdout
    assert "ray:" not in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_a_template_problem_found_while_ray_starts_is_the_error_shown(tmp_path: Path) -> None:
    result = run_cli("train", "configs/quickstart.yaml", "data.template=chatmll", f"run.storage_path={tmp_path}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "data.template: unknown template 'chatmll'" in result.stdout, result.stdout
    assert "Traceback" not in result.stdout + result.stderr and not list(tmp_path.iterdir())  # nothing ran


def test_an_unreachable_object_store_is_named(monkeypatch: pytest.MonkeyPatch, data: Path) -> None:
    from rayft.train.preflight import check_storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    spec = load_spec(data=base(data, run={"storage_path": "s3://bucket/runs"}))
    with pytest.raises(
        SpecError,
        match=r"run.storage_path: (cannot reach|.* did not answer).* s3://bucket/runs"
        r"|run.storage_path: cannot reach s3://bucket/runs",
    ):
        check_storage(spec)


CUSTOM_MODEL = """
from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "rayft_custom"


class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig
"""


def test_trust_remote_code_reaches_generation_and_nothing_prompts(tiny_llama: Path, tmp_path: Path) -> None:
    """A model with its own code loads for evaluation, generate, chat and export only when the
    spec says trust_remote_code; otherwise the error says so (and nothing asks on the terminal)."""
    import shutil

    from rayft.model.trained import load_for_generation

    model = Path(shutil.copytree(tiny_llama, tmp_path / "custom"))
    (model / "custom_model.py").write_text(CUSTOM_MODEL)
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="rayft_custom",
        auto_map={"AutoConfig": "custom_model.CustomConfig", "AutoModelForCausalLM": "custom_model.CustomModel"},
    )
    (model / "config.json").write_text(json.dumps(config))
    spec = {"model": {"path": str(model)}, "data": {"train": "d.jsonl"}}
    with pytest.raises(ModelError, match="trust_remote_code"):
        load_for_generation(str(model), None, load_spec(data=spec))
    loaded, _ = load_for_generation(
        str(model), None, load_spec(data={**spec, "model": {**spec["model"], "trust_remote_code": True}})
    )
    assert type(loaded).__name__ == "CustomModel"
