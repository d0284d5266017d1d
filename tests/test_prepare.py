"""The preprocessing pipeline on Ray Data, on a real local cluster: sources, mixing, splits,
the cache, bad input, quality filters, packing and the preview command."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SHARED, python_json, run_cli, write_jsonl, write_spec
from rayft.data.sources import MIN_CHUNK_BYTES, chunk_size, plan_chunks, read_chunk
from rayft.errors import DataError
from rayft.spec import load_spec

pytestmark = pytest.mark.slow

ALPACA = [
    {"instruction": f"Question number {i}: what is {i} plus {i}?", "input": "", "output": f"The answer is {2 * i}."}
    for i in range(40)
]


def prepare(tiny_llama: Path, storage: Path, data: dict[str, Any], force: bool = True, log=None):
    from rayft.data.prepare import prepare as run
    from rayft.model import load_tokenizer

    spec = load_spec(
        data={
            "model": {"path": str(tiny_llama)},
            "data": {"max_length": 256, **data},
            "run": {"storage_path": str(storage)},
        }
    )
    return spec, run(spec, load_tokenizer(spec), force=force, log=log or (lambda _: None))


def rows(prepared, split: str = "train") -> list[dict]:
    files = prepared.files(split)
    return pq.read_table(files).to_pylist() if files else []


def by_sample(prepared, split: str = "train") -> dict[int, tuple]:
    """sample id -> (input_ids, labels), unpacking packed rows."""
    out = {}
    for row in rows(prepared, split):
        start = 0
        for sample, length in zip(row["sample_ids"], row["seq_lengths"]):
            out[sample] = (row["input_ids"][start : start + length], row["labels"][start : start + length])
            start += length
    return out


def record_index(sample_id: int) -> int:
    return sample_id & ((1 << 36) - 1)


def test_every_file_type_gives_the_same_samples(ray_cluster, tiny_llama, tmp_path) -> None:
    jsonl = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))  # minified: every record on line 1
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "a.parquet")
    with open(tmp_path / "a.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ALPACA)
    hub = tmp_path / "hub-dataset" / "data"  # laid out like a dataset repository on the hub
    hub.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ALPACA), hub / "train-00000-of-00001.parquet")
    sources = [
        str(jsonl),
        str(tmp_path / "a.json"),
        str(tmp_path / "a.parquet"),
        str(tmp_path / "a.csv"),
        f"hf:{tmp_path / 'hub-dataset'}",
    ]
    _, prepared = prepare(
        tiny_llama, tmp_path / "runs", {"train": sources, "eval_fraction": 0.0, "filters": {"dedup": False}}
    )
    samples = by_sample(prepared)
    assert len(samples) == 5 * len(ALPACA)
    groups: dict[int, set] = defaultdict(set)
    for sample_id, (ids, labels) in samples.items():
        groups[record_index(sample_id)].add((tuple(ids), tuple(labels)))
    assert len(groups) == len(ALPACA) and all(len(g) == 1 for g in groups.values())
    assert prepared.stats["counts"]["records"] == 5 * len(ALPACA)


def test_globs_directories_weights_and_dedup(ray_cluster, tiny_llama, tmp_path) -> None:
    write_jsonl(tmp_path / "shards" / "part-0.jsonl", ALPACA[:20])
    write_jsonl(tmp_path / "shards" / "part-1.jsonl", ALPACA[20:])
    other = write_jsonl(
        tmp_path / "other.jsonl", [{"prompt": f"p{i}", "response": f"r{i} is the reply"} for i in range(200)]
    )
    _, prepared = prepare(
        tiny_llama,
        tmp_path / "runs",
        {
            "train": [
                {"path": str(tmp_path / "shards" / "*.jsonl"), "weight": 2.0},
                {"path": str(other), "weight": 0.5},
            ],
            "eval_fraction": 0.0,
        },
    )
    samples = by_sample(prepared)
    per_source = Counter(sample_id >> 56 for sample_id in samples)
    assert per_source[0] == 2 * len(ALPACA)  # every record twice, as distinct samples
    assert 70 <= per_source[1] <= 130  # a seeded half of 200
    # the same directory as a source: the same 40 records, and dedup drops the second copy
    _, again = prepare(
        tiny_llama,
        tmp_path / "runs",
        {"train": [str(tmp_path / "shards"), str(tmp_path / "shards" / "part-0.jsonl")], "eval_fraction": 0.0},
    )
    assert again.stats["counts"]["duplicate"] == 20
    # per source, for the model card: which copy of part-0 counts as the duplicate depends on read order
    sources = again.stats["sources"]
    assert [(s["split"], s["files"], s["records"]) for s in sources] == [("train", 2, 40), ("train", 1, 20)]
    assert sum(s.get("kept", 0) for s in sources) == 40 and sum(s.get("duplicate", 0) for s in sources) == 20
    assert again.stats["splits"]["train"]["samples"] == 40


def test_eval_split_is_seeded_disjoint_and_stable(ray_cluster, tiny_llama, tmp_path) -> None:
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(400)]
    )
    _, first = prepare(tiny_llama, tmp_path / "runs", {"train": str(data), "eval_fraction": 0.25})
    train, evals = set(by_sample(first)), set(by_sample(first, "eval"))
    assert not train & evals and len(train | evals) == 400
    assert 70 <= len(evals) <= 130
    _, second = prepare(tiny_llama, tmp_path / "runs", {"train": str(data), "eval_fraction": 0.25}, force=True)
    assert evals == set(by_sample(second, "eval"))


def test_cache_is_reused_and_keyed_by_what_matters(ray_cluster, tiny_llama, chat_data, tmp_path) -> None:
    data = {"train": str(chat_data["train"]), "eval": str(chat_data["eval"])}
    messages: list[str] = []
    _, first = prepare(tiny_llama, tmp_path / "runs", data, force=False, log=messages.append)
    _, second = prepare(tiny_llama, tmp_path / "runs", data, force=False, log=messages.append)
    assert second.root == first.root and any("reusing prepared data" in m for m in messages)
    _, longer = prepare(tiny_llama, tmp_path / "runs", {**data, "max_length": 64}, force=False)
    assert longer.key != first.key
    stats = json.loads((Path(first.root) / "stats.json").read_text())
    assert stats["splits"]["train"]["samples"] == 64 and stats["splits"]["eval"]["samples"] == 16
    assert 0 < stats["splits"]["train"]["trained_fraction"] < 1


def test_malformed_records_name_file_and_line(ray_cluster, tiny_llama, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    good = [json.dumps(r) for r in ALPACA[:5]]
    bad.write_bytes(
        "\n".join(
            [good[0], good[1], '{"instruction": "x", "output": ', good[2], '{"instruction": "no output"}', good[3]]
        ).encode()
        + b"\n\xff\xfe broken\n"
    )
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid JSON"):
        prepare(tiny_llama, tmp_path / "runs", {"train": str(bad)})
    _, prepared = prepare(tiny_llama, tmp_path / "runs", {"train": str(bad), "on_error": "skip", "eval_fraction": 0.0})
    counts = prepared.stats["counts"]
    assert counts["malformed"] == 3 and prepared.stats["splits"]["train"]["samples"] == 4
    skipped = "\n".join(prepared.stats["skipped_examples"])
    assert "bad.jsonl:3: not valid JSON" in skipped
    assert 'bad.jsonl:5: field "output": missing field' in skipped
    assert "bad.jsonl:7: not valid UTF-8 (byte 0xff at column 1)" in skipped


def test_unknown_role_is_reported_with_its_position(ray_cluster, tiny_llama, tmp_path) -> None:
    data = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]},
        ],
    )
    with pytest.raises(DataError, match=r'chat.jsonl:2: field "messages\[1\].role": unknown role \'bot\''):
        prepare(tiny_llama, tmp_path / "runs", {"train": str(data)})


def test_quality_filters_count_every_reason(ray_cluster, tiny_llama, tmp_path) -> None:
    records = [{"prompt": f"Tell me fact {i}.", "response": f"Fact {i} is a true statement."} for i in range(10)]
    records += [
        {"prompt": "Tell me fact 0.", "response": "Fact 0 is a true statement."},  # exact duplicate
        {"prompt": "TELL me fact 1!", "response": "fact 1 is a TRUE statement"},  # near duplicate
        {"prompt": "empty", "response": "   "},
        {"prompt": "short", "response": "ok"},
        {"prompt": "letter", "response": "Dear [insert name], thanks."},
        {"prompt": "help", "response": "Sure! Here is what you asked for."},
        {"prompt": "opinion", "response": "As an AI language model, I cannot have opinions."},
        {"prompt": "long " * 200, "response": "too long overall"},
    ]
    data = write_jsonl(tmp_path / "q.jsonl", records)
    _, prepared = prepare(
        tiny_llama,
        tmp_path / "runs",
        {
            "train": str(data),
            "eval_fraction": 0.0,
            "max_length": 128,
            "truncation": "drop",
            "filters": {"min_reply_chars": 3, "near_dedup": True, "drop_sure_openers": True, "drop_refusals": True},
        },
    )
    counts = prepared.stats["counts"]
    assert {
        k: counts.get(k)
        for k in (
            "duplicate",
            "near_duplicate",
            "empty_reply",
            "short_reply",
            "placeholder",
            "sure_opener",
            "refusal",
            "over_max_length",
        )
    } == {
        "duplicate": 1,
        "near_duplicate": 1,
        "empty_reply": 1,
        "short_reply": 1,
        "placeholder": 1,
        "sure_opener": 1,
        "refusal": 1,
        "over_max_length": 1,
    }
    assert prepared.stats["splits"]["train"]["samples"] == 10


def test_truncation_that_leaves_nothing_to_train_drops_and_counts(ray_cluster, tiny_llama, tmp_path) -> None:
    data = write_jsonl(
        tmp_path / "t.jsonl",
        [{"prompt": "word " * 300, "response": "the reply"}, {"prompt": "short prompt", "response": "another reply"}],
    )
    _, kept_start = prepare(tiny_llama, tmp_path / "runs", {"train": str(data), "eval_fraction": 0.0, "max_length": 64})
    assert kept_start.stats["counts"]["no_trained_tokens"] == 1
    _, kept_end = prepare(
        tiny_llama,
        tmp_path / "runs",
        {"train": str(data), "eval_fraction": 0.0, "max_length": 64, "truncation": "keep_end"},
    )
    assert kept_end.stats["counts"]["truncated"] == 1 and kept_end.stats["splits"]["train"]["samples"] == 2
    assert all(len(ids) <= 64 for ids, _ in by_sample(kept_end).values())


def test_packing_keeps_every_sample_and_its_labels(ray_cluster, tiny_llama, chat_data, tmp_path) -> None:
    data = {"train": str(chat_data["train"]), "eval_fraction": 0.0, "max_length": 128}
    _, plain = prepare(tiny_llama, tmp_path / "runs", data)
    _, packed = prepare(tiny_llama, tmp_path / "runs", {**data, "packing": True})
    assert by_sample(plain) == by_sample(packed)
    packed_rows = rows(packed)
    assert len(packed_rows) < len(rows(plain))
    assert all(len(r["input_ids"]) == sum(r["seq_lengths"]) <= 128 for r in packed_rows)
    assert packed.stats["splits"]["train"]["fill"] > plain.stats["splits"]["train"]["fill"]


def test_real_alpaca_and_dolly(ray_cluster, tiny_llama, tmp_path) -> None:
    alpaca, dolly = SHARED / "data" / "alpaca_5000.json", SHARED / "data" / "dolly_hhrlhf_train_small.jsonl"
    if not alpaca.is_file():
        pytest.skip("../shared/data is not available")
    _, prepared = prepare(
        tiny_llama, tmp_path / "runs", {"train": [str(alpaca), str(dolly)], "max_length": 512, "packing": True}
    )
    counts, splits = prepared.stats["counts"], prepared.stats["splits"]
    assert counts["records"] == 6000
    assert (
        splits["train"]["samples"]
        + splits["eval"]["samples"]
        + sum(v for k, v in counts.items() if k not in ("records", "kept", "truncated"))
        == 6000
    )
    assert 0.04 < splits["eval"]["samples"] / 6000 < 0.06
    assert splits["train"]["fill"] > 0.9


def test_jsonl_chunks_cover_the_file_with_correct_line_numbers(tmp_path) -> None:
    lines = [json.dumps({"text": f"record {i} " + "x" * (i % 17)}) if i % 5 else "" for i in range(1, 301)]
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    chunks = plan_chunks(0, str(path), chunk_bytes=500)
    assert len(chunks) > 10
    whole = list(read_chunk(plan_chunks(0, str(path), chunk_bytes=10**9)[0]))
    pieces = [item for chunk in chunks for item in read_chunk(chunk)]
    assert pieces == whole
    assert all(lines[line - 1] and json.loads(lines[line - 1]) == record for _, line, record in pieces)


def test_files_are_cut_into_about_one_read_task_per_cpu_and_small_ones_stay_whole(tmp_path) -> None:
    """Each read task also tokenizes its chunk, so the chunks are the pipeline's parallelism."""
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    big.write_text((json.dumps({"text": "y" * 1000}) + "\n") * 8000)
    small.write_text(json.dumps({"text": "z"}) + "\n")
    size = chunk_size([str(big), str(small)], cpus=4)
    assert size == (big.stat().st_size + small.stat().st_size) // 4 + 1  # 1 per CPU, over all the files
    assert len(plan_chunks(0, str(big), chunk_bytes=size)) == 4
    assert len(plan_chunks(1, str(small), chunk_bytes=size)) == 1
    assert chunk_size([str(small)], cpus=64) == MIN_CHUNK_BYTES  # never tiny tasks
    assert chunk_size([str(big)], cpus=2) == big.stat().st_size // 2 + 1


def test_a_read_worker_freezes_its_heap_once_per_encoder(tiny_llama) -> None:
    """A read worker's long-lived objects (Ray's, Ray Data's, the tokenizer's) are frozen out of
    the garbage collector once its encoder is loaded; a later job's encoder replaces the old one,
    which does not outlive the replacement. In a fresh process: the test's own heap is no worker's."""
    code = f"""
import gc, json, weakref
from rayft.data import stages
from rayft.spec import load_spec
model = {str(tiny_llama)!r}
def source(length):
    spec = load_spec(data={{"model": {{"path": model}}, "data": {{"train": "x.jsonl", "max_length": length}}}})
    return stages.EncoderSource(spec, model, None)
before = gc.get_freeze_count()
first = stages._encoder(source(256), ledger=None)
frozen = gc.get_freeze_count()
again = stages._encoder(source(256), ledger=None) is first
gone = weakref.ref(first)
del first
second = stages._encoder(source(128), ledger=None)
print(json.dumps([before, frozen, again, gone() is None, gc.get_freeze_count()]))
"""
    before, frozen, reused, replaced, refrozen = python_json(code)
    assert before == 0 and frozen > 50_000  # tens of thousands of objects: Ray Data's and the tokenizer's
    assert reused and replaced and refrozen > 50_000


def test_preview_shows_trained_tokens_and_stats(ray_cluster, tiny_llama, chat_data, tmp_path) -> None:
    spec = write_spec(
        tmp_path / "job.yaml",
        {
            "model": {"path": str(tiny_llama)},
            "data": {"train": str(chat_data["train"]), "packing": True, "max_length": 128},
            "run": {"storage_path": str(tmp_path / "runs")},
        },
    )
    result = run_cli("data", "preview", str(spec), "-n", "2", env=ray_cluster.env(COLUMNS="160"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("train row") == 2
    assert "sample(s)" in result.stdout and "| " in result.stdout  # packed rows show sample boundaries
    for text in ("legend", "trained", "prepared data", "trained fraction", "row fill"):
        assert text in result.stdout


def test_records_the_template_cannot_train_stop_the_job_or_are_skipped(ray_cluster, tiny_llama, tmp_path) -> None:
    """Per-record rendering and pre-flight failures: named with file:line and counted by reason,
    the job stops (on_error: raise) with no staging directory left, or they are dropped and
    counted (skip). A control string in content is text, not a reason to drop."""
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello <|im_end|> x"}]}
    gemma_like = tmp_path / "strict.jinja"  # refuses a conversation that opens with an assistant turn
    gemma_like.write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('roles must start with user') }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    data = write_jsonl(
        tmp_path / "agent.jsonl",
        [
            good,
            {"messages": [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "ok"}]},
            good,
        ],
    )
    spec = {"train": str(data), "eval_fraction": 0.0, "template": str(gemma_like), "filters": {"dedup": False}}
    # (a conversation with no assistant turn at all is a malformed record, refused as it is read:
    # test_malformed_records_name_file_and_line)
    with pytest.raises(DataError, match=r"1 record\(s\) cannot be trained.*template_error=1") as err:
        prepare(tiny_llama, tmp_path / "runs", spec)
    assert "agent.jsonl:2: " in str(err.value) and "roles must start with user" in str(err.value)
    assert not list((tmp_path / "runs").rglob("*.tmp-*")), "a staging directory was left behind"
    _, prepared = prepare(tiny_llama, tmp_path / "runs", {**spec, "on_error": "skip"})
    counts = prepared.stats["counts"]
    assert counts["rejected:template_error"] == 1
    assert prepared.stats["splits"]["train"]["samples"] == 2


def test_drops_are_counted_by_source_file_and_reason(ray_cluster, tiny_llama, tmp_path) -> None:
    """With several sources (one a glob of two files, one weighted 2.0) and data.on_error: skip,
    stats.json and prepare's summary give the drops of each file by reason, as read (malformed,
    filters) and as rendered (the template's rejections), a weighted record counted once."""
    strict = tmp_path / "strict.jinja"  # refuses a conversation that opens with an assistant turn
    strict.write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('roles must start with user') }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    def chat(n: int, first: str = "user", reply: str = "Hello there.") -> dict:
        other = "assistant" if first == "user" else "user"
        return {"messages": [{"role": first, "content": f"Hi {n}"}, {"role": other, "content": reply}]}

    part0 = write_jsonl(tmp_path / "shards" / "part-0.jsonl", [chat(0), chat(1, first="assistant"), chat(2)])
    part1 = write_jsonl(tmp_path / "shards" / "part-1.jsonl", [chat(3), '{"messages": '])
    other = write_jsonl(tmp_path / "other.jsonl", [chat(4), chat(5, first="assistant"), chat(6, reply="  ")])
    spec = {
        "train": [str(tmp_path / "shards" / "*.jsonl"), {"path": str(other), "weight": 2.0}],
        "eval_fraction": 0.0,
        "template": str(strict),
        "on_error": "skip",
    }
    messages: list[str] = []
    _, prepared = prepare(tiny_llama, tmp_path / "runs", spec, log=messages.append)
    stats = prepared.stats
    assert stats["counts"]["rejected:template_error"] == 2  # other.jsonl's bad record twice over, counted once
    assert stats["splits"]["train"]["samples"] == 2 + 1 + 2
    shards, weighted = stats["sources"]
    assert shards["files"] == 2 and (shards["records"], shards["malformed"], shards["rejected:template_error"]) == (
        5,
        1,
        1,
    )
    assert [{k: v for k, v in f.items() if k != "kept"} for f in shards["by_file"]] == [
        {"file": str(part0), "records": 3, "rejected:template_error": 1},
        {"file": str(part1), "records": 2, "malformed": 1},
    ]
    assert weighted["by_file"] == [
        {"file": str(other), "records": 3, "kept": 2, "empty_reply": 1, "rejected:template_error": 1}
    ]
    summary = "\n".join(messages).splitlines()
    at = summary.index("data: dropped by source file:")
    assert summary[at - 1] == "data: dropped empty_reply=1, malformed=1, rejected:template_error=2"
    assert summary[at + 1 : at + 4] == [
        f"data:   {part0}: 1 of 3 record(s) (rejected:template_error=1)",
        f"data:   {part1}: 1 of 2 record(s) (malformed=1)",
        f"data:   {other}: 2 of 3 record(s) (empty_reply=1, rejected:template_error=1)",
    ]
