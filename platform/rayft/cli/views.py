"""How results look in a terminal: run summaries, base-vs-tuned tables, sweep tables. The
commands in rayft.cli.app compute; these print."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rayft.train.result import wall_time_line

if TYPE_CHECKING:  # the types only: importing them would pull in Ray Train and Tune
    from rayft.eval.compare import Comparison
    from rayft.eval.report import Report
    from rayft.train.result import RunSummary
    from rayft.tune.sweep import SweepResult

console = Console(highlight=False)


def log(message: str) -> None:
    """Plain text from the layers below: paths, specs, library errors. Never read as rich markup,
    whose brackets they contain ("[/__w/.../pair.cc:537]" in a gloo error ended the progress
    printer mid-run)."""
    console.print(message, soft_wrap=True, markup=False)


def print_summary(summary: RunSummary) -> None:
    table = Table(title=f"run {summary.name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("train loss", _num(summary.train_loss)),
        ("eval loss", _num(summary.eval_loss)),
        (
            "steps",
            f"{summary.steps}"
            + (f" (resumed from step {summary.resumed_from_step})" if summary.resumed_from_step else ""),
        ),
        ("tokens", f"{summary.tokens:,} ({summary.trained_tokens:,} trained)"),
        ("throughput", f"{summary.tokens_per_second:,.0f} tokens/s"),
        ("wall time", wall_time_line(summary.to_dict())),
        ("checkpoint", summary.checkpoint or "-"),
        ("model", summary.model_dir or "-"),
    ]
    if summary.wandb:
        rows.append(("wandb", summary.wandb))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def print_comparison(comparison: Comparison, show: int = 12) -> None:
    labels = list(comparison.answers)
    table = Table(title="held-out prompts: base vs tuned", title_justify="left", show_lines=False)
    table.add_column("prompt", max_width=48, overflow="fold")
    table.add_column("reference", max_width=24, overflow="fold", style="green")
    for label in labels:
        table.add_column(label, max_width=32, overflow="fold")
    for i, prompt in enumerate(comparison.prompts[:show]):
        table.add_row(
            prompt.messages[-1]["content"], prompt.reference or "", *[comparison.answers[label][i] for label in labels]
        )
    console.print(table)
    scores = Table(title=f"scores on {len(comparison.prompts)} held-out prompts", title_justify="left")
    scores.add_column("metric")
    for label in labels:
        scores.add_column(label, justify="right")
    for metric in comparison.scores[labels[0]]:
        scores.add_row(metric, *[f"{comparison.scores[label][metric]:.1%}" for label in labels])
    console.print(scores)


def print_sweep(result: SweepResult) -> None:
    table = Table(
        title=f"sweep {result.name}: {len(result.trials)} trials in {result.seconds:.0f}s", title_justify="left"
    )
    table.add_column("trial", no_wrap=True)
    params = sorted({k for t in result.trials for k in t.params})
    for name in params:
        table.add_column(name, justify="right", no_wrap=True)
    for column in (result.metric, "status", "reports", "steps"):
        table.add_column(column, justify="right" if column != "status" else "left", no_wrap=True)
    for trial in sorted(result.trials, key=lambda t: (t.metric is None, t.metric if t.metric is not None else 0)):
        marker = " *" if result.best and trial.name == result.best.name else ""
        table.add_row(
            trial.name + marker,
            *[f"{trial.params.get(k)!r}" for k in params],
            "-" if trial.metric is None else f"{trial.metric:.4f}",
            trial.status,
            str(trial.iterations),
            str(trial.steps),
        )
    console.print(table)
    for trial in result.trials:
        if trial.error:
            console.print(f"[red]{escape(trial.name)} failed[/]: {escape(trial.error)}", soft_wrap=True)
    if result.best_spec_path and result.best:
        log(f"best: {result.best.name} ({result.metric} {result.best.metric:.4f}) -> {result.best_spec_path}")
    if result.plot_path:
        log(f"plot: {result.plot_path}")


def print_held_out_loss(comparison: Comparison) -> None:
    if not comparison.loss:
        log("eval: the data has no held-out split, so no eval loss")
        return
    table = Table(title="held-out loss: base vs tuned, on the same tokens", title_justify="left")
    for column in ("model", "loss", "perplexity", "rows", "trained tokens"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, result in comparison.loss.items():
        table.add_row(label, f"{result.loss:.4f}", f"{result.perplexity:.3f}", f"{result.rows:,}", f"{result.tokens:,}")
    console.print(table)


def print_report_written(result: Report) -> None:
    log(f"report: {result.markdown}\nreport: {result.html}")
    if result.overfitting:
        console.print(f"[bold yellow]overfitting[/]: {escape(result.overfitting)}", soft_wrap=True)
    else:
        log("overfitting: not flagged")


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"
