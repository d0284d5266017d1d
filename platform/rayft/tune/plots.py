"""The sweep's picture: the metric against each swept parameter, and every trial's curve."""

from __future__ import annotations

import io
from typing import Any

from rayft import storage
from rayft.spec import JobSpec

COLORS = {"finished": "tab:blue", "stopped early": "tab:orange", "failed": "tab:red", "running": "tab:gray"}


def plot_sweep(trials: list[Any], spec: JobSpec, directory: str) -> str | None:
    from matplotlib.figure import Figure

    params = list(spec.sweep.search_space)
    scored = [t for t in trials if t.metric is not None]
    if not scored:
        return None
    figure = Figure(figsize=(5 * (len(params) + 1), 4), layout="constrained")
    axes: Any = figure.subplots(1, len(params) + 1, squeeze=False)[0]
    for ax, path in zip(axes, params):
        kind = next(iter(spec.sweep.search_space[path]))
        for status, color in COLORS.items():
            points = [(t.params.get(path), t.metric) for t in scored if t.status == status]
            xs = [p[0] for p in points if isinstance(p[0], (int, float))]
            if xs:
                ax.scatter(xs, [p[1] for p in points if isinstance(p[0], (int, float))], color=color, label=status)
            labels = [str(p[0]) for p in points if not isinstance(p[0], (int, float))]
            if labels:
                ax.scatter(
                    labels, [p[1] for p in points if not isinstance(p[0], (int, float))], color=color, label=status
                )
        if kind == "loguniform" or (kind in ("grid", "choice") and _positive_spread(scored, path)):
            ax.set_xscale("log")
        ax.set_xlabel(path)
        ax.set_ylabel(f"{spec.sweep.metric} (last report)")
        ax.grid(alpha=0.3)
    curves = axes[-1]
    for trial in trials:
        if trial.curve:
            steps, values = zip(*trial.curve)
            curves.plot(
                steps,
                values,
                marker="o",
                color=COLORS.get(trial.status, "tab:gray"),
                alpha=0.8,
                label=f"{trial.name} ({trial.status})",
            )
    curves.set_xlabel("step")
    curves.set_ylabel(spec.sweep.metric)
    curves.set_title("every trial")
    curves.grid(alpha=0.3)
    curves.legend(fontsize="x-small")
    axes[0].legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    path = f"{directory}/sweep.png"
    storage.write_bytes(path, buffer.getvalue())
    return path


def _positive_spread(trials: list[Any], path: str) -> bool:
    values = [t.params.get(path) for t in trials if isinstance(t.params.get(path), (int, float))]
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 100
