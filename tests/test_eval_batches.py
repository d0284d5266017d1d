"""The trainer's evaluation (MeteredSFTTrainer.evaluation_loop) packs held-out samples into rows
and batches several rows per forward pass; whatever the batch, its loss is the held-out report's
(rayft.eval.loss: one sample per padded row, token-weighted), and each sample counts once."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest

from rayft.eval.loss import HeldOutLoss, row_losses
from rayft.train.trainer import MeteredSFTTrainer, PackedRows, eval_batches

MAX_LENGTH = 48


@pytest.fixture(scope="module")
def held_out() -> Any:
    """Samples of 5-40 tokens, the prompt's labels masked, as `prepare` writes the eval split."""
    from datasets import Dataset

    rng = random.Random(0)
    rows = []
    for _ in range(23):
        length, prompt = rng.randint(5, 40), rng.randint(1, 4)
        ids = [rng.randrange(3, 200) for _ in range(length)]
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "seq_lengths": [length]})
    return Dataset.from_list(rows)


def evaluate(model_dir: Path, dataset: Any, rows: int, tmp_path: Path) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from rayft.train.callbacks import TokenMeter

    args = SFTConfig(
        output_dir=str(tmp_path / f"rows-{rows}"),
        per_device_eval_batch_size=rows,
        max_length=MAX_LENGTH,
        use_cpu=True,
        report_to="none",
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = MeteredSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa"),
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        meter=TokenMeter(),
    )
    return trainer.evaluate()


def test_packed_rows_in_order_within_max_length(held_out: Any) -> None:
    lengths = [len(ids) for ids in held_out["input_ids"]]
    for rows in (1, 3):
        batches = eval_batches(held_out, range(len(held_out)), MAX_LENGTH, rows, varlen=False)
        packed = [row for batch in batches for row in batch]
        assert [i for row in packed for i in row] == list(range(len(held_out)))  # each sample once, in order
        assert all(len(batch) <= rows for batch in batches) and all(len(b) == rows for b in batches[:-1])
        assert all(sum(lengths[i] for i in row) <= MAX_LENGTH for row in packed)
        # greedy: a row is closed only when the next sample does not fit
        for row, after in zip(packed, packed[1:]):
            assert sum(lengths[i] for i in row) + lengths[after[0]] > MAX_LENGTH
    # flash-attention's varlen kernels take one long row instead
    side_by_side = eval_batches(held_out, range(len(held_out)), MAX_LENGTH, 3, varlen=False)
    varlen = eval_batches(held_out, range(len(held_out)), MAX_LENGTH, 3, varlen=True)
    assert [i for batch in varlen for i in batch[0]] == list(range(len(held_out)))
    assert all(len(batch) == 1 and sum(lengths[i] for i in batch[0]) <= 3 * MAX_LENGTH for batch in varlen)
    assert len(varlen) <= len(side_by_side)


def test_collated_rows_keep_samples_apart_and_never_score_padding() -> None:
    rows = [
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}],
        [{"input_ids": [10, 11], "labels": [-100, 11]}],
    ]
    batch = PackedRows(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    # a sample's first token predicts nothing from the sample before it; padding is never a target
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 11, -100, -100, -100]]
    assert "attention_mask" not in batch  # the position ids alone separate the samples


def test_every_eval_batch_size_gives_the_held_out_reports_loss(tiny_llama: Path, held_out: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    reference = HeldOutLoss.combine(row_losses(AutoModelForCausalLM.from_pretrained(tiny_llama), list(held_out)))
    results = {rows: evaluate(tiny_llama, held_out, rows, tmp_path) for rows in (1, 3, 8)}
    for rows, metrics in results.items():
        assert metrics["eval_tokens"] == reference.tokens, rows
        assert metrics["eval_loss"] == pytest.approx(reference.loss, rel=1e-5), rows
        assert math.isfinite(metrics["eval_loss"])
