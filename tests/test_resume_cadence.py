"""A run resumed with changes (more steps: another checkpoint and evaluation cadence) logs,
evaluates and checkpoints at its own cadence, not at the one saved in the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rayft.train.callbacks import TokenMeter
from rayft.train.trainer import MeteredSFTTrainer


def trainer(model_dir: Path, out: Path, steps: int, every: int) -> Any:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    sample = {"input_ids": list(range(3, 19)), "labels": list(range(3, 19)), "seq_lengths": [16]}
    rows = Dataset.from_list([sample] * 8)
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=steps,
        logging_steps=every,
        eval_strategy="steps",
        eval_steps=every,
        save_strategy="steps",
        save_steps=every,
        use_cpu=True,
        report_to="none",
        max_length=32,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    return MeteredSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=rows,
        eval_dataset=rows.select(range(2)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        data_collator=DataCollatorForLanguageModeling(pad_token_id=0),
        meter=TokenMeter(),
    )


@pytest.mark.slow
def test_a_resumed_run_keeps_its_own_cadence(tiny_llama: Path, tmp_path: Path) -> None:
    first = trainer(tiny_llama, tmp_path / "first", steps=2, every=1)
    first.train()
    resumed = trainer(tiny_llama, tmp_path / "resumed", steps=6, every=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-2"))

    state = resumed.state
    assert (state.logging_steps, state.eval_steps, state.save_steps) == (3, 3, 3)
    evaluated = [entry["step"] for entry in state.log_history if "eval_loss" in entry]
    assert evaluated == [1, 2, 3, 6]  # the first run's two, then this run's (not 3, 4, 5, 6)
    saved = sorted(int(path.name.split("-")[1]) for path in (tmp_path / "resumed").glob("checkpoint-*"))
    assert saved == [3, 6]
