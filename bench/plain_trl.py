"""The baseline for ray_overhead.py: the same SFT work as a plain single-process TRL script.

Same model directory, same LoRA, same pre-tokenized packed rows (rayft's prepared parquet, so
both train on identical tokens), same batch, steps and optimizer; no Ray. Prints one JSON line.
"""

import time

STARTED = time.time()

import json  # noqa: E402
import sys  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402


class CountingTrainer(SFTTrainer):
    tokens = 0
    first_step_at = None

    def training_step(self, model, inputs, *args, **kwargs):
        if self.first_step_at is None:
            self.first_step_at = time.time()
        self.tokens += (
            int(inputs["input_ids"].numel()) if "attention_mask" not in inputs else int(inputs["attention_mask"].sum())
        )
        return super().training_step(model, inputs, *args, **kwargs)


def main(model_dir: str, train_files: list[str], steps: int, output_dir: str) -> None:
    torch.set_num_threads(1)
    set_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    dataset = Dataset(pq.read_table(train_files, columns=["input_ids", "labels", "seq_lengths"]))
    args = SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        logging_steps=5,
        save_strategy="steps",
        save_steps=steps,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=42,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = CountingTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True),
    )
    began = time.time()
    trainer.train()
    train_seconds = time.time() - began
    print(
        json.dumps(
            {
                "tokens": trainer.tokens,
                "train_seconds": train_seconds,
                "tokens_per_second": trainer.tokens / train_seconds,
                "seconds_to_first_step": trainer.first_step_at - STARTED,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
