"""Evaluation: held-out loss and perplexity that compare (same tokens, same masking, exact when
sharded), generation scores, `rayft eval`'s driver, the report of a real run, and the
lm-evaluation-harness integration. One training run on a real local Ray cluster serves them all."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from conftest import spec_dict
from rayft.eval.loss import HeldOutLoss, row_losses
from rayft.eval.scoring import normalize, rouge_l, score, token_f1
from rayft.eval.tasks import shard_count, shard_ranges
from rayft.spec import load_spec

STEPS = 8


# ----------------------------------------------------------------------- scoring (fast)
def test_scores() -> None:
    assert normalize("  The Answer, is: PARIS! ") == "answer is paris"
    assert score("Paris.", "paris", "exact_match") == 1.0
    assert score("It is Paris", "paris", "exact_match") == 0.0
    assert score("It is Paris", "paris", "contains") == 1.0
    assert rouge_l("x y z w", "x z w") == pytest.approx(2 * (3 / 4) * 1.0 / (3 / 4 + 1.0))
    assert rouge_l("a b c", "b c") == 1.0  # "a" is an article: normalized away
    assert rouge_l("x y z", "x y z") == 1.0 and rouge_l("x", "y") == 0.0
    assert token_f1("cat sat mat", "cat mat hat") == pytest.approx(2 / 3)


# ------------------------------------------------------------------- token losses (fast)
def reference_loss(model: Any, rows: list[dict[str, Any]]) -> tuple[float, int]:
    """Independent of rayft: a plain HF forward with labels, one row at a time. The model's
    loss is the mean over the row's trained tokens, so the sum is mean x count."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            if n:
                total += model(input_ids=ids, labels=labels).loss.item() * n
                count += n
    return total, count


def random_rows(vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    import random

    rng = random.Random(seed)
    rows = []
    for length in (5, 17, 9, 30, 12, 3, 21):  # uneven: batches are padded
        ids = [rng.randrange(5, vocab) for _ in range(length)]
        start = length // 3  # a prompt without loss, then the reply
        rows.append({"input_ids": ids, "labels": [-100] * start + ids[start:], "seq_lengths": [length]})
    return rows


def test_row_losses_equal_a_plain_hf_forward(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    rows = random_rows(model.config.vocab_size)
    expected_sum, expected_count = reference_loss(model, rows)
    for batch_size in (1, 3, 8):
        result = HeldOutLoss.combine(row_losses(model, rows, batch_size))
        assert result.tokens == expected_count
        assert result.loss == pytest.approx(expected_sum / expected_count, rel=1e-5)
        assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-12)


def test_a_packed_row_is_scored_sample_by_sample(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    a, b = random_rows(model.config.vocab_size)[:2]
    packed = {
        "input_ids": a["input_ids"] + b["input_ids"],
        "labels": a["labels"] + b["labels"],
        "seq_lengths": [len(a["input_ids"]), len(b["input_ids"])],
    }
    alone = row_losses(model, [a, b])
    together = row_losses(model, [packed])
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.nll for r in together] == pytest.approx([r.nll for r in alone], rel=1e-5)


def test_shard_ranges_cover_all_rows_on_batch_boundaries() -> None:
    for rows, shards, batch in [(16, 4, 4), (16, 3, 4), (103, 5, 8), (5, 8, 4), (1, 1, 4)]:
        ranges = shard_ranges(rows, shards, batch)
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        assert all(end == start for (_, end), (start, _) in zip(ranges, ranges[1:]))
        assert all(start % batch == 0 for start, _ in ranges) and len(ranges) <= shards


def test_shard_count_follows_the_data_and_the_cluster(
    monkeypatch: pytest.MonkeyPatch, tiny_llama: Path, chat_data: dict[str, Path], tmp_path: Path
) -> None:
    import ray

    cpu = load_spec(data=spec_dict(tiny_llama, chat_data, tmp_path))
    gpu = load_spec(data=spec_dict(tiny_llama, chat_data, tmp_path, scaling={"use_gpu": True}))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 4.0})
    assert shard_count(20, 32, 2, cpu) == 1  # small: one task per model
    assert shard_count(1000, 32, 2, cpu) == 8  # large: 16 CPUs shared by 2 models
    assert shard_count(100, 32, 2, cpu) == 3  # at least 32 prompts a task
    assert shard_count(1000, 32, 2, gpu) == 2  # 4 GPUs shared by 2 models


# ------------------------------------------------------------------- a real run (slow)
@pytest.fixture(scope="module")
def run(
    ray_cluster: Any, tiny_llama: Path, chat_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    from rayft.eval.compare import before_after
    from rayft.train.driver import fit
    from rayft.train.run import plan_run

    storage = tmp_path_factory.mktemp("runs")
    spec = load_spec(
        data=spec_dict(
            tiny_llama,
            chat_data,
            storage,
            run={"name": "eval-run"},
            train={"max_steps": STEPS, "eval_every": 2, "save_every": 4, "learning_rate": 1e-2},
            eval={"num_prompts": 4, "max_new_tokens": 8},
        )
    )
    plan = plan_run(spec, log=lambda _: None)
    summary = fit(plan, log=lambda _: None)
    comparison = before_after(plan, summary)
    return {"spec": spec, "plan": plan, "summary": summary, "comparison": comparison}


def eval_split(summary: Any) -> Any:
    from rayft.data.prepared import Prepared, load_split

    return load_split(Prepared.read(summary.prepared), "eval")


@pytest.mark.slow
def test_perplexity_is_exp_of_the_masked_mean_loss(run: dict[str, Any], tiny_llama: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary, loss = run["summary"], run["comparison"].loss
    rows = list(eval_split(summary))
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), summary.model_dir)
    for label, model in (("base", AutoModelForCausalLM.from_pretrained(tiny_llama)), ("tuned", tuned)):
        total, count = reference_loss(model.eval(), rows)
        assert loss[label].tokens == count
        assert loss[label].loss == pytest.approx(total / count, rel=1e-5), label
        assert loss[label].perplexity == pytest.approx(math.exp(total / count), rel=1e-5), label
    assert loss["tuned"].loss < loss["base"].loss, "training did not lower the held-out loss"


@pytest.mark.slow
def test_base_and_tuned_are_scored_on_the_same_tokens(run: dict[str, Any]) -> None:
    base, tuned = run["comparison"].loss["base"], run["comparison"].loss["tuned"]
    rows = eval_split(run["summary"])
    trained = sum(sum(1 for label in row["labels"][1:] if label != -100) for row in rows)
    assert base.rows == tuned.rows == len(rows) > 0
    assert base.tokens == tuned.tokens == trained > 0
    assert base.tokens_digest == tuned.tokens_digest


@pytest.mark.slow
def test_sharded_loss_equals_unsharded_loss(run: dict[str, Any], tiny_llama: Path) -> None:
    from rayft.eval.loss import held_out_loss

    spec = run["spec"]
    one = run["comparison"].loss["base"]
    four = held_out_loss(spec, {"base": (str(tiny_llama), None)}, run["plan"].prepared, shards=4)["base"]
    assert (one.shards, four.shards) == (1, 4)
    assert (four.rows, four.tokens, four.tokens_digest) == (one.rows, one.tokens, one.tokens_digest)
    assert four.loss == one.loss  # same batches, exact sums: not just close


@pytest.mark.slow
def test_eval_json_holds_loss_scores_and_answers(run: dict[str, Any]) -> None:
    saved = json.loads((Path(run["summary"].run_dir) / "eval.json").read_text())
    assert set(saved["loss"]) == {"base", "tuned"}
    for label in ("base", "tuned"):
        assert saved["loss"][label]["perplexity"] == pytest.approx(math.exp(saved["loss"][label]["loss"]))
        assert set(saved["scores"][label]) == {"exact_match", "contains", "rouge_l", "stop_rate"}
    assert len(saved["rows"]) == 4 and all(row["reference"] and "tuned" in row for row in saved["rows"])


@pytest.mark.slow
def test_evaluate_run_on_the_final_model_and_on_a_checkpoint(run: dict[str, Any]) -> None:
    """`rayft eval SPEC [--checkpoint PATH]`: data from the cache, the same numbers as at the
    end of training for the final model, other numbers for an earlier checkpoint. The
    checkpoint is given as a URI: the object-storage path (download where the task runs)."""
    from rayft.eval.compare import evaluate_run
    from rayft.train.run import plan_run

    spec, summary = run["spec"], run["summary"]
    lines: list[str] = []
    plan = plan_run(spec, log=lines.append, resume=False)
    final, path = evaluate_run(plan)
    assert path == f"{summary.run_dir}/eval.json"
    assert any("reusing prepared data" in line for line in lines)
    assert final.loss["tuned"].loss == pytest.approx(run["comparison"].loss["tuned"].loss, rel=1e-9)
    checkpoint = Path(summary.run_dir) / "checkpoint_000004"
    earlier, path = evaluate_run(plan, f"file://{checkpoint}")
    assert path == f"{summary.run_dir}/eval-checkpoint_000004.json" and Path(path).is_file()
    assert earlier.loss["base"].loss == final.loss["base"].loss
    assert earlier.loss["tuned"].loss != final.loss["tuned"].loss


@pytest.mark.slow
def test_evaluate_run_without_a_trained_model_says_so(run: dict[str, Any], tmp_path: Path) -> None:
    from rayft.errors import ModelError
    from rayft.eval.compare import evaluate_run
    from rayft.train.run import plan_run

    spec = run["spec"].model_copy(deep=True)
    spec.run.name = "never-trained"
    with pytest.raises(ModelError, match="never-trained/model does not exist: train it first"):
        evaluate_run(plan_run(spec, log=lambda _: None, resume=False))


@pytest.mark.slow
def test_report_of_the_real_run(run: dict[str, Any]) -> None:
    from PIL import Image

    from rayft.eval.report import build_report

    summary, loss = run["summary"], run["comparison"].loss
    report = build_report(summary.run_dir)
    markdown = Path(report.markdown).read_text()
    for text in (
        f"{summary.train_loss:.4f}",
        f"{loss['base'].loss:.4f}",
        f"{loss['tuned'].loss:.4f}",
        f"{loss['base'].perplexity:.3f}",
        f"{loss['tuned'].perplexity:.3f}",
        "same tokens",
    ):
        assert text in markdown, text
    assert len(report.images) == 3
    for image in report.images:
        with Image.open(image) as png:
            assert png.format == "PNG" and png.size[0] >= 400
    page = Path(report.html).read_text()
    assert page.count("data:image/png;base64,") == 3


# -------------------------------------------------------------- lm-evaluation-harness
HARNESS_TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def multiple_choice_accuracy(model: Any, tokenizer: Any, questions: list[dict[str, Any]]) -> float:
    """What the harness's multiple_choice `acc` is, computed without it: the choice whose tokens
    (after the question and a space) have the highest summed log-likelihood, against the label."""
    import torch

    correct = 0
    for question in questions:
        scores = []
        for choice in question["choices"]:
            context = tokenizer(question["question"], add_special_tokens=False)["input_ids"]
            whole = tokenizer(question["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = model(input_ids=torch.tensor([whole])).logits.log_softmax(-1)[0]
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == question["label"])
    return correct / len(questions)


@pytest.mark.slow
def test_lm_eval_harness_on_a_local_task(run: dict[str, Any], tiny_llama: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from rayft.eval.harness import HarnessError, compare_on_tasks

    questions = [
        {"question": "What is 2 plus 2?", "choices": ["4", "5", "22"], "label": 0},
        {"question": "What is the capital of France?", "choices": ["Paris", "Rome"], "label": 0},
        {"question": "What is 3 times 3?", "choices": ["6", "9"], "label": 1},
    ]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (tmp_path / "tiny_choice.yaml").write_text(HARNESS_TASK.format(data=tmp_path / "tiny.jsonl"))
    summary = run["summary"]
    results = compare_on_tasks(
        {"base": (str(tiny_llama), None), "tuned": (str(tiny_llama), summary.model_dir)},
        ["tiny_choice"],
        include_path=str(tmp_path),
        batch_size=2,
    )
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    models = {
        "base": AutoModelForCausalLM.from_pretrained(tiny_llama),
        "tuned": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), summary.model_dir),
    }
    for label, model in models.items():
        expected = multiple_choice_accuracy(model.eval(), tokenizer, questions)
        assert results[label]["tiny_choice"]["acc"] == pytest.approx(expected), label
    with pytest.raises(HarnessError, match="not_a_task"):
        compare_on_tasks({"base": (str(tiny_llama), None)}, ["not_a_task"], include_path=str(tmp_path))
