"""TRL's SFTTrainer as rayft drives it: its arguments from the spec, and one subclass that feeds
every micro-batch to the token meter and the sample log."""

from __future__ import annotations

from typing import Any

from trl import SFTConfig, SFTTrainer

from rayft.spec import JobSpec, StepPlan
from rayft.train.callbacks import SampleLog, TokenMeter
from rayft.train.deepspeed import deepspeed_config


class MeteredSFTTrainer(SFTTrainer):
    """SFTTrainer that counts the tokens of every micro-batch it trains on (TokenMeter) and,
    with run.log_samples, records which samples each optimizer step trained on (SampleLog)."""

    def __init__(self, *args: Any, meter: TokenMeter, sample_log: SampleLog | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.meter, self.sample_log = meter, sample_log

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        ids = inputs.pop("sample_ids", None)
        if ids is not None and self.sample_log is not None:
            self.sample_log.record(self.state.global_step + 1, ids)  # the step this batch ends in
        self.meter.count(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        inputs.pop("sample_ids", None)
        return super().prediction_step(model, inputs, *args, **kwargs)


def sft_config(spec: JobSpec, output_dir: str, *, has_eval: bool, steps: StepPlan) -> SFTConfig:
    """The trainer's arguments. The batch is per worker: `train_loop_per_worker`'s docstring
    says why the global batch stays `train.global_batch_size` at any worker count."""
    train, precision = spec.train, spec.precision
    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=train.micro_batch_size,
        per_device_eval_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
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
        gradient_checkpointing=spec.method.gradient_checkpointing,
        logging_steps=train.log_every,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=steps.eval_every,
        save_strategy="steps",
        save_steps=steps.save_every,
        save_total_limit=1,  # local scratch only: Ray keeps the checkpoints in storage
        report_to="none",
        disable_tqdm=True,
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenized, masked and packed by `prepare`
        # The collator picks the columns it needs; with run.log_samples it also reads sample_ids.
        remove_unused_columns=not spec.run.log_samples,
        max_length=spec.data.max_length,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        deepspeed=deepspeed_config(spec) if spec.method.deepspeed else None,
    )
