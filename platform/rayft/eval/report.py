"""The run report: what the fine-tune did, in numbers and pictures, next to the run in storage.

Built only from the run directory's files (spec.yaml, summary.json, metrics.jsonl, eval.json,
lm_eval.json), so `rayft report RUN` rebuilds it at any time, on any machine that reaches the
storage. Writes <run>/report/report.md (images linked relative), report.html (images embedded,
so the one file opens offline anywhere) and the PNGs: loss curves, learning rate, tokens/s.

Overfitting rule (`overfitting`): over the last 3 evaluations, each eval loss is higher than
the one before and the last is at least 1% above the first, while the train loss fell: its
mean over the steps after the second-to-last evaluation is lower than its mean over the steps
up to the first of the three (since the evaluation before it, if any).
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayft import storage
from rayft.errors import RunNotFound
from rayft.eval.figures import OVERFIT_WINDOW, Curves, Point, figures, finite
from rayft.rundir import HF_CHECKPOINT, RunDir
from rayft.train.result import wall_time_line

OVERFIT_MIN_RISE = 0.01  # relative rise of the eval loss over the window
SAMPLE_ROWS = 12  # held-out answers shown in the report


@dataclass
class Report:
    markdown: str
    html: str
    images: list[str]
    overfitting: str | None  # why the run looks overfitted, or None


# ------------------------------------------------------------------------------ run files
def read_run(run_dir: RunDir) -> dict[str, Any]:
    """The run's files that a report uses; missing ones are None (a run still training has no
    summary, one trained with --no-compare no eval.json)."""
    found = {
        "spec": storage.read_text(run_dir.spec),
        "summary": storage.read_text(run_dir.summary),
        "metrics": storage.read_text(run_dir.metrics),
        "eval": storage.read_text(run_dir.eval_result()),
        "lm_eval": storage.read_text(run_dir.lm_eval),
    }
    if not any(found[name] for name in ("summary", "metrics", "eval")):
        raise RunNotFound(
            f"{run_dir.path}: no summary.json, metrics.jsonl or eval.json there; "
            "expected a run directory (<run.storage_path>/<run.name>)"
        )
    lines = found["metrics"]
    metrics = (
        [json.loads(line) for line in lines.splitlines() if line.strip()] if lines else _trainer_log_history(run_dir)
    )
    return {
        "spec": found["spec"],
        "metrics": metrics,
        **{name: json.loads(text) if (text := found[name]) else None for name in ("summary", "eval", "lm_eval")},
    }


def _trainer_log_history(run_dir: RunDir) -> list[dict[str, Any]]:
    """Runs without metrics.jsonl: the HF trainer's log history in the latest local checkpoint
    (steps and values, no wall times)."""
    if run_dir.remote:
        return []
    states = sorted(Path(run_dir.path).glob(f"checkpoint_*/{HF_CHECKPOINT}/trainer_state.json"))
    return json.loads(states[-1].read_text()).get("log_history", []) if states else []


def curves(metrics: Sequence[dict[str, Any]]) -> Curves:
    out = Curves()
    evals: dict[float, float] = {}
    previous: tuple[float, float] | None = None  # (time, tokens so far) at the last train log
    for line in metrics:
        step = line.get("step")
        if step is None:
            continue
        if finite(line.get("loss")):
            out.train.append((step, line["loss"]))
            if finite(line.get("tokens_per_second")) and finite(line.get("time")):
                out.throughput.append((line["time"], line["tokens_per_second"]))
            # TRL logs the tokens seen so far (all workers): their rate between logs shows
            # slow-downs that the mean since the start smooths away
            if finite(line.get("num_tokens")) and finite(line.get("time")):
                now = (line["time"], line["num_tokens"])
                if previous and now[0] > previous[0] and now[1] >= previous[1]:
                    out.interval_throughput.append((now[0], (now[1] - previous[1]) / (now[0] - previous[0])))
                previous = now
        if finite(line.get("learning_rate")):
            out.learning_rate.append((step, line["learning_rate"]))
        if finite(line.get("eval_loss")):
            evals[step] = line["eval_loss"]  # the final evaluation repeats the last step's: keep one
    out.eval = sorted(evals.items())
    return out


# ---------------------------------------------------------------------------- overfitting
def overfitting(
    train: Sequence[Point], evals: Sequence[Point], window: int = OVERFIT_WINDOW, min_rise: float = OVERFIT_MIN_RISE
) -> str | None:
    """Eval loss rising while train loss falls (the rule in the module docstring); returns
    what was seen, or None."""
    if len(evals) < window:
        return None
    last = list(evals[-window:])
    losses = [loss for _, loss in last]
    rising = all(b > a for a, b in zip(losses, losses[1:])) and losses[-1] >= losses[0] * (1 + min_rise)
    if not rising:
        return None
    first_step, last_step = last[0][0], last[-1][0]
    previous_step = evals[-window - 1][0] if len(evals) > window else float("-inf")
    before = [loss for step, loss in train if previous_step < step <= first_step]
    after = [loss for step, loss in train if last[-2][0] < step <= last_step]
    if not before or not after or _mean(after) >= _mean(before):
        return None
    best_step, best = min(evals, key=lambda point: point[1])
    return (
        f"eval loss rose over the last {window} evaluations, {losses[0]:.4f} -> {losses[-1]:.4f} "
        f"(steps {first_step:g}-{last_step:g}), while the train loss fell ({_mean(before):.4f} -> "
        f"{_mean(after):.4f}): the model is memorizing the training data. The best eval loss, "
        f"{best:.4f}, was at step {best_step:g}: prefer that checkpoint, or train fewer steps, "
        "with a lower learning rate or more data."
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


# --------------------------------------------------------------------------------- blocks
# The report is a list of blocks, rendered once as markdown and once as HTML:
# ("h", level, text) ("p", text) ("table", header, rows) ("img", file, caption) ("code", text[, language])
Block = tuple


def blocks(run_dir: str, run: dict[str, Any], found: Curves, flagged: str | None, images: Sequence[str]) -> list[Block]:
    summary, evaluation = run.get("summary") or {}, run.get("eval") or {}
    name = summary.get("name") or os.path.basename(run_dir.rstrip("/"))
    out: list[Block] = [("h", 1, f"Fine-tuning report: {name}"), ("p", f"Run directory: `{run_dir}`")]
    out.append(("p", f"**Overfitting: flagged.** {flagged}" if flagged else _no_overfitting_note(found)))
    if summary:
        out += [("h", 2, "Summary"), ("table", ["", "value"], _summary_rows(summary))]
    out += _held_out_loss_blocks(evaluation.get("loss") or {})
    out += _generation_blocks(evaluation)
    out += _harness_blocks(run.get("lm_eval") or {})
    if images:
        out.append(("h", 2, "Training curves"))
        captions = {
            "loss.png": "Train and eval loss",
            "learning_rate.png": "Learning-rate schedule",
            "throughput.png": "Tokens per second over time",
        }
        out += [("img", image, captions.get(image, image)) for image in images]
    if run.get("spec"):
        out += [("h", 2, "Resolved spec"), ("code", run["spec"].rstrip())]
    return out


def _no_overfitting_note(found: Curves) -> str:
    if len(found.eval) < OVERFIT_WINDOW:
        return (
            f"Overfitting: not assessed ({len(found.eval)} evaluation(s); the check needs {OVERFIT_WINDOW}: "
            "set train.eval_every lower)."
        )
    best_step, best = min(found.eval, key=lambda point: point[1])
    last_step, last = found.eval[-1]
    note = f"Overfitting: not flagged (eval loss {last:.4f} at the last evaluation, step {last_step:g}"
    if last > best:
        note += f"; its best was {best:.4f} at step {best_step:g}"
    return note + ")."


def _summary_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = [
        ["train loss", _num(summary.get("train_loss"))],
        ["eval loss (trainer, last evaluation)", _num(summary.get("eval_loss"))],
        [
            "steps",
            f"{summary.get('steps', '-')}"
            + (f" (resumed from step {summary['resumed_from_step']})" if summary.get("resumed_from_step") else ""),
        ],
        ["tokens", f"{summary.get('tokens', 0):,} ({summary.get('trained_tokens', 0):,} trained)"],
        ["throughput", f"{summary.get('tokens_per_second', 0):,.0f} tokens/s"],
        ["wall time", wall_time_line(summary)],
        ["base model", f"`{summary.get('base_model_dir') or '-'}`"],
        ["tuned model", f"`{summary.get('model_dir') or '-'}`"],
        ["checkpoint", f"`{summary.get('checkpoint') or '-'}`"],
    ]
    if summary.get("wandb"):
        rows.append(["wandb", summary["wandb"]])
    return rows


def _held_out_loss_blocks(loss: dict[str, dict[str, Any]]) -> list[Block]:
    if not loss:
        return []
    rows = [
        [label, _num(r["loss"]), _num(r["perplexity"], 3), f"{r['rows']:,}", f"{r['tokens']:,}"]
        for label, r in loss.items()
    ]
    out: list[Block] = [
        ("h", 2, "Held-out loss and perplexity"),
        ("table", ["model", "loss", "perplexity", "rows", "trained tokens"], rows),
    ]
    notes = [
        "Token-weighted mean cross-entropy over every trained token of the eval split (labels of -100 "
        "masked, as in training); perplexity = exp(loss). The trainer's eval loss averages batch means, "
        "so it can differ a little."
    ]
    if "base" in loss and "tuned" in loss:
        base, tuned = loss["base"], loss["tuned"]
        if (base["tokens"], base.get("tokens_digest")) == (tuned["tokens"], tuned.get("tokens_digest")):
            notes.append("Both models were scored on exactly the same tokens.")
        else:
            notes.append("**Warning: base and tuned were scored on different tokens; they do not compare.**")
        if base["loss"] and finite(base["loss"]) and finite(tuned["loss"]):
            notes.append(
                f"Tuned vs base: loss {tuned['loss'] - base['loss']:+.4f} "
                f"({(tuned['loss'] - base['loss']) / base['loss']:+.1%}), perplexity "
                f"{base['perplexity']:.3f} -> {tuned['perplexity']:.3f}."
            )
    return out + [("p", " ".join(notes))]


def _generation_blocks(evaluation: dict[str, Any]) -> list[Block]:
    scores, rows = evaluation.get("scores") or {}, evaluation.get("rows") or []
    if not scores:
        return []
    labels = list(scores)
    metrics = list(dict.fromkeys(m for label in labels for m in scores[label]))
    table = [[metric, *[_percent(scores[label].get(metric)) for label in labels]] for metric in metrics]
    out: list[Block] = [
        ("h", 2, f"Held-out generation ({len(rows)} prompts)"),
        ("table", ["metric", *labels], table),
        (
            "p",
            "exact_match and contains compare normalized text (lowercase, no punctuation or "
            "articles); rouge_l and token_f1 are word-overlap F1 scores; stop_rate is the share "
            "of answers that ended on the end-of-turn token by themselves.",
        ),
    ]
    if rows:
        shown = rows[:SAMPLE_ROWS]
        out += [
            ("h", 3, f"Answers ({len(shown)} of {len(rows)})"),
            (
                "table",
                ["prompt", "reference", *labels],
                [
                    [
                        _clip(r.get("prompt")),
                        _clip(r.get("reference")) or "-",
                        *[_clip(r.get(label)) or "(empty)" for label in labels],
                    ]
                    for r in shown
                ],
            ),
        ]
    return out


def _harness_blocks(results: dict[str, Any]) -> list[Block]:
    """lm_eval.json: label -> task -> metric -> value (see rayft.eval.harness)."""
    if not results:
        return []
    labels = list(results)
    keys = list(
        dict.fromkeys(
            (task, metric) for label in labels for task, metrics in results[label].items() for metric in metrics
        )
    )
    rows = [
        [task, metric, *[_num(results[label].get(task, {}).get(metric)) for label in labels]] for task, metric in keys
    ]
    return [("h", 2, "lm-evaluation-harness"), ("table", ["task", "metric", *labels], rows)]


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if finite(value) else "-"


def _percent(value: Any) -> str:
    return f"{value:.1%}" if finite(value) else "-"


def _clip(text: Any, limit: int = 200) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------ rendering
def to_markdown(content: Sequence[Block]) -> str:
    parts = []
    for block in content:
        kind = block[0]
        if kind == "h":
            parts.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            parts.append(block[1])
        elif kind == "table":
            header, rows = block[1], block[2]
            lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
            parts.append("\n".join(lines))
        elif kind == "img":
            parts.append(f"![{block[2]}]({block[1]})")
        elif kind == "code":  # ("code", text[, language]): YAML unless said
            parts.append(f"```{block[2] if len(block) > 2 else 'yaml'}\n{block[1]}\n```")
    return "\n\n".join(parts) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


STYLE = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}pre{background:#f6f6f6;padding:1em;overflow:auto}
code{background:#f3f3f3;padding:0 3px}figure{margin:0}figcaption{color:#666;font-size:90%}"""


def to_html(content: Sequence[Block], images: dict[str, bytes]) -> str:
    """One self-contained page: the PNGs are embedded as data URIs."""
    body = []
    for block in content:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{_inline(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(images[block[1]]).decode("ascii")
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block[2])}">'
                f"<figcaption>{html.escape(block[2])}</figcaption></figure>"
            )
        elif kind == "code":
            body.append(f"<pre>{html.escape(block[1])}</pre>")
    title = html.escape(next((b[2] for b in content if b[0] == "h"), "rayft report"))
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _inline(text: str) -> str:
    """Markdown's `code` and **bold** in the few places the blocks use them, as HTML."""
    escaped = html.escape(str(text))
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


# ---------------------------------------------------------------------------------- build
def build_report(path: str | os.PathLike) -> Report:
    """Read a run directory, write <run>/report/{report.md, report.html, *.png}."""
    run_dir = RunDir.at(str(path))
    run = read_run(run_dir)
    found = curves(run["metrics"])
    flagged = overfitting(found.train, found.eval)
    images = figures(run, found, flagged)
    content = blocks(run_dir.path, run, found, flagged, list(images))
    out = run_dir.report
    for name, data in images.items():
        storage.write_bytes(f"{out}/{name}", data)
    storage.write_text(f"{out}/report.md", to_markdown(content))
    storage.write_text(f"{out}/report.html", to_html(content, images))
    return Report(f"{out}/report.md", f"{out}/report.html", [f"{out}/{name}" for name in images], flagged)
