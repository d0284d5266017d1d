"""The SFT recipe each Ray Train worker runs: setup, train, finish.

It reads like a single-process TRL script. Ray shows up in three places only: the callback that
reports checkpoints to Ray Train's storage (and `ray.train.get_checkpoint()` to resume from
them), `prepare_trainer`, and the small actors that carry progress and W&B logs to the driver.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from typing import Any

import ray.train
import torch
from ray.train.huggingface.transformers import prepare_trainer
from transformers import set_seed
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from rayft import storage
from rayft.data.prepared import load_split
from rayft.env import adopt_secrets
from rayft.model import load_model, load_tokenizer, materialized_dir
from rayft.model.attention import check_liger, resolve_attention
from rayft.model.trained import merge_adapter
from rayft.quiet import quiet_worker
from rayft.rundir import HF_CHECKPOINT
from rayft.train import callbacks
from rayft.train.ddp import broadcast_trainable_only
from rayft.train.deepspeed import deepspeed_config
from rayft.train.deepspeed_ops import load_ops, ops_needed
from rayft.train.epoch import whole_steps
from rayft.train.lm_head import compact_fused_lm_head
from rayft.train.result import RunResult
from rayft.train.run import RunPlan
from rayft.train.services import WorkerServices
from rayft.train.trainer import MeteredSFTTrainer, sft_config

STEP_SECONDS_HOOK = "RAYFT_TEST_STEP_SECONDS"  # test hook: sleep after each step (CONTRIBUTING.md)
HOLD_FILE_HOOK = "RAYFT_TEST_HOLD_FILE"  # test hook: no step (or none from the one it names) ends while it exists
HANG_AT_STEP_HOOK = "RAYFT_TEST_HANG_AT_STEP"  # test hook: the last rank hangs after that step


class SFTRecipe:
    """Supervised fine-tuning of one worker of a Ray Train worker group.

    Constant global batch: the spec names `train.global_batch_size` (rows a step, all workers
    together). Each worker runs micro-batches of `train.micro_batch_size` and accumulates
    `global / (micro x workers)` of them (JobSpec.gradient_accumulation_steps), so a step sees the
    same rows whatever the worker count. TRL normalizes the loss by the trained-token count of
    the whole global batch, so 1 and 2 workers give the same loss curve (tests/test_train.py)
    and a run resumes on another worker count without changing the optimization.

    Features and their trade-offs:
    - Prepared data from storage, memory-mapped (rayft.data.prepared): no tokenization on the
      workers, and exact mid-epoch resume through the HF sampler; the data must be prepared first.
    - Packing (data.packing): padding-free rows with per-sample position_ids, so no sample attends
      to another; needs an attention implementation that honours position_ids (sdpa, flash).
    - LoRA / QLoRA (method.kind): few trainable parameters; QLoRA keeps frozen weights in 16 bits
      (rayft.model.loading) and turns off a bitsandbytes CPU path that breaks LoRA gradients.
    - DeepSpeed ZeRO (method.deepspeed): shards optimizer states, gradients and weights; its CPU
      ops are compiled once per node under a lock (rayft.train.deepspeed_ops).
    - FSDP2 (method.fsdp, GPU): the HF trainer's FSDP plugin (accelerate's fully_shard per decoder
      layer), configured in rayft.train.fsdp; checkpoints resume at another worker count.
    - Attention (model.attn_implementation): chosen here, on the worker (rayft.model.attention).
    - Checkpoints every `save_every` steps, uploaded to Ray Train's storage: a failure costs at
      most the steps since the last one. Local scratch keeps only the newest.
    - Rank 0 alone writes progress, the metrics timeline and W&B logs; every rank writes its
      sample log (run.log_samples) and takes part in saving (ZeRO-3 gathers the weights).
    """

    def __init__(self, plan: RunPlan, services: WorkerServices):
        self.plan, self.spec, self.services = plan, plan.spec, services
        context = ray.train.get_context()
        self.rank, self.workers = context.get_world_rank(), context.get_world_size()

    # ------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        spec, plan = self.spec, self.plan
        adopt_secrets(self.services.secrets)  # before anything reads storage or a hub
        quiet_worker()
        if not spec.scaling.use_gpu:
            torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
        callbacks.post(self.services.board, self.rank, phase="loading model", workers=self.workers)
        model_dir = materialized_dir(spec)  # this node's copy (a GGUF converted here if it has none)
        set_seed(spec.train.seed)  # before the model: LoRA weights are initialized from it
        tokenizer = load_tokenizer(spec, model_dir)
        if plan.prepared.template:
            tokenizer.chat_template = plan.prepared.template  # the template the data was rendered with
        attention, why = resolve_attention(spec)  # on the worker: its GPU and packages decide
        check_liger(spec)
        if self.rank == 0:
            print(f"rayft: attention {attention} ({why})", flush=True)
        model = load_model(spec, model_dir, attention, plan.precision)
        if spec.method.deepspeed:
            load_ops(ops_needed(deepspeed_config(spec), use_gpu=spec.scaling.use_gpu))
        train_data, eval_data = load_split(plan.prepared, "train"), load_split(plan.prepared, "eval")
        train_data = whole_steps(train_data, spec.train.global_batch_size, tokenizer.pad_token_id)
        self.scratch = tempfile.mkdtemp(prefix=f"rayft-{spec.run_name}-rank{self.rank}-")
        self.resume = _restore(ray.train.get_checkpoint(), self.scratch)
        self.resumed_from_step = _step_of(self.resume)
        self.meter = callbacks.TokenMeter()
        samples = callbacks.SampleLog(plan.run_dir, self.rank, self.resumed_from_step) if spec.run.log_samples else None
        collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=spec.data.packing)
        self.trainer = MeteredSFTTrainer(
            model=model,
            args=sft_config(
                spec,
                self.scratch,
                has_eval=eval_data is not None,
                steps=plan.steps,
                precision=plan.precision,
                workers=self.workers,
            ),
            train_dataset=train_data,
            eval_dataset=eval_data,
            processing_class=tokenizer,
            data_collator=callbacks.WithSampleIds(collator) if samples else collator,
            meter=self.meter,
            sample_log=samples,
        )
        compact_fused_lm_head(self.trainer.model)  # CPU: the LM head scores labelled positions only
        broadcast_trainable_only(self.trainer.model)  # every rank loaded the frozen weights itself
        if spec.method.fsdp is not None and not self.trainer.is_fsdp_enabled:
            # accelerate drops an FSDP plugin it cannot use without a word; never train unsharded instead
            raise RuntimeError(
                f"method.fsdp: accelerate did not enable FSDP on this worker ({self.trainer.args.device})"
            )
        self._add_callbacks(samples)
        self.trainer = prepare_trainer(self.trainer)

    def _add_callbacks(self, samples: callbacks.SampleLog | None) -> None:
        trainer, plan = self.trainer, self.plan
        trainer.add_callback(self.meter)  # first: the callbacks below read its tokens/s
        trainer.add_callback(callbacks.LogAtCheckpoints())  # the run's train loss covers every step
        if samples:
            trainer.add_callback(samples)
        if os.environ.get(STEP_SECONDS_HOOK) or os.environ.get(HOLD_FILE_HOOK):
            seconds = float(os.environ.get(STEP_SECONDS_HOOK) or 0)
            trainer.add_callback(callbacks.StepThrottle(seconds, os.environ.get(HOLD_FILE_HOOK)))
        if os.environ.get(HANG_AT_STEP_HOOK):
            hang = callbacks.InjectedHang(int(os.environ[HANG_AT_STEP_HOOK]), self.rank, self.resumed_from_step == 0)
            trainer.add_callback(hang)
        trainer.add_callback(callbacks.HangWatchdog(self.spec.run.hang_timeout_s, self.services.board, self.rank))
        self.reporter = callbacks.CheckpointReporter(self.plan.checkpoint_metric, self.spec.run.checkpoint_mode)
        trainer.add_callback(callbacks.PreemptionCheckpoint(self.reporter, self.services.board, self.rank))
        trainer.add_callback(self.reporter)
        self.timeline = self.tracked = None
        if self.rank == 0:
            trainer.add_callback(callbacks.ProgressReporter(self.services.board, self.meter))
            self.timeline = callbacks.MetricsTimeline(plan.run_dir, self.meter, self.resumed_from_step)
            trainer.add_callback(self.timeline)
            if self.services.tracker is not None:
                self.tracked = callbacks.MetricsToTracker(self.services.tracker, plan.tracker_key)
                trainer.add_callback(self.tracked)

    # ------------------------------------------------------------------------------- train
    def train(self) -> None:
        callbacks.post(self.services.board, self.rank, phase="training", resumed_from_step=self.resumed_from_step)
        started = time.time()
        self.output = self.trainer.train(resume_from_checkpoint=self.resume)
        self.train_seconds = time.time() - started

    # ------------------------------------------------------------------------------ finish
    def finish(self) -> RunResult:
        trainer = self.trainer
        final_eval = self._final_evaluation()
        tokens, trained = self.meter.totals()
        saving = time.time()
        model_dir = self._save_final()
        result = RunResult(
            steps=trainer.state.global_step,
            epochs=float(trainer.state.epoch or 0),
            train_loss=callbacks.run_train_loss(trainer.state.log_history),
            eval_loss=final_eval.get("eval_loss"),
            tokens=tokens,
            trained_tokens=trained,
            train_seconds=self.train_seconds,
            eval_seconds=trainer.eval_seconds,
            checkpoint_seconds=trainer.save_seconds + self.reporter.seconds,
            save_seconds=time.time() - saving,
            model_dir=model_dir,
            resumed_from_step=self.resumed_from_step,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        )
        if self.timeline is not None:
            self.timeline.flush()  # with the final evaluation, logged after on_train_end
        if self.tracked is not None:
            self.tracked.flush(result.to_dict())
        # Tune reads the final metrics from this report (a sweep's trial status and metric).
        ray.train.report({**result.to_dict(), "step": result.steps, "final": True})
        shutil.rmtree(self.scratch, ignore_errors=True)
        return result

    def _final_evaluation(self) -> dict[str, Any]:
        """The eval metrics of the final weights: the trainer's own evaluation when it ran at the
        last step (no evaluation runs twice on the same weights), else one now."""
        trainer = self.trainer
        if trainer.eval_dataset is None:
            return {}
        last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
        if last is not None and last.get("step") == trainer.state.global_step:
            return last
        return trainer.evaluate()

    def _save_final(self) -> str:
        """The trained model as an HF directory in storage: the adapter for LoRA, else the weights
        (ZeRO-3 and FSDP gather them; every rank takes part in that)."""
        run_dir, spec = self.plan.run_dir, self.spec
        local = tempfile.mkdtemp(prefix="rayft-final-")
        if self.trainer.is_fsdp_enabled:
            # checkpoints may be sharded (method.fsdp.state_dict); the final model is one HF directory
            self.trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        self.trainer.save_model(local)
        if self.rank == 0:
            self.trainer.processing_class.save_pretrained(local)
            storage.upload_dir(local, run_dir.model)
            if spec.run.save_merged and spec.method.kind != "full":
                merged = tempfile.mkdtemp(prefix="rayft-merged-")
                merge_adapter(local, merged, spec)
                storage.upload_dir(merged, run_dir.merged_model)
                shutil.rmtree(merged, ignore_errors=True)
        shutil.rmtree(local, ignore_errors=True)
        return run_dir.model


def _restore(checkpoint: Any, scratch: str) -> str | None:
    """Ray's latest checkpoint (after a failure or a rerun) -> a local HF checkpoint directory."""
    if checkpoint is None:
        return None
    local = checkpoint.to_directory(os.path.join(scratch, "restored"))
    inner = os.path.join(local, HF_CHECKPOINT)
    return inner if os.path.isdir(inner) else local


def _step_of(resume: str | None) -> int:
    """The optimizer step a local HF checkpoint was saved at (0 without one)."""
    state = os.path.join(resume, "trainer_state.json") if resume else ""
    if not state or not os.path.isfile(state):
        return 0
    with open(state) as handle:
        return int(json.load(handle)["global_step"])
