"""`rayft data preview`: processed examples as the model sees them, trained tokens
highlighted, and the statistics of the prepared data.

A row is shown as the template rendered it: system prompt and tool schemas, tool calls, tool
results and reasoning blocks appear where the model sees them, and the trained tokens (replies,
with their reasoning and tool calls as data.train_on says; never tool results) are bold green
on a terminal. Where the output has no colour (piped, NO_COLOR), trained text is put between
TRAINED_OPEN and TRAINED_CLOSE instead, so the highlighting survives a file or a pager.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from rayft.data.prepare import prepare
from rayft.data.prepared import KEPT_CHANGED, dropped
from rayft.data.tokenize import IGNORE
from rayft.model import load_tokenizer, materialized_dir
from rayft.spec import JobSpec
from rayft.storage import filesystem

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


def preview(spec: JobSpec, console: Console, *, count: int = 3, split: str = "train") -> None:
    import pyarrow.parquet as pq

    tokenizer = load_tokenizer(spec, materialized_dir(spec))
    prepared = prepare(spec, tokenizer, log=lambda message: None)
    rows: list[dict[str, Any]] = []
    for path in prepared.files(split):
        fs, inner = filesystem(path)
        table = pq.read_table(inner, filesystem=fs, columns=["input_ids", "labels", "seq_lengths"])
        rows.extend(table.slice(0, count - len(rows)).to_pylist())
        if len(rows) >= count:
            break
    show(console, tokenizer, rows, prepared.stats, split)


def show(console: Console, tokenizer: Any, rows: list[dict[str, Any]], stats: dict[str, Any], split: str) -> None:
    """Rows (input_ids, labels, seq_lengths) as the model sees them, a legend, the statistics."""
    marks = console.color_system is None or console.no_color  # no colour: trained text between marks
    for shown, row in enumerate(rows):
        console.rule(f"{split} row {shown} ({len(row['input_ids'])} tokens, {len(row['seq_lengths'])} sample(s))")
        console.print(render_row(tokenizer, row["input_ids"], row["labels"], row["seq_lengths"], marks=marks))
    console.rule()
    trained = f"{TRAINED_OPEN}trained{TRAINED_CLOSE}" if marks else "trained"
    console.print(
        Text("legend: ", style="bold")
        + Text(trained, style="bold green")
        + Text("  ")
        + Text("context (no loss)", style="dim")
        + Text("  ")
        + Text("| sample boundary", style="bold magenta")
    )
    console.print(stats_table(stats))


def render_row(
    tokenizer: Any, input_ids: list[int], labels: list[int], seq_lengths: list[int], *, marks: bool = False
) -> Text:
    """Trained runs of tokens bold green (and, with marks, between TRAINED_OPEN and
    TRAINED_CLOSE), the rest dim; packed samples separated. Each run is decoded whole, so a
    character of several bytes that BPE split over tokens (an accent, an emoji) shows as itself."""
    text = Text()
    starts, position = [], 0
    for length in seq_lengths[:-1]:
        position += length
        starts.append(position)
    turns = {i for i in range(1, len(labels)) if _on(labels[i]) != _on(labels[i - 1])}
    edges = sorted({0, len(input_ids), *starts, *turns})
    for begin, end in zip(edges, edges[1:]):
        if begin in starts:
            text.append(" | ", style="bold magenta")
        piece = tokenizer.decode(input_ids[begin:end], skip_special_tokens=False)
        if _on(labels[begin]):
            text.append(f"{TRAINED_OPEN}{piece}{TRAINED_CLOSE}" if marks else piece, style="bold green")
        else:
            text.append(piece, style="dim")
    return text


def _on(label: int) -> bool:
    return label != IGNORE


def stats_table(stats: dict[str, Any]) -> Table:
    table = Table(title="prepared data", title_justify="left")
    table.add_column("")
    table.add_column("train", justify="right")
    table.add_column("eval", justify="right")
    train, evals = stats["splits"]["train"], stats["splits"]["eval"]
    for label, key in (
        ("samples", "samples"),
        ("rows", "rows"),
        ("tokens", "tokens"),
        ("trained tokens", "trained_tokens"),
    ):
        table.add_row(label, f"{train.get(key, 0):,}", f"{evals.get(key, 0):,}")
    table.add_row(
        "trained fraction", f"{train.get('trained_fraction', 0):.1%}", f"{evals.get('trained_fraction', 0):.1%}"
    )
    for key in ("mean", "p50", "p90", "p99", "max"):
        table.add_row(
            f"length {key}", str(train.get("length", {}).get(key, "-")), str(evals.get("length", {}).get(key, "-"))
        )
    table.add_row("row fill (packing efficiency)", f"{train.get('fill', 0):.1%}", f"{evals.get('fill', 0):.1%}")
    counts = stats.get("counts", {})
    table.add_row("records read", f"{counts.get('records', 0):,}", "")
    for reason, value in sorted(dropped(counts).items()):
        table.add_row(f"dropped: {reason}", f"{value:,}", "")
    for change in KEPT_CHANGED:
        if counts.get(change):
            table.add_row(f"{change.replace('_', ' ')} (kept)", f"{counts[change]:,}", "")
    return table
