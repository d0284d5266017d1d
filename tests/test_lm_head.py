"""The CPU LM head scores only labelled positions (rayft.train.lm_head), and changes nothing else:
the loss, every per-token output and every gradient are TRL's fused head's, bit for bit on this
machine; the vocabulary projection multiplies only the labelled tokens' rows."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from rayft.train.lm_head import compact_fused_lm_head

LENGTH = 40


@pytest.fixture(scope="module")
def base(tiny_llama: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama)  # tied embeddings, as SmolLM2's


def lora_model(base: Any, compact: bool) -> Any:
    """As SFTTrainer builds it: TRL's fused head on the base model, then the LoRA wrapper."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    model = copy.deepcopy(base)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    if compact:
        assert compact_fused_lm_head(model)
    return model.train()


def batch(vocab: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    ids = torch.randint(0, vocab, (2, LENGTH))
    labels = ids.clone()
    labels[:, :25] = -100  # the prompts
    labels[1, 30:33] = -100  # and a second turn's
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_loss_outputs_and_gradients_are_trls(base: Any, autocast: bool) -> None:
    results = []
    for compact in (False, True):
        model = lora_model(base, compact)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**batch(base.config.vocab_size), fused_lm_head=True, use_cache=False)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (trl, trl_grads), (ours, our_grads) = results
    assert torch.equal(trl.loss, ours.loss)
    for field in ("log_probs", "entropy", "is_top1", "label_mask"):
        assert torch.equal(getattr(trl, field), getattr(ours, field)), field
    assert int(ours.label_mask.sum()) == 2 * (LENGTH - 25) - 3
    assert len(trl_grads) == len(our_grads) == 2 * 7 * 2  # lora_A and lora_B of 7 linears in 2 layers
    for name, grad in trl_grads.items():
        assert torch.equal(grad, our_grads[name]), name


def test_only_labelled_positions_are_projected_onto_the_vocabulary(base: Any) -> None:
    vocab = base.config.vocab_size

    def projected_rows(model: Any) -> int:
        """Token rows the kernel multiplied with the vocabulary (the matmuls whose output is vocab wide)."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(**batch(vocab), fused_lm_head=True, use_cache=False)
        tiles = [e.input_shapes for e in prof.events() if e.name in ("aten::mm", "aten::addmm_")]
        return sum(shapes[0][0] for shapes in tiles if shapes[1][-1] == vocab)

    labelled = int((batch(vocab)["labels"][:, 1:] != -100).sum())
    assert projected_rows(lora_model(base, compact=False)) == 2 * (LENGTH - 1)
    assert projected_rows(lora_model(base, compact=True)) == labelled == 27


def test_a_micro_batch_without_labels_and_plain_forwards_go_to_trl(base: Any) -> None:
    model = lora_model(base, compact=True)
    inputs = batch(base.config.vocab_size)
    inputs["labels"][:] = -100
    out = model(**inputs, fused_lm_head=True, use_cache=False)
    assert float(out.loss) == 0.0 and not out.label_mask.any()
    logits = model(input_ids=inputs["input_ids"]).logits  # generation's forward: full logits, untouched
    assert logits.shape == (2, LENGTH, base.config.vocab_size)


def test_a_model_whose_logits_are_capped_keeps_trls_head(base: Any) -> None:
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    capped = copy.deepcopy(base)
    capped.config.final_logit_softcapping = 30.0  # Gemma 2's: TRL's head applies it, this path would not
    add_fused_lm_head(capped)
    model = get_peft_model(capped, LoraConfig(r=4, target_modules="all-linear"))
    forward = model.get_base_model().forward
    assert compact_fused_lm_head(model) is False
    assert model.get_base_model().forward == forward
