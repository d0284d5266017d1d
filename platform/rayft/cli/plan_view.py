"""`rayft plan` in a terminal: memory per worker with the verdict, compute, fixes, notes."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from rayft.plan import GiB, Plan


def _gib(value: float) -> str:
    return f"{value / GiB:,.2f} GiB"


def render(plan: Plan, console: Any) -> None:
    """The plan as rich tables: memory per worker with the verdict, compute, fixes, notes."""
    gib = _gib
    memory = Table(title=f"plan: {plan.model}", title_justify="left")
    for column, justify in (("memory per worker", "left"), ("", "right"), ("why", "left")):
        memory.add_column(column, justify=justify)
    for name, size in plan.memory.items():
        memory.add_row(name, gib(size), plan.why.get(name, ""))
    memory.add_row("margin", gib(plan.margin_bytes), "allocator fragmentation")
    memory.add_row("runtime", gib(plan.runtime_bytes), "the process itself, not tensors")
    if plan.host_bytes:
        memory.add_row("offloaded", gib(plan.host_bytes), "host RAM per worker, not counted above")
    verdict = "[green]fits[/]" if plan.fits else "[bold red]does not fit[/]"
    memory.add_row(
        "[bold]total[/]",
        f"[bold]{gib(plan.total_bytes)}[/]",
        f"{verdict} in {gib(plan.capacity_bytes)} ({plan.accelerator}), headroom {gib(plan.headroom_bytes)}",
    )
    console.print(memory)
    compute = Table(title="compute", title_justify="left", show_header=False)
    compute.add_column(style="bold")
    compute.add_column()
    hours = f"{plan.seconds_per_epoch / 3600:,.2f} h" if plan.seconds_per_epoch else "-"
    for key, value in (
        ("method", f"{plan.method}; {plan.workers} worker(s)"),
        ("parameters", f"{plan.params / 1e9:,.3f} B, {plan.trainable_params / 1e6:,.1f} M trainable"),
        (
            "FLOPs per token",
            f"{plan.flops_per_token / 1e9:,.2f} GFLOP (6N + attention), "
            f"{plan.executed_flops_per_token / 1e9:,.2f} executed",
        ),
        (
            "effective batch",
            f"{plan.effective_batch} rows (<= {plan.tokens_per_step:,} tokens) a step, "
            f"{plan.gradient_accumulation} accumulation step(s)",
        ),
        ("tokens per epoch", f"{plan.tokens:,} ({plan.tokens_source})" if plan.tokens else plan.tokens_source),
        (
            "optimizer steps",
            f"{plan.steps_per_epoch:,} an epoch, {plan.total_steps:,} in all" if plan.steps_per_epoch else "-",
        ),
        (
            "time per epoch",
            f"{hours} at {plan.mfu:.0%} of {plan.peak_tflops * 1000:,.0f} GFLOP/s a worker"
            if plan.peak_tflops < 1
            else f"{hours} at {plan.mfu:.0%} of {plan.peak_tflops:,.0f} TFLOP/s a worker",
        ),
    ):
        compute.add_row(key, value)
    console.print(compute)
    if plan.suggestions:
        fixes = Table(title="what would make it fit", title_justify="left")
        for column in ("change", "overrides", "total", ""):
            fixes.add_column(column)
        for s in plan.suggestions:
            verdict = "[green]fits[/]" if s.fits else "[red]no[/]"
            fixes.add_row(s.change, " ".join(s.overrides), gib(s.total_bytes), verdict)
        console.print(fixes)
    for note in plan.notes:
        console.print(f"[dim]- {note}[/]", soft_wrap=True)
