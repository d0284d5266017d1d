"""What each Ray Train worker runs: prepared shards -> SFTTrainer -> checkpoints in storage.

Reads top to bottom like a single-process TRL script; Ray shows up only in the callbacks that
report checkpoints and progress, and in `ray.train.get_checkpoint()` for resuming.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

from rayft.data.prepare import Prepared, load_split
from rayft.spec import JobSpec
from rayft.train import callbacks, logs
from rayft.storage import FINAL_METRICS
from rayft.train.tracking import MetricsToTracker


def train_loop_per_worker(config: dict[str, Any]) -> None:
    logs.quiet_worker()
    import ray.train
    import torch
    from ray.train.huggingface.transformers import prepare_trainer
    from transformers import set_seed
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from rayft.model import load_model, load_tokenizer, materialized_dir

    spec = JobSpec.model_validate(config["spec"])
    prepared = Prepared(**config["prepared"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    board = config.get("board")
    if not spec.scaling.use_gpu:
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))

    callbacks.post(board, rank, phase="loading model")
    model_dir = config["model_dir"]
    if not os.path.isdir(model_dir) and os.path.isabs(model_dir):
        model_dir = materialized_dir(spec)  # the driver's conversion is on another node: convert here
    set_seed(spec.train.seed)  # before the model: LoRA weights are initialized from it
    tokenizer = load_tokenizer(spec, model_dir)
    if config.get("chat_template"):
        tokenizer.chat_template = config["chat_template"]  # the template the data was rendered with
    model = load_model(spec, model_dir)
    if spec.method.deepspeed:
        from rayft.train.deepspeed_ops import load_ops, ops_needed

        load_ops(ops_needed(config_for_deepspeed(spec), use_gpu=spec.scaling.use_gpu))
    train_dataset, eval_dataset = load_split(prepared, "train"), load_split(prepared, "eval")

    output_dir = tempfile.mkdtemp(prefix=f"rayft-{spec.run_name}-rank{rank}-")
    args = sft_config(spec, output_dir, has_eval=eval_dataset is not None, steps=config["steps"])
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=spec.data.packing)
    resume = _restore(ray.train.get_checkpoint(), output_dir)
    samples = callbacks.SampleLog(config["run_dir"], rank, _step_of(resume)) if spec.run.log_samples else None
    trainer = token_counting_trainer()(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=callbacks.WithSampleIds(collator) if samples else collator,
    )
    trainer.sample_log = samples
    if samples:
        trainer.add_callback(samples)
    if os.environ.get("RAYFT_TEST_STEP_SECONDS"):
        trainer.add_callback(callbacks.StepThrottle(float(os.environ["RAYFT_TEST_STEP_SECONDS"])))
    trainer.add_callback(callbacks.CheckpointReporter())
    tracked = None
    if rank == 0:
        trainer.add_callback(callbacks.ThroughputInLogs(trainer))  # first: the others read its value
        trainer.add_callback(callbacks.ProgressReporter(board, trainer))
        timeline = callbacks.MetricsTimeline(config["run_dir"], trainer, _step_of(resume))
        trainer.add_callback(timeline)
        if config.get("tracker") is not None:
            tracked = MetricsToTracker(config["tracker"], config["tracker_key"])
            trainer.add_callback(tracked)
    trainer = prepare_trainer(trainer)

    callbacks.post(board, rank, phase="training", resumed_from_step=_step_of(resume))
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.time() - started

    final_eval = trainer.evaluate() if eval_dataset is not None else {}
    if samples:
        samples.flush()
    tokens = trainer.token_totals(world)
    final_dir = _save_final(trainer, spec, config["run_dir"], rank)
    summary = {
        "train_loss": result.training_loss, "eval_loss": final_eval.get("eval_loss"),
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
        "tokens": tokens["tokens"], "trained_tokens": tokens["trained_tokens"],
        "tokens_per_second": tokens["tokens"] / max(train_seconds, 1e-9),
        "train_seconds": train_seconds, "model_dir": final_dir, "resumed_from_step": _step_of(resume),
    }
    if rank == 0:
        timeline.flush()  # with the final evaluation, logged after on_train_end
        if tracked is not None:
            tracked.flush(summary)
        # Ray keeps only checkpoint-attached metrics in the result; the summary goes to storage.
        from rayft.storage import write_json

        write_json(f"{config['run_dir'].rstrip('/')}/{FINAL_METRICS}", summary)
    ray.train.report({**summary, "step": trainer.state.global_step, "final": True})
    shutil.rmtree(output_dir, ignore_errors=True)


def sft_config(spec: JobSpec, output_dir: str, *, has_eval: bool, steps: dict[str, int]) -> Any:
    from trl import SFTConfig

    train, precision = spec.train, spec.precision
    eval_every = train.eval_every or steps["save_every"]
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
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=steps["save_every"],
        save_total_limit=1,  # local scratch only: Ray keeps the checkpoints in storage
        report_to="none",
        disable_tqdm=True,
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenized, masked and packed by `prepare`
        # The collator picks the columns it needs; with run.log_samples it also reads sample_ids.
        remove_unused_columns=not spec.run.log_samples,
        max_length=spec.data.max_length,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        deepspeed=config_for_deepspeed(spec),
    )


def config_for_deepspeed(spec: JobSpec) -> dict[str, Any] | None:
    if not spec.method.deepspeed:
        return None
    from rayft.train.deepspeed import deepspeed_config

    return deepspeed_config(spec)


def token_counting_trainer() -> type:
    """SFTTrainer plus token counts (built on call: the driver imports this module without TRL)."""
    from trl import SFTTrainer

    class _Trainer(SFTTrainer):
        """SFTTrainer that counts the tokens it trains on (all, and those with a loss)."""

        _tokens = 0
        _trained = 0
        sample_log: Any = None

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            ids = inputs.pop("sample_ids", None)
            if ids is not None and self.sample_log is not None:
                self.sample_log.record(self.state.global_step + 1, ids)  # the step this batch ends in
            labels = inputs.get("labels")
            if labels is not None:
                mask = inputs.get("attention_mask")
                self._tokens += int(mask.sum()) if mask is not None else int(labels.numel())
                self._trained += int((labels != -100).sum())
            return super().training_step(model, inputs, *args, **kwargs)

        def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            inputs.pop("sample_ids", None)
            return super().prediction_step(model, inputs, *args, **kwargs)

        def token_totals(self, world: int) -> dict[str, int]:
            import torch
            import torch.distributed as dist

            counts = torch.tensor([self._tokens, self._trained], dtype=torch.float64, device=self.args.device)
            if world > 1 and dist.is_initialized():
                dist.all_reduce(counts)
            return {"tokens": int(counts[0]), "trained_tokens": int(counts[1])}

    return _Trainer


def _restore(checkpoint: Any, output_dir: str) -> str | None:
    """Ray's latest checkpoint (after a failure or a rerun) -> a local HF checkpoint directory."""
    if checkpoint is None:
        return None
    local = checkpoint.to_directory(os.path.join(output_dir, "restored"))
    inner = os.path.join(local, callbacks.CheckpointReporter.CHECKPOINT_NAME)
    return inner if os.path.isdir(inner) else local


def _step_of(resume: str | None) -> int:
    if not resume:
        return 0
    import json

    state = os.path.join(resume, "trainer_state.json")
    return json.load(open(state))["global_step"] if os.path.isfile(state) else 0


def _save_final(trainer: Any, spec: JobSpec, run_dir: str, rank: int) -> str:
    """The trained model as an HF directory in storage: the adapter for LoRA, else the weights
    (ZeRO-3 gathers them; every rank takes part in that)."""
    from rayft.storage import upload_dir

    local = tempfile.mkdtemp(prefix="rayft-final-")
    trainer.save_model(local)
    target = f"{run_dir.rstrip('/')}/model"
    if rank == 0:
        trainer.processing_class.save_pretrained(local)
        upload_dir(local, target)
        if spec.run.save_merged and spec.method.kind != "full":
            from rayft.export import merge_adapter

            merged = tempfile.mkdtemp(prefix="rayft-merged-")
            merge_adapter(local, merged, spec)
            upload_dir(merged, f"{run_dir.rstrip('/')}/model-merged")
            shutil.rmtree(merged, ignore_errors=True)
    shutil.rmtree(local, ignore_errors=True)
    return target
