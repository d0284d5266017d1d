"""TRL's SFTTrainer as rayft drives it: its arguments from the spec, and one subclass that feeds
every micro-batch to the token meter and the sample log, and evaluates as rayft defines the
held-out loss everywhere."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from transformers.trainer_utils import EvalLoopOutput
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from rayft.data.tokenize import IGNORE
from rayft.spec import JobSpec, StepPlan
from rayft.spec.schema import FLASH_ATTENTION
from rayft.train.callbacks import CadenceOfThisRun, SampleLog, TokenMeter
from rayft.train.deepspeed import deepspeed_config
from rayft.train.fsdp import fsdp_config


class MeteredSFTTrainer(SFTTrainer):
    """SFTTrainer that counts the tokens of every micro-batch it trains on (TokenMeter) and,
    with run.log_samples, records which samples each optimizer step trained on (SampleLog). A
    resumed run keeps its own logging, evaluation and checkpoint cadence (CadenceOfThisRun)."""

    def __init__(self, *args: Any, meter: TokenMeter, sample_log: SampleLog | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.add_callback(CadenceOfThisRun())
        self.meter, self.sample_log = meter, sample_log
        self.eval_seconds = 0.0  # wall time spent evaluating, for the run summary
        self.save_seconds = 0.0  # ... and writing checkpoints locally (uploads: CheckpointReporter)

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        ids = inputs.pop("sample_ids", None)
        if ids is not None and self.sample_log is not None:
            self.sample_log.record(self.state.global_step + 1, ids)  # the step this batch ends in
        self.meter.count(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        inputs.pop("sample_ids", None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        started = time.time()
        super()._save_checkpoint(model, trial)  # private in transformers; timed for the summary only
        self.save_seconds += time.time() - started

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """The held-out loss as rayft defines it everywhere (rayft.eval.loss): the mean
        cross-entropy over every trained token of the split, not a mean of batch means. Each row
        is scored once over all workers (no even-batches padding), in packed batches of
        `train.eval_batch_size` rows (eval_batches says how), through TRL's fused LM head (no
        full logits)."""
        started = time.time()
        nll, tokens, rows = self._token_losses(self.eval_dataset)
        self.eval_seconds += time.time() - started
        loss = nll / tokens if tokens else float("nan")
        return EvalLoopOutput(
            predictions=None,
            label_ids=None,
            num_samples=rows,
            metrics={f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_tokens": tokens},
        )

    def _token_losses(self, dataset: Any) -> tuple[float, int, int]:
        """(summed token losses, trained tokens, rows) over `dataset`, all workers together."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        varlen = getattr(self.model.config, "_attn_implementation", None) in FLASH_ATTENTION
        batches = eval_batches(
            dataset,
            range(rank, len(dataset), world),
            self.args.max_length,
            self.args.per_device_eval_batch_size,
            varlen,
        )
        # every rank runs as many forwards (ZeRO-3 gathers the weights in each): one short of
        # batches scores a row of the split with weight 0
        count = self._all_reduce(torch.tensor([float(len(batches))]), dist.ReduceOp.MAX) if world > 1 else None
        padding = int(count.item()) - len(batches) if count is not None else 0
        collate = PackedRows(self.processing_class.pad_token_id)
        samples = dataset.select_columns(list(TOKEN_FIELDS))  # a sample read once, not once a field
        totals = torch.zeros(3, dtype=torch.float64)
        model, was_training = self.model, self.model.training
        model.eval()
        with torch.no_grad():
            for number, batch in enumerate([*batches, *[[[0]]] * padding]):
                inputs = collate([[samples[i] for i in row] for row in batch])
                inputs = {k: v.to(self.args.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
                outputs = model(**inputs, use_cache=False, fused_lm_head=True)
                if number < len(batches):
                    scored = sum(len(row) for row in batch)
                    totals += torch.tensor(
                        [float(-outputs.log_probs.double().sum()), float(outputs.label_mask.sum()), float(scored)],
                        dtype=torch.float64,
                    )
        model.train(was_training)
        if world > 1:
            totals = self._all_reduce(totals, dist.ReduceOp.SUM)
        nll, tokens, rows = totals.tolist()
        return nll, int(tokens), int(rows)

    def _all_reduce(self, values: torch.Tensor, op: Any) -> torch.Tensor:
        device = self.args.device if dist.get_backend() == "nccl" else torch.device("cpu")
        values = values.to(device)
        dist.all_reduce(values, op=op)
        return values.cpu()


TOKEN_FIELDS = ("input_ids", "labels", "seq_lengths")


def eval_batches(dataset: Any, indices: Any, max_length: int, rows: int, varlen: bool) -> list[list[list[int]]]:
    """The samples `indices` of `dataset`, in order, as evaluation batches: each batch a list of
    rows, each row the samples packed into at most `max_length` tokens (a longer sample alone).
    With varlen attention (flash-attention) a batch is one row of up to `rows` x `max_length`
    tokens: the kernel keeps the samples apart at no cost. Otherwise (sdpa, eager), packed
    samples need a block-diagonal mask, quadratic in the row's length, so a batch is `rows`
    rows of `max_length` side by side (on CPU, 8 rows of 384 tokens in one long row instead
    took 1.9x as long)."""
    lengths = dataset.select_columns(["input_ids"])
    width = rows * max_length if varlen else max_length
    packed: list[list[int]] = []
    tokens = 0
    for index in indices:
        length = len(lengths[index]["input_ids"])
        if not packed or tokens + length > width:
            packed.append([])
            tokens = 0
        packed[-1].append(index)
        tokens += length
    if varlen:
        return [[row] for row in packed]
    return [packed[start : start + rows] for start in range(0, len(packed), rows)]


class PackedRows:
    """Collates rows of samples into a batch with no attention mask: each row's samples end to
    end with their own position ids (which keep them apart in every attention implementation),
    rows right-padded to the longest with pad tokens that each start a sequence of their own and
    are never scored."""

    def __init__(self, pad_token_id: int):
        self.flat = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[list[dict[str, Any]]]) -> dict[str, torch.Tensor]:
        if len(rows) == 1:
            return self.flat(rows[0])  # with the sequence boundaries varlen kernels read
        flat = [self.flat(row) for row in rows]
        width = max(row["input_ids"].shape[1] for row in flat)
        fill = {"input_ids": self.pad_token_id, "labels": IGNORE, "position_ids": 0}
        return {
            key: torch.cat(
                [torch.nn.functional.pad(row[key], (0, width - row[key].shape[1]), value=value) for row in flat]
            )
            for key, value in fill.items()
        }


def sft_config(
    spec: JobSpec,
    output_dir: str,
    *,
    has_eval: bool,
    steps: StepPlan,
    precision: str | None = None,
    workers: int | None = None,
) -> SFTConfig:
    """The trainer's arguments. The batch is per worker: SFTRecipe's docstring says why the
    global batch stays `train.global_batch_size` at any worker count. `precision`: the run
    plan's (auto decided on the machine); default the spec's. `workers`: the size of the worker
    group this attempt has (an elastic run's changes); default scaling.num_workers."""
    train, precision = spec.train, precision or spec.precision
    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=train.micro_batch_size,
        per_device_eval_batch_size=train.eval_rows,
        gradient_accumulation_steps=spec.accumulation_at(workers or spec.scaling.num_workers),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup,  # below 1: a fraction of the total steps (transformers 5)
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optimizer,
        seed=train.seed,
        data_seed=train.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not spec.scaling.use_gpu,
        # with FSDP, FSDP's own activation checkpointing (rayft.train.fsdp) instead of the trainer's
        gradient_checkpointing=spec.method.gradient_checkpointing and spec.method.fsdp is None,
        logging_steps=train.log_every,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=steps.eval_every,
        save_strategy="steps",
        save_steps=steps.save_every,
        save_total_limit=1,  # local scratch only: each checkpoint moves to Ray for upload (CheckpointReporter)
        report_to="none",
        disable_tqdm=True,
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenized, masked and packed by `prepare`
        # The collator picks the columns it needs; with run.log_samples it also reads sample_ids.
        remove_unused_columns=not spec.run.log_samples,
        max_length=spec.data.max_length,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        deepspeed=deepspeed_config(spec) if spec.method.deepspeed else None,
        fsdp=spec.method.fsdp is not None,
        fsdp_config=fsdp_config(spec) if spec.method.fsdp is not None else None,
        # Liger's layer kernels only: TRL's chunked LM head computes the loss (it refuses Liger's fused one)
        use_liger_kernel=spec.method.liger,
    )
