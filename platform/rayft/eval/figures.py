"""The report's pictures: loss curves (with the overfitting window shaded), the learning-rate
schedule and throughput over time, as PNG bytes. Figure objects, not pyplot: no global state,
no display."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Point = tuple[float, float]
OVERFIT_WINDOW = 3  # evaluations that must each be higher than the one before (rayft.eval.report)


@dataclass
class Curves:
    train: list[Point] = field(default_factory=list)  # (step, loss)
    eval: list[Point] = field(default_factory=list)  # (step, eval_loss), one per step
    learning_rate: list[Point] = field(default_factory=list)  # (step, lr)
    throughput: list[Point] = field(default_factory=list)  # (seconds since start, mean tokens/s so far)
    interval_throughput: list[Point] = field(default_factory=list)  # (seconds, tokens/s since the last log)


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_png(
    series: dict[str, Sequence[Point]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    hlines: dict[str, float] | None = None,
    shade: tuple[float, float] | None = None,
    log_y: bool = False,
) -> bytes:
    """A line chart as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, points in series.items():
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    for index, (label, value) in enumerate((hlines or {}).items()):
        axes.axhline(value, linestyle="--", linewidth=1, color=f"C{index + len(series)}", label=label)
    if shade:
        axes.axvspan(*shade, color="red", alpha=0.12, label="eval loss rising")
    if log_y:
        axes.set_yscale("log")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(True, alpha=0.3)
    if len(series) + len(hlines or {}) > 1 or shade:
        axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def figures(run: dict[str, Any], found: Curves, flagged: str | None) -> dict[str, bytes]:
    """name.png -> PNG bytes, for the curves that have data."""
    out: dict[str, bytes] = {}
    if found.train or found.eval:
        held_out = (run.get("eval") or {}).get("loss") or {}
        hlines = {
            f"held-out loss, {label} model": result["loss"]
            for label, result in held_out.items()
            if label == "base" and finite(result.get("loss"))
        }
        shade = (found.eval[-OVERFIT_WINDOW][0], found.eval[-1][0]) if flagged else None
        out["loss.png"] = plot_png(
            {"train loss": found.train, "eval loss": found.eval},
            title="Loss",
            xlabel="step",
            ylabel="cross-entropy (nats/token)",
            hlines=hlines,
            shade=shade,
        )
    if found.learning_rate:
        out["learning_rate.png"] = plot_png(
            {"learning rate": found.learning_rate},
            title="Learning-rate schedule",
            xlabel="step",
            ylabel="learning rate",
        )
    if found.throughput or found.interval_throughput:
        out["throughput.png"] = plot_png(
            {"since the previous log": found.interval_throughput, "mean since the start": found.throughput},
            title="Throughput",
            xlabel="seconds since training started",
            ylabel="tokens/s (all workers)",
        )
    return out
