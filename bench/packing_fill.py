"""How full packed rows are: rayft's packing (best-fit-decreasing refined by row patterns)
against best-fit-decreasing alone and the bound no packing can beat, on the lengths rayft's
encoder gives the samples. No training, no Ray: seconds.

    python bench/packing_fill.py

Data: ../shared/data/alpaca_5000.json (SmolLM2-135M-Instruct's tokenizer and chat template)
at max_length 512, 1024 and 2048, and the quickstart's training data at 128 (its spec's system
prompt). Fill = tokens / (rows x max_length); the bound is ceil(tokens / max_length) rows.
Recorded in bench/results/packing_fill.{json,md}.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, record  # noqa: E402


def lengths(records: list[dict], fmt: str, system_prompt: str | None, tokenizer, max_length: int) -> list[int]:
    from rayft.data.formats import to_sample
    from rayft.data.templates import resolve_template
    from rayft.data.tokenize import encode_conversations

    template = resolve_template("tokenizer", tokenizer)
    samples = [to_sample(r, fmt, {}, system_prompt, "data", i + 1) for i, r in enumerate(records)]
    encoded = encode_conversations([s["messages"] for s in samples], template, tokenizer)
    return [min(len(e.input_ids), max_length) for e in encoded]


def fill(sizes: list[int], capacity: int) -> dict[str, float]:
    from rayft.data.packing import pack, pack_best_fit

    started = time.time()
    bfd = len(pack_best_fit(sizes, capacity))
    bfd_seconds = time.time() - started
    started = time.time()
    rows = len(pack(sizes, capacity))
    seconds = time.time() - started
    total = sum(sizes)
    bound = math.ceil(total / capacity)
    return {
        "samples": len(sizes),
        "tokens": total,
        "bound_rows": bound,
        "bfd_rows": bfd,
        "rows": rows,
        "bfd_fill": total / (bfd * capacity),
        "fill": total / (rows * capacity),
        "bound_fill": total / (bound * capacity),
        "bfd_seconds": bfd_seconds,
        "seconds": seconds,
    }


def main() -> None:
    from transformers import AutoTokenizer

    model = next((REPO / "runs" / ".models").glob("SmolLM2-135M-Instruct*"), None)
    if model is None:
        raise SystemExit("run the quickstart once first (make quickstart): it converts SmolLM2's GGUF")
    tokenizer = AutoTokenizer.from_pretrained(model)
    alpaca = json.loads((REPO.parent / "shared" / "data" / "alpaca_5000.json").read_text())
    quickstart = [json.loads(line) for line in (REPO / "data" / "quickstart" / "train.jsonl").read_text().splitlines()]
    cases = [("alpaca", n, lengths(alpaca, "alpaca", None, tokenizer, n)) for n in (512, 1024, 2048)]
    cases.append(("quickstart", 128, lengths(quickstart, "messages", "Answer with just the answer.", tokenizer, 128)))
    results = {f"{name}@{n}": fill(sizes, n) for name, n, sizes in cases}
    rows = [
        "| data @ max_length | samples | rows: tokens/row bound / BFD / rayft | fill: BFD | fill: rayft | pack time |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for key, r in results.items():
        rows.append(
            f"| {key} | {r['samples']:,} | {r['bound_rows']:,} / {r['bfd_rows']:,} / {r['rows']:,} | "
            f"{r['bfd_fill']:.1%} | **{r['fill']:.1%}** | {r['seconds']:.2f} s |"
        )
    text = "# How full packed rows are\n\n" + __doc__.split("\n\n")[2].strip() + "\n\n" + "\n".join(rows)
    print(text)
    print(f"recorded {record('packing_fill', results, text)}")


if __name__ == "__main__":
    main()
