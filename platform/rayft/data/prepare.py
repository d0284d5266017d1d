"""Preprocess once, train many: the Ray Data pipeline from the spec's sources to tokenized,
masked (and packed) parquet in storage, cached under a hash of everything that affects it
(rayft.data.cache). How the result is read is rayft.data.prepared's job.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from rayft import storage
from rayft.data import stages
from rayft.data.cache import CacheEntry, locate
from rayft.data.prepared import STATS_FILE, Prepared, dropped
from rayft.data.sources import chunk_size, plan_chunks
from rayft.env import Target, runtime_env, share_secrets
from rayft.errors import DataError, user_error_in
from rayft.nodes import on_this_node
from rayft.spec import JobSpec

SHOWN_FILES = 10  # files named in the summary's drops by file (stats.json has them all)


def prepare(spec: JobSpec, tokenizer: Any, *, force: bool = False, log: Callable[[str], None] = print) -> Prepared:
    """Run the pipeline on the current Ray cluster (or reuse its cached result). `tokenizer`
    is the one `rayft.model.load_tokenizer` gives; the pipeline's actors load their own copies
    from the same place."""
    import ray

    entry = locate(spec, tokenizer)
    cached = Prepared.read(entry.root)
    if cached and spec.data.cache and not force:
        log(f"data: reusing prepared data {entry.root}")
        return cached

    _start_ray_data_helpers()
    sources = spec.data.train + (spec.data.eval or [])
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    size = chunk_size([path for group in entry.files for path in group], cpus)
    chunks = [
        chunk
        for index, group in enumerate(entry.files)
        for file, path in enumerate(group)
        for chunk in plan_chunks(index, path, file, sources[index].split, chunk_bytes=size)
    ]
    n_train = len(spec.data.train)
    options = [
        stages.SourceOptions(
            format=source.format or spec.data.format,
            columns={**spec.data.columns, **source.columns},
            weight=source.weight,
            is_eval=index >= n_train,
            max_samples=source.max_samples,
            eval_fraction=spec.data.held_out_fraction,
        )
        for index, source in enumerate(sources)
    ]
    ledger = stages.LedgerActor.options(**on_this_node()).remote()
    started = time.time()
    log(f"data: preparing {sum(map(len, entry.files))} file(s) in {len(chunks)} read task(s) -> {entry.root}")
    staging = _staging_for(entry.root, started)
    try:
        with _Progress(ledger, log):
            dataset = _pipeline(spec, tokenizer, entry, chunks, options, ledger)
            target, filesystem = storage.for_ray(staging)  # credentials travel inside the filesystem
            dataset.write_parquet(
                target, filesystem=filesystem, partition_cols=["split"], ray_remote_args=_remote_args(spec)
            )
        stats = _finish(staging, entry, spec, ray.get(ledger.summary.remote()), time.time() - started)
    except BaseException as exc:  # Ray wraps task errors; show the user's error, not Ray's
        ray.kill(ledger)
        _remove_staging(staging, entry.root)  # nothing half-written is left behind, whatever failed
        if not isinstance(exc, Exception):
            raise
        raise (user_error_in(exc) or exc) from None
    ray.kill(ledger)
    log(_describe(stats, spec, entry))
    return Prepared(entry.root, entry.key, stats, stats["template"])


def _start_ray_data_helpers() -> None:
    """Start the two actors Ray Data starts when a pipeline first runs (one per cluster, reused
    by later pipelines) while this driver still plans the chunks. Until its autoscaling
    coordinator answers, Ray Data holds back every read task but the first: the second of
    `rayft prepare`'s two read tasks on 2 CPUs waited 3-4 s for that actor's process to start.
    Ray Data's own functions, so the actors are the ones it looks up; a Ray Data without them
    starts its helpers itself, as before."""
    try:
        from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:
        return
    get_or_create_autoscaling_coordinator()
    get_or_create_stats_actor()


def _remote_args(spec: JobSpec) -> dict[str, Any]:
    """Tasks that read sources or write the result on object storage need its credentials."""
    env = runtime_env(spec, Target.DATA_TASKS)
    return {"runtime_env": env} if env else {}


def _pipeline(
    spec: JobSpec,
    tokenizer: Any,
    entry: CacheEntry,
    chunks: list[Any],
    options: list[stages.SourceOptions],
    ledger: Any,
) -> Any:
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # same inputs -> same rows in the same order
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    remote = _remote_args(spec)
    secrets = share_secrets(spec)
    encoder = stages.EncoderSource(
        spec, tokenizer.name_or_path, entry.template, tokenizer_class=type(tokenizer).__name__
    )
    source = stages.SampleSource(chunks, options, encoder, ledger, secrets)
    # One block stream per chunk: Ray Data would otherwise split a read task's blocks across tasks
    # to reach its own parallelism target.
    dataset = ray.data.read_datasource(source, override_num_blocks=len(chunks), **remote)
    if spec.data.packing:
        # Best-fit packing needs a window of samples; bigger windows pack tighter.
        dataset = dataset.map_batches(
            stages.pack_rows,
            fn_kwargs={"max_length": spec.data.max_length},
            batch_size=8192,
            batch_format="pyarrow",
            **remote,
        )
    return dataset


def _staging_for(root: str, started: float) -> str:
    """Locally: a sibling directory renamed into place when complete (staging left by a
    process that no longer runs is removed first). Object stores cannot rename a directory:
    write in place (after clearing an incomplete attempt); stats.json, written last, is what
    marks the result complete."""
    if not storage.is_remote(root):
        for stale in glob.glob(f"{glob.escape(root)}.tmp-*-*"):
            pid = stale.rsplit(".tmp-", 1)[1].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        return f"{root}.tmp-{os.getpid()}-{int(started)}"
    storage.delete_dir(root)
    return root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_staging(staging: str, root: str, settle: float = 2.0, limit: float = 30.0) -> None:
    """Delete what a failed run wrote. Write tasks that were already running when the pipeline
    failed may still create files after the first delete: delete again until nothing has
    reappeared for `settle` seconds (at most `limit`)."""
    if storage.is_remote(staging) and staging == root:
        storage.delete_dir(staging)
        return
    deadline, quiet_since = time.time() + limit, time.time()
    storage.delete_dir(staging)
    while time.time() < deadline and time.time() - quiet_since < settle:
        time.sleep(0.25)
        if storage.exists(staging):
            storage.delete_dir(staging)
            quiet_since = time.time()


def _finish(staging: str, entry: CacheEntry, spec: JobSpec, summary: dict, seconds: float) -> dict[str, Any]:
    """Statistics of what was written, stats.json last (it marks the result complete), and the
    staging directory renamed into place."""
    import pyarrow.dataset as pads

    fs, staging_path = storage.filesystem(staging)
    files: dict[str, list[str]] = {}
    totals: dict[str, dict[str, Any]] = {}
    for split in ("train", "eval"):
        names = storage.list_files(f"{staging}/split={split}", ".parquet")
        files[split] = [f"{entry.root}/split={split}/{name}" for name in names]
        if not names:
            totals[split] = {"rows": 0, "samples": 0, "tokens": 0, "trained_tokens": 0}
            continue
        table = pads.dataset(f"{staging_path}/split={split}", filesystem=fs, format="parquet").to_table(
            columns=["n_tokens", "n_trained", "seq_lengths"]
        )
        totals[split] = _length_stats(table, spec.data.max_length)
    rejected = {k.split(":", 1)[1]: v for k, v in summary["counts"].items() if k.startswith("rejected:") and v}
    if rejected and spec.data.on_error == "raise":
        counted = _source_counts(spec, entry, summary.get("files", {}))
        by_file = {c["file"]: c for source in counted for c in source["by_file"]}
        raise DataError(_rejected(rejected, summary["errors"], by_file if len(by_file) > 1 else None))
    if totals["train"]["rows"] == 0:
        raise DataError(_nothing_left(spec, entry, summary))
    stats = {
        "key": entry.key,
        "seconds": round(seconds, 2),
        "counts": summary["counts"],
        "sources": _source_counts(spec, entry, summary.get("files", {})),
        "skipped_examples": summary["errors"],
        "splits": totals,
        "files": files,
        "packing": spec.data.packing,
        "max_length": spec.data.max_length,
        "template": entry.template.source if entry.template else None,
    }
    storage.write_text(f"{staging}/{STATS_FILE}", json.dumps(stats, indent=2))
    if staging != entry.root:
        storage.delete_dir(entry.root)  # a forced re-prepare replaces the old result
        storage.move_dir(staging, entry.root)
    return stats


def _rejected(rejected: dict[str, int], examples: list[str], by_file: dict[str, dict[str, int]] | None = None) -> str:
    """The pre-flight's verdict: counts by reason (and by source file, when given), and examples
    with their file:line."""
    total = sum(rejected.values())
    reasons = ", ".join(f"{reason}={count:,}" for reason, count in sorted(rejected.items()))
    files = [
        f"{file}: " + ", ".join(f"{k.split(':', 1)[1]}={v:,}" for k, v in sorted(hits.items()))
        for file, counts in (by_file or {}).items()
        if (hits := {k: v for k, v in counts.items() if k.startswith("rejected:") and v})
    ]
    where = ("; by file: " + "; ".join(files[:SHOWN_FILES])) if files else ""
    shown = "\n  ".join(examples[:5])
    return (
        f"{total:,} record(s) cannot be trained as the chat template renders them for inference ({reasons}{where}); "
        f"nothing was trained. Fix them, or set data.on_error: skip to drop and count them. Examples:\n  {shown}"
    )


def _source_counts(
    spec: JobSpec, entry: CacheEntry, by_file: dict[tuple[int, int], dict[str, int]]
) -> list[dict[str, Any]]:
    """Records read, kept and dropped (by reason) per source, train sources first, then eval
    ones (the model card's data section), and the same for each file of the source
    (`by_file`, in the order the source expands to)."""
    sources = [("train", s) for s in spec.data.train] + [("eval", s) for s in spec.data.eval or []]
    out = []
    for index, (split, source) in enumerate(sources):
        paths = entry.files[index]
        counts = [{k: v for k, v in by_file.get((index, n), {}).items() if v} for n in range(len(paths))]
        summed: dict[str, int] = {}
        for one in counts:
            for key, value in one.items():
                summed[key] = summed.get(key, 0) + value
        files = [{"file": path, **one} for path, one in zip(paths, counts)]
        out.append({"path": source.path, "split": split, "files": len(paths), **summed, "by_file": files})
    return out


def _nothing_left(spec: JobSpec, entry: CacheEntry, summary: dict[str, Any]) -> str:
    """Why no training sample is left, naming the files and what to change."""
    counts = summary["counts"]
    files = [f for group in entry.files[: len(spec.data.train)] for f in group]
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    records = counts.get("records", 0)
    reasons = ", ".join(f"{k}={v:,}" for k, v in sorted(dropped(counts).items()))
    message = f"no training samples left: {records:,} record(s) read from {shown}" + (
        f"; dropped {reasons}" if reasons else ""
    )
    if records == 0:
        return message + ": the files hold no records"
    if counts.get("no_trained_tokens", 0) + counts.get("over_max_length", 0) + counts.get("too_long", 0):
        return (
            message + f". Samples are longer than data.max_length={spec.data.max_length} "
            f"(data.truncation={spec.data.truncation}) and lost their replies: raise data.max_length, or set "
            "data.truncation: keep_end"
        )
    if counts.get("malformed") or any(k.startswith("rejected:") for k in counts):
        first = (summary.get("errors") or ["?"])[0]
        return message + f" (data.on_error=skip); the first malformed record: {first}"
    return message


def _length_stats(table: Any, max_length: int) -> dict[str, Any]:
    import numpy as np

    tokens = np.asarray(table.column("n_tokens").to_numpy(), dtype=np.int64)
    trained = np.asarray(table.column("n_trained").to_numpy(), dtype=np.int64)
    lengths = (
        np.concatenate([np.asarray(x, dtype=np.int64) for x in table.column("seq_lengths").to_pylist()])
        if len(tokens)
        else np.zeros(0)
    )
    percentiles = {f"p{p}": int(np.percentile(lengths, p)) for p in (50, 90, 99)} if len(lengths) else {}
    return {
        "rows": int(len(tokens)),
        "samples": int(len(lengths)),
        "tokens": int(tokens.sum()),
        "trained_tokens": int(trained.sum()),
        "trained_fraction": round(float(trained.sum() / max(tokens.sum(), 1)), 4),
        "length": {
            "mean": round(float(lengths.mean()), 1) if len(lengths) else 0,
            "max": int(lengths.max()) if len(lengths) else 0,
            **percentiles,
        },
        "fill": round(float(tokens.sum() / max(len(tokens) * max_length, 1)), 4),
    }


class _Progress:
    """Prints how many records the pipeline has read, every few seconds, while it runs."""

    def __init__(self, ledger: Any, log: Callable[[str], None], every: float = 5.0):
        self.ledger, self.log, self.every = ledger, log, every
        self.done = threading.Event()

    def __enter__(self) -> _Progress:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()

    def _run(self) -> None:
        import ray

        last = -1
        while not self.done.wait(self.every):
            try:
                counts = ray.get(self.ledger.summary.remote(), timeout=2)["counts"]
            except Exception:
                return
            if counts.get("records", 0) not in (last, 0):
                last = counts.get("records", 0)
                self.log(f"data: {last:,} records read, {counts.get('kept', 0):,} kept")


def _describe(stats: dict[str, Any], spec: JobSpec, entry: CacheEntry) -> str:
    """The summary prepare prints: what was read and made, drops by reason (and by source file
    when there are several), and what was changed in records that were kept."""
    counts, train, evals = stats["counts"], stats["splits"]["train"], stats["splits"]["eval"]
    reasons = dropped(counts)
    lines = [
        f"data: {counts.get('records', 0):,} records -> {train['samples']:,} train / {evals['samples']:,} eval "
        f"samples in {stats['seconds']:.1f}s; {train['tokens']:,} train tokens, "
        f"{train['trained_fraction']:.0%} trained"
    ]
    if stats["packing"]:
        lines.append(f"data: packed into {train['rows']:,} rows of {stats['max_length']}, {train['fill']:.1%} full")
    if reasons:
        lines.append("data: dropped " + ", ".join(f"{k}={v:,}" for k, v in sorted(reasons.items())))
        lines.extend(_drops_by_file(stats.get("sources", [])))
    if counts.get("truncated"):
        lines.append(
            f"data: truncated {counts['truncated']:,} sample(s) to data.max_length={spec.data.max_length} "
            f"(data.truncation: {spec.data.truncation})"
        )
    for key, done in (
        ("system_folded", "folded the system message into the user turn after it"),
        ("system_dropped", "left out the system message(s)"),
    ):
        if counts.get(key):
            name = entry.template.name if entry.template else spec.data.template
            why = (
                f"template {name!r} has no system role (data.system_turns: auto; keep refuses such records, "
                "drop leaves the system message out)"
                if spec.data.system_turns == "auto"
                else f"data.system_turns: {spec.data.system_turns}"
            )
            lines.append(f"data: {done} in {counts[key]:,} conversation(s): {why}")
    return "\n".join(lines)


def _drops_by_file(sources: list[dict[str, Any]]) -> list[str]:
    """Lines naming the files records were dropped from, with how many and why, when the
    sources hold more than one file."""
    files = [counts for source in sources for counts in source.get("by_file", [])]
    if len(files) < 2:
        return []
    hit = [(counts, dropped(counts)) for counts in files if dropped(counts)]
    lines = ["data: dropped by source file:"]
    for counts, reasons in hit[:SHOWN_FILES]:
        lines.append(
            f"data:   {counts['file']}: {sum(reasons.values()):,} of {counts.get('records', 0):,} record(s) "
            f"({', '.join(f'{k}={v:,}' for k, v in sorted(reasons.items()))})"
        )
    if len(hit) > SHOWN_FILES:
        lines.append(f"data:   and {len(hit) - SHOWN_FILES:,} more file(s) with drops (stats.json: sources[].by_file)")
    if len(hit) < len(files):
        lines.append(f"data:   none dropped from the other {len(files) - len(hit):,} file(s)")
    return lines
