"""The LM head on CPU: only the positions that carry a label.

TRL's SFTTrainer scores every token through a fused LM head (trl.trainer.utils.add_fused_lm_head):
the vocabulary is projected in tiles and only per-token log-probabilities come back, never the
full logits. On a Triton device it projects just the positions whose next-token label is not
-100; elsewhere (CPU) it projects every position, prompt included, and masks afterwards. On a
2-core CPU that head was about 38% of a LoRA step of SmolLM2-135M (49k vocabulary) with half the
tokens trained.

`compact_fused_lm_head` makes the CPU path do what the Triton path does: the same kernel
(trl.kernels.ChunkedLogProbFunction), the same outputs and loss, on the labelled positions only.
The result is the same per token up to float summation order; where anything else changes the
logits (soft-capping, a logit scale, MoE router losses, sharded DTensor weights, pre-shifted
labels), calls go to TRL's forward unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import torch

# TRL's own tile width over the vocabulary (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)
VOCAB_CHUNK = 32768
# Config fields by which TRL's fused head scales or caps the logits: a model with any of them set
# keeps TRL's forward
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks its fused head for


def compact_fused_lm_head(model: Any, outputs: tuple[str, ...] = OUTPUTS) -> bool:
    """Wrap the fused forward TRL's SFTTrainer installed on `model` (a PeftModel or the model
    itself) so that on CPU only labelled positions reach the LM head. False where the model's
    logits are transformed (TRL's forward is kept)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config.get_text_config()
    if any(getattr(config, name, None) is not None for name in LOGIT_TRANSFORMS):
        return False
    if getattr(config, "output_router_logits", False):
        return False
    trl_forward = inner.forward

    def forward(
        self: Any,
        *args: Any,
        fused_lm_head: bool = False,
        labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        if fused_lm_head and labels is not None and shift_labels is None and _compacts(self, labels):
            return _labelled_only(self, args, kwargs, labels, num_items_in_batch, outputs)
        return trl_forward(
            *args,
            fused_lm_head=fused_lm_head,
            labels=labels,
            shift_labels=shift_labels,
            num_items_in_batch=num_items_in_batch,
            **kwargs,
        )

    inner.forward = types.MethodType(forward, inner)
    return True


def _compacts(model: Any, labels: torch.Tensor) -> bool:
    """CPU (a Triton device compacts in TRL already), a plain weight, and at least one label."""
    from torch.distributed.tensor import DTensor

    weight = model.get_output_embeddings().weight
    return weight.device.type == "cpu" and not isinstance(weight, DTensor) and bool((labels[:, 1:] != -100).any())


def _labelled_only(
    model: Any, args: tuple, kwargs: dict[str, Any], labels: torch.Tensor, num_items_in_batch: Any, outputs: tuple
) -> Any:
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

    kwargs["use_cache"] = False
    hidden = model.base_model(*args, **kwargs).last_hidden_state[:, :-1]
    labels = labels[:, 1:]
    lm_head = model.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    mask = labels != -100
    with maybe_gather_lm_head_ctx(weight, bias):
        per_token = ChunkedLogProbFunction.apply(
            hidden[mask], weight, bias, labels[mask], 1.0, VOCAB_CHUNK, None, 1.0, outputs
        )
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token
    )
    assert log_probs is not None  # always computed
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / count,
        log_probs=log_probs,
        entropy=entropy,
        log_sum_sq_probs=log_sum_sq_probs,
        mean_logits=mean_logits,
        is_top1=is_top1,
        label_mask=mask,
    )
