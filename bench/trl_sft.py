"""The baseline for e2e_vs_trl.py: the same job as a plain TRL script, as its docs show it.

One process (torch threads = this machine's cores), TRL's own preparation of the records (its
chat template, completion-only loss for prompt/completion data), padded batches, no evaluation
during training, one final evaluation, the adapter saved. Prints one JSON line.

    python bench/trl_sft.py MODEL_DIR TRAIN.jsonl EVAL.jsonl OUT_DIR
"""

import time

STARTED = time.time()

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402


def conversation(record: dict) -> dict:
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input", "").strip() else "")
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": record["output"]}],
    }


def main(model_dir: str, train_file: str, eval_file: str, out_dir: str) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    records = {
        name: [json.loads(line) for line in Path(path).read_text().splitlines()]
        for name, path in (("train", train_file), ("eval", eval_file))
    }
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(
        output_dir=out_dir,
        max_length=384,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_train_epochs=1,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        logging_steps=10,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=42,
        bf16=False,
        gradient_checkpointing=False,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        peft_config=lora,
        train_dataset=Dataset.from_list([conversation(r) for r in records["train"]]),
        eval_dataset=Dataset.from_list([conversation(r) for r in records["eval"]]),
    )
    began = time.time()
    output = trainer.train()
    train_seconds = time.time() - began
    began = time.time()
    final = trainer.evaluate()
    eval_seconds = time.time() - began
    trainer.save_model(out_dir)
    print(
        json.dumps(
            {
                "wall_seconds": time.time() - STARTED,
                "train_seconds": train_seconds,
                "eval_seconds": eval_seconds,
                "train_loss": output.training_loss,
                "trl_eval_loss": final["eval_loss"],
                "num_tokens": max((e.get("num_tokens", 0) for e in trainer.state.log_history), default=0),
                "steps": trainer.state.global_step,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "adapter": out_dir,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
