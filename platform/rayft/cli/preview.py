"""`rayft data preview`: processed examples as the model sees them, trained tokens
highlighted, and the statistics of the prepared data."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from rayft.data.prepare import prepare
from rayft.data.tokenize import IGNORE
from rayft.model import load_tokenizer, materialized_dir
from rayft.spec import JobSpec
from rayft.storage import filesystem


def preview(spec: JobSpec, console: Console, *, count: int = 3, split: str = "train") -> None:
    import pyarrow.parquet as pq

    tokenizer = load_tokenizer(spec, materialized_dir(spec))
    prepared = prepare(spec, tokenizer, log=lambda message: None)
    files = prepared.files(split)
    shown = 0
    for path in files:
        fs, inner = filesystem(path)
        table = pq.read_table(inner, filesystem=fs, columns=["input_ids", "labels", "seq_lengths"])
        for row in table.slice(0, count - shown).to_pylist():
            console.rule(f"{split} row {shown} ({len(row['input_ids'])} tokens, {len(row['seq_lengths'])} sample(s))")
            console.print(render_row(tokenizer, row["input_ids"], row["labels"], row["seq_lengths"]))
            shown += 1
        if shown >= count:
            break
    console.rule()
    console.print(
        Text("legend: ", style="bold")
        + Text("trained", style="bold green")
        + Text("  ")
        + Text("context (no loss)", style="dim")
        + Text("  ")
        + Text("| sample boundary", style="bold magenta")
    )
    console.print(stats_table(prepared.stats))


def render_row(tokenizer: Any, input_ids: list[int], labels: list[int], seq_lengths: list[int]) -> Text:
    """Token by token: trained ones bold green, the rest dim; packed samples separated."""
    text = Text()
    boundaries, position = set(), 0
    for length in seq_lengths[:-1]:
        position += length
        boundaries.add(position)
    for index, (token, label) in enumerate(zip(input_ids, labels)):
        if index in boundaries:
            text.append(" | ", style="bold magenta")
        piece = tokenizer.decode([token], skip_special_tokens=False)
        text.append(piece, style="bold green" if label != IGNORE else "dim")
    return text


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
    for reason, value in sorted(counts.items()):
        if reason not in ("records", "kept") and value:
            table.add_row(f"dropped: {reason}" if reason != "truncated" else "truncated (kept)", f"{value:,}", "")
    return table
