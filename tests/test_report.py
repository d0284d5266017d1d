"""The run report from a run directory's files: numbers, pictures, the overfitting flag, and
`rayft report RUN`. Synthetic run directories, so these run in seconds; the report of a real
training run is checked in test_evaluate.py."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import run_cli
from rayft.errors import RunNotFound
from rayft.eval.figures import plot_png
from rayft.eval.report import build_report, curves, overfitting

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 40


def metrics_lines(train_loss: Any, eval_loss: Any, eval_every: int = 5) -> list[dict[str, Any]]:
    """What MetricsTimeline writes: a train line per step, an eval line every `eval_every`
    steps, the final evaluation again at the last step, and the train_loss line."""
    lines = []
    for step in range(1, STEPS + 1):
        lines.append(
            {
                "step": step,
                "time": 1.5 * step,
                "epoch": step / STEPS,
                "tokens_per_second": 900 + 5 * step,
                "loss": train_loss(step),
                "grad_norm": 1.0,
                "num_tokens": 1200.0 * step,
                "learning_rate": 1e-3 * min(1.0, step / 4) * (1 - step / (STEPS + 1)),
            }
        )
        if step % eval_every == 0:
            lines.append(
                {
                    "step": step,
                    "time": 1.5 * step + 0.2,
                    "epoch": step / STEPS,
                    "tokens_per_second": 880.0,
                    "eval_loss": eval_loss(step),
                    "eval_runtime": 0.2,
                }
            )
    lines.append({"step": STEPS, "time": 61.0, "epoch": 1.0, "tokens_per_second": 870.0, "eval_loss": eval_loss(STEPS)})
    lines.append(
        {
            "step": STEPS,
            "time": 61.0,
            "epoch": 1.0,
            "tokens_per_second": 870.0,
            "train_loss": 1.7,
            "train_runtime": 60.0,
        }
    )
    return lines


HEALTHY = metrics_lines(lambda s: 3.0 * math.exp(-s / 15) + 0.5, lambda s: 3.1 * math.exp(-s / 15) + 0.6)
# Train loss keeps falling; eval loss bottoms out at step 20 and then rises.
OVERFIT = metrics_lines(lambda s: 3.0 * math.exp(-s / 10) + 0.1, lambda s: 1.2 + 0.002 * (s - 20) ** 2)

SUMMARY = {
    "name": "report-demo",
    "run_dir": "",
    "train_loss": 1.2345,
    "eval_loss": 1.3456,
    "steps": STEPS,
    "tokens": 123456,
    "trained_tokens": 45678,
    "tokens_per_second": 987.6,
    "startup_seconds": 30.2,
    "train_seconds": 60.0,
    "total_seconds": 95.0,
    "checkpoint": "/x/checkpoint_000040",
    "model_dir": "/x/model",
    "resumed_from_step": 0,
    "wandb": None,
    "base_model_dir": "/models/base",
    "prepared": "/x/prepared/abc",
    "chat_template": "{{ x }}",
}
EVAL = {
    "scores": {
        "base": {"exact_match": 0.0, "contains": 0.25, "rouge_l": 0.1, "stop_rate": 0.5},
        "tuned": {"exact_match": 0.75, "contains": 0.75, "rouge_l": 0.8, "stop_rate": 1.0},
    },
    "rows": [
        {"prompt": "What is 2 | 3?", "reference": "5", "base": "the the the", "tuned": "5"},
        {"prompt": "Capital of France?", "reference": "Paris", "base": "Lyon\nmaybe", "tuned": "Paris"},
    ],
    "loss": {
        "base": {
            "loss": 2.3456,
            "perplexity": math.exp(2.3456),
            "rows": 16,
            "tokens": 321,
            "tokens_digest": "abc",
            "shards": 1,
        },
        "tuned": {
            "loss": 0.9876,
            "perplexity": math.exp(0.9876),
            "rows": 16,
            "tokens": 321,
            "tokens_digest": "abc",
            "shards": 1,
        },
    },
}


def write_run(root: Path, metrics: list[dict[str, Any]], *, summary: bool = True, evaluation: bool = True) -> Path:
    run = root / "report-demo"
    run.mkdir(parents=True)
    (run / "spec.yaml").write_text(yaml.safe_dump({"model": {"path": "/models/base"}, "train": {"max_steps": STEPS}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in metrics))
    if summary:
        (run / "summary.json").write_text(json.dumps({**SUMMARY, "run_dir": str(run)}))
    if evaluation:
        (run / "eval.json").write_text(json.dumps(EVAL))
    return run


def assert_png(path: Path) -> tuple[int, int]:
    from PIL import Image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width >= 400 and height >= 200
    return width, height


# ----------------------------------------------------------------------------- overfitting
def test_eval_rising_while_train_falls_is_flagged() -> None:
    found = curves(OVERFIT)
    message = overfitting(found.train, found.eval)
    assert message and "eval loss rose" in message
    assert "step 20" in message  # where the best eval loss was


def test_healthy_run_is_not_flagged() -> None:
    found = curves(HEALTHY)
    assert overfitting(found.train, found.eval) is None


def test_rising_eval_with_rising_train_is_not_overfitting() -> None:
    """Both rising is divergence (e.g. a learning rate too high), not memorization."""
    lines = metrics_lines(lambda s: 1.0 + s / 10, lambda s: 1.0 + s / 8)
    found = curves(lines)
    assert overfitting(found.train, found.eval) is None


def test_noise_below_the_threshold_is_not_flagged() -> None:
    train = [(float(s), 2.0 - s / 100) for s in range(1, 41)]
    evals = [(10.0, 1.500), (20.0, 1.501), (30.0, 1.502), (40.0, 1.503)]  # +0.2%: noise
    assert overfitting(train, evals) is None
    assert overfitting(train, evals[:2] + [(30.0, 1.52), (40.0, 1.56)])


def test_curves_keep_one_eval_point_per_step() -> None:
    found = curves(HEALTHY)
    steps = [step for step, _ in found.eval]
    assert steps == sorted(set(steps)) == list(range(5, STEPS + 1, 5))
    assert len(found.train) == len(found.learning_rate) == len(found.throughput) == STEPS
    # tokens between logs over the time between them: 1200 tokens every 1.5 s
    assert [rate for _, rate in found.interval_throughput] == pytest.approx([800.0] * (STEPS - 1))


# ---------------------------------------------------------------------------------- report
def test_report_files_hold_the_numbers_and_figures(tmp_path: Path) -> None:
    run = write_run(tmp_path, HEALTHY)
    report = build_report(run)
    out = run / "report"
    assert Path(report.markdown) == out / "report.md" and Path(report.html) == out / "report.html"
    assert report.overfitting is None
    for name in ("loss.png", "learning_rate.png", "throughput.png"):
        assert_png(out / name)
    markdown = (out / "report.md").read_text()
    # summary.json's figures
    for text in ("1.2345", "1.3456", "123,456", "45,678", "988 tokens/s", "`/x/model`"):
        assert text in markdown, text
    # eval.json's: held-out loss and perplexity, base vs tuned, generation scores, answers
    for text in (
        "2.3456",
        "0.9876",
        f"{math.exp(2.3456):.3f}",
        f"{math.exp(0.9876):.3f}",
        "75.0%",
        "100.0%",
        "same tokens",
        "Capital of France?",
    ):
        assert text in markdown, text
    assert "What is 2 \\| 3?" in markdown  # a pipe in an answer does not break the table
    assert "Lyon maybe" in markdown  # nor does a newline
    for name in ("loss.png", "learning_rate.png", "throughput.png"):
        assert f"]({name})" in markdown
    assert "Overfitting: not flagged" in markdown
    assert "max_steps: 40" in markdown  # the resolved spec


def test_html_is_self_contained_with_valid_images(tmp_path: Path) -> None:
    from PIL import Image

    run = write_run(tmp_path, HEALTHY)
    build_report(run)
    page = (run / "report" / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    for index, data in enumerate(images):
        raw = base64.b64decode(data)
        assert raw.startswith(PNG_SIGNATURE)
        (tmp_path / f"{index}.png").write_bytes(raw)
        with Image.open(tmp_path / f"{index}.png") as image:
            assert image.size[0] >= 400
    assert 'src="http' not in page and "<script" not in page  # opens offline
    assert "0.9876" in page and "<table>" in page and "What is 2 | 3?" in page


def test_overfitted_run_is_flagged_in_the_report(tmp_path: Path) -> None:
    run = write_run(tmp_path, OVERFIT)
    report = build_report(run)
    markdown = (run / "report" / "report.md").read_text()
    assert report.overfitting and "**Overfitting: flagged.**" in markdown
    assert "<strong>Overfitting: flagged.</strong>" in (run / "report" / "report.html").read_text()
    assert_png(run / "report" / "loss.png")


def test_report_of_a_run_still_training(tmp_path: Path) -> None:
    """No summary.json or eval.json yet: curves only."""
    run = write_run(tmp_path, HEALTHY[:12], summary=False, evaluation=False)
    report = build_report(run)
    markdown = Path(report.markdown).read_text()
    assert "Held-out" not in markdown and "## Summary" not in markdown
    assert "not assessed" in markdown  # two evaluations are too few to judge overfitting
    assert_png(run / "report" / "loss.png")


def test_not_a_run_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RunNotFound, match="no summary.json, metrics.jsonl or eval.json"):
        build_report(tmp_path)


def test_plot_renders_headless() -> None:
    data = plot_png(
        {"a": [(1, 2.0), (2, 1.0)], "b": [(1, 2.5)]},
        title="t",
        xlabel="x",
        ylabel="y",
        hlines={"h": 1.5},
        shade=(1, 2),
        log_y=True,
    )
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


def test_rayft_report_rebuilds_the_report(tmp_path: Path) -> None:
    run = write_run(tmp_path, OVERFIT)
    result = run_cli("report", str(run))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (run / "report" / "report.md").is_file() and (run / "report" / "report.html").is_file()
    assert_png(run / "report" / "loss.png")
    assert "report.md" in result.stdout and "overfitting" in result.stdout.lower()
    missing = run_cli("report", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no summary.json" in missing.stdout


def test_report_through_a_filesystem_uri(tmp_path: Path) -> None:
    """Object storage goes through pyarrow's filesystems; file:// takes the same code path."""
    run = write_run(tmp_path, HEALTHY)
    report = build_report(f"file://{run}")
    assert report.markdown == f"file://{run}/report/report.md"
    assert (run / "report" / "report.md").is_file()
    assert_png(run / "report" / "loss.png")


def test_lm_eval_results_are_in_the_report(tmp_path: Path) -> None:
    run = write_run(tmp_path, HEALTHY)
    (run / "lm_eval.json").write_text(
        json.dumps({"base": {"tiny_choice": {"acc": 0.25}}, "tuned": {"tiny_choice": {"acc": 0.75}}})
    )
    markdown = Path(build_report(run).markdown).read_text()
    assert "## lm-evaluation-harness" in markdown and "| tiny_choice | acc | 0.2500 | 0.7500 |" in markdown
