"""Preprocess once, train many: the Ray Data pipeline from the spec's sources to tokenized,
masked (and packed) parquet in storage, cached under a hash of everything that affects it.

Workers, restarts and sweep trials read the result as a map-style dataset, so the trainer's
distributed sampler and exact mid-epoch resume keep working.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from rayft.data.sources import expand, fingerprint, plan_chunks
from rayft.data.templates import ChatTemplate, resolve_template
from rayft.errors import DataError, user_error_in
from rayft.spec import JobSpec

PIPELINE_VERSION = 2  # bump when the output of the pipeline changes for the same inputs
TOKEN_COLUMNS = ["input_ids", "labels", "seq_lengths", "sample_ids"]


@dataclass
class Prepared:
    root: str
    key: str
    stats: dict[str, Any] = field(default_factory=dict)

    def files(self, split: str) -> list[str]:
        return sorted(self.stats.get("files", {}).get(split, []))


def cache_key(spec: JobSpec, tokenizer: Any, template: ChatTemplate | None, files: list[list[str]]) -> str:
    data = spec.data.model_dump(mode="json")
    data.pop("cache", None)
    data.pop("cache_dir", None)
    identity = {
        "version": PIPELINE_VERSION,
        "data": data,
        "files": [[fingerprint(f) for f in group] for group in files],
        "tokenizer": hashlib.sha256(_tokenizer_identity(tokenizer).encode()).hexdigest(),
        "template": template.source if template else None,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _tokenizer_identity(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return vocab + json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token])


def prepared_base(spec: JobSpec) -> str:
    """Where prepared datasets live: data.cache_dir, else <run.storage_path>/prepared."""
    if spec.data.cache_dir:
        base = spec.data.cache_dir if "://" in spec.data.cache_dir else os.path.abspath(spec.data.cache_dir)
        return base.rstrip("/")
    storage = spec.run.storage_path
    base = storage if "://" in storage else os.path.abspath(storage)
    return f"{base.rstrip('/')}/prepared"


def prepared_root(spec: JobSpec, key: str) -> str:
    return f"{prepared_base(spec)}/{key}"


def prepare(spec: JobSpec, tokenizer: Any, *, force: bool = False,
            log: Callable[[str], None] = print) -> Prepared:
    """Run the pipeline on the current Ray cluster (or reuse its cached result). `tokenizer`
    is the one `rayft.model.load_tokenizer` gives; the pipeline's actors load their own copies
    from the same place."""
    import ray

    sources = spec.data.train + (spec.data.eval or [])
    files = [expand(source.path) for source in sources]
    needs_template = any((source.format or spec.data.format) != "text" for source in sources)
    template = resolve_template(spec.data.template, tokenizer) if needs_template else None
    key = cache_key(spec, tokenizer, template, files)
    root = prepared_root(spec, key)
    cached = read_stats(root)
    if cached and spec.data.cache and not force:
        log(f"data: reusing prepared data {root}")
        return Prepared(root, key, cached)

    from rayft.data import stages

    n_train = len(spec.data.train)
    chunks = [chunk for index, group in enumerate(files) for file, path in enumerate(group)
              for chunk in plan_chunks(index, path, file, sources[index].split)]
    options = [stages.SourceOptions(
        format=source.format or spec.data.format, columns={**spec.data.columns, **source.columns},
        weight=source.weight, is_eval=index >= n_train, max_samples=source.max_samples,
        eval_fraction=0.0 if spec.data.eval else spec.data.eval_fraction)
        for index, source in enumerate(sources)]
    ledger = stages.Ledger.remote()
    started = time.time()
    log(f"data: preparing {sum(map(len, files))} file(s) in {len(chunks)} read task(s) -> {root}")
    with _progress(ledger, log):
        try:
            dataset = _pipeline(spec, tokenizer.name_or_path, template, chunks, options, ledger, stages)
            staging = _staging_for(root, started)
            credentials = _credentials(spec)
            dataset.write_parquet(staging, partition_cols=["split"],
                                  ray_remote_args={"runtime_env": {"env_vars": credentials}} if credentials else None)
        except Exception as exc:  # Ray wraps task errors; show the user's error, not Ray's
            raise (user_error_in(exc) or exc) from None
    summary = ray.get(ledger.summary.remote())
    stats = _finish(staging, root, spec, summary, time.time() - started)
    ray.kill(ledger)
    log(_describe(stats))
    return Prepared(root, key, stats)


def _pipeline(spec, model_dir, template, chunks, options, ledger, stages):
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # same inputs -> same rows in the same order
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Tasks that read sources or write the result on object storage need its credentials.
    remote = {"runtime_env": {"env_vars": credentials}} if (credentials := _credentials(spec)) else {}
    dataset = ray.data.read_datasource(stages.SampleSource(chunks, options, spec.data, ledger), ray_remote_args=remote)
    with warnings.catch_warnings():  # max_restarts has no named parameter; Ray warns about **kwargs
        warnings.simplefilter("ignore")
        dataset = dataset.map_batches(
            stages.bound_encoder(spec, model_dir, template, ledger),
            batch_size=512, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus),
            # No actor restarts: Ray Data keeps the UDF in the object store, and Ray warns on the
            # terminal that a restart could lose it. A lost encoder fails the prepare instead; it is
            # idempotent and cached only when complete, so rerunning the command is the recovery.
            num_cpus=1, max_restarts=0, **remote)
    if spec.data.packing:
        # Best-fit packing needs a window of samples; bigger windows pack tighter.
        dataset = dataset.map_batches(stages.pack_rows, fn_kwargs={"max_length": spec.data.max_length},
                                      batch_size=8192, batch_format="pyarrow", **remote)
    return dataset


def _credentials(spec: JobSpec) -> dict[str, str]:
    from rayft.storage import credential_env

    paths = [spec.run.storage_path, spec.data.cache_dir or "", *(s.path for s in spec.data.train + (spec.data.eval or []))]
    return {k: v for path in paths for k, v in credential_env(path).items()}


def _staging_for(root: str, started: float) -> str:
    """Locally: a sibling directory renamed into place when complete. Object stores cannot
    rename a directory: write in place (after clearing an incomplete attempt); stats.json,
    written last, is what marks the result complete."""
    if "://" not in root:
        return f"{root}.tmp-{os.getpid()}-{int(started)}"
    from rayft import storage

    storage.delete_dir(root)
    return root


def _finish(staging: str, root: str, spec: JobSpec, summary: dict, seconds: float) -> dict[str, Any]:
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs, staging_path = pafs.FileSystem.from_uri(staging) if "://" in staging else (pafs.LocalFileSystem(), staging)
    files: dict[str, list[str]] = {}
    totals: dict[str, dict[str, Any]] = {}
    for split in ("train", "eval"):
        split_dir = f"{staging_path}/split={split}"
        if fs.get_file_info(split_dir).type != pafs.FileType.Directory:
            files[split], totals[split] = [], {"rows": 0, "samples": 0, "tokens": 0, "trained_tokens": 0}
            continue
        names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(split_dir)) if i.base_name.endswith(".parquet"))
        files[split] = [f"{root}/split={split}/{name}" for name in names]
        table = pads.dataset(split_dir, filesystem=fs, format="parquet").to_table(columns=["n_tokens", "n_trained", "seq_lengths"])
        totals[split] = _length_stats(table, spec.data.max_length)
    if totals["train"]["rows"] == 0:
        raise DataError(f"no training samples left after filtering: {summary['counts']}")
    stats = {"key": os.path.basename(root), "seconds": round(seconds, 2), "counts": summary["counts"],
             "skipped_examples": summary["errors"], "splits": totals, "files": files,
             "packing": spec.data.packing, "max_length": spec.data.max_length}
    with fs.open_output_stream(f"{staging_path}/stats.json") as out:
        out.write(json.dumps(stats, indent=2).encode())
    if staging != root:
        if os.path.exists(root):
            fs.delete_dir(root)  # a forced re-prepare replaces the old result
        fs.move(staging_path, root)
    return stats


def _length_stats(table: Any, max_length: int) -> dict[str, Any]:
    import numpy as np

    tokens = np.asarray(table.column("n_tokens").to_numpy(), dtype=np.int64)
    trained = np.asarray(table.column("n_trained").to_numpy(), dtype=np.int64)
    lengths = np.concatenate([np.asarray(x, dtype=np.int64) for x in table.column("seq_lengths").to_pylist()]) if len(tokens) else np.zeros(0)
    percentiles = {f"p{p}": int(np.percentile(lengths, p)) for p in (50, 90, 99)} if len(lengths) else {}
    return {
        "rows": int(len(tokens)), "samples": int(len(lengths)), "tokens": int(tokens.sum()),
        "trained_tokens": int(trained.sum()),
        "trained_fraction": round(float(trained.sum() / max(tokens.sum(), 1)), 4),
        "length": {"mean": round(float(lengths.mean()), 1) if len(lengths) else 0,
                   "max": int(lengths.max()) if len(lengths) else 0, **percentiles},
        "fill": round(float(tokens.sum() / max(len(tokens) * max_length, 1)), 4),
    }


def read_stats(root: str) -> dict[str, Any] | None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(), root)
    try:
        with fs.open_input_stream(f"{path}/stats.json") as handle:
            return json.loads(handle.read())
    except (FileNotFoundError, OSError):
        return None


class _progress:
    """Prints how many records the pipeline has read, every few seconds, while it runs."""

    def __init__(self, ledger: Any, log: Callable[[str], None], every: float = 5.0):
        self.ledger, self.log, self.every = ledger, log, every
        self.done = threading.Event()

    def __enter__(self) -> "_progress":
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


def _describe(stats: dict[str, Any]) -> str:
    counts, train, evals = stats["counts"], stats["splits"]["train"], stats["splits"]["eval"]
    dropped = {k: v for k, v in counts.items() if k not in ("records", "kept") and v}
    lines = [f"data: {counts.get('records', 0):,} records -> {train['samples']:,} train / {evals['samples']:,} eval "
             f"samples in {stats['seconds']:.1f}s; {train['tokens']:,} train tokens, "
             f"{train['trained_fraction']:.0%} trained"]
    if stats["packing"]:
        lines.append(f"data: packed into {train['rows']:,} rows of {stats['max_length']}, {train['fill']:.1%} full")
    if dropped:
        lines.append("data: dropped " + ", ".join(f"{k}={v:,}" for k, v in sorted(dropped.items())))
    return "\n".join(lines)


LOCAL_CACHE = os.path.expanduser("~/.cache/rayft/prepared")


def load_split(prepared: Prepared, split: str) -> Any:
    """A prepared split as a map-style `datasets.Dataset` (what the HF trainer samples from),
    memory-mapped: the parquet is streamed once per node into an Arrow file, so a dataset larger
    than RAM is paged in as the sampler reaches it, and the workers on a node share one copy."""
    import datasets
    import pyarrow as pa

    paths = prepared.files(split)
    if not paths:
        return None
    # Named by the files themselves (Ray's file names are unique per write; local ones add size
    # and mtime): a re-prepared dataset never reads a stale local copy.
    identity = [p if "://" in p else f"{os.path.abspath(p)}:{os.path.getsize(p)}:{os.path.getmtime(p)}" for p in paths]
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]
    local = os.path.join(LOCAL_CACHE, f"{digest}-{split}.arrow")
    if not os.path.isfile(local):
        _stream_to_arrow(paths, local)
    return datasets.Dataset(pa.ipc.open_file(pa.memory_map(local)).read_all())


def _stream_to_arrow(paths: list[str], local: str) -> None:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(local), exist_ok=True)
    staging = f"{local}.{os.getpid()}.tmp"
    writer = None
    try:
        for path in paths:
            fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (None, path)
            source = pq.ParquetFile(inner, filesystem=fs) if fs else pq.ParquetFile(inner)
            for batch in source.iter_batches(batch_size=1024, columns=TOKEN_COLUMNS):
                if writer is None:
                    writer = pa.ipc.new_file(staging, batch.schema)
                writer.write_batch(batch)
    except BaseException:
        if writer is not None:
            writer.close()
        if os.path.exists(staging):
            os.remove(staging)
        raise
    if writer is not None:
        writer.close()
    else:
        raise DataError(f"prepared data {paths[0]} has no rows")
    os.replace(staging, local)  # atomic: workers converting at once all end with one whole file
