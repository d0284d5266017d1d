"""Packing: best-fit-decreasing bins, no attention across samples, and the same trained tokens
as without packing. Runs the collator and model exactly as training does."""

from __future__ import annotations

import random

import pytest
import torch

from rayft.data.packing import pack, pack_best_fit, packing_efficiency
from rayft.data.tokenize import IGNORE


def test_best_fit_puts_every_sample_in_exactly_one_bin_within_capacity() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(2000)]
    bins = pack_best_fit(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # near the lower bound of ceil(total / capacity) bins
    assert len(bins) <= 1.03 * (sum(lengths) / 128) + 1
    assert packing_efficiency(lengths, bins, 128) > 0.97


def test_best_fit_beats_packing_in_order() -> None:
    lengths = [70, 70, 60, 60, 50, 50, 30, 30] * 10
    bins = pack_best_fit(lengths, 128)
    in_order, current = 0, 129
    for length in lengths:  # next-fit: close the bin when the next sample does not fit
        if current + length > 128:
            in_order, current = in_order + 1, 0
        current += length
    assert len(bins) < in_order


# The quickstart's sample lengths (SmolLM2 tokens, rows of 128): just above a quarter of a row,
# where best-fit-decreasing fills 88.0% of its rows and an optimal packing 93.3%.
QUICKSTART_LENGTHS = {30: 40, 31: 116, 32: 142, 33: 106, 34: 56, 35: 3, 36: 117, 37: 124}


def test_row_patterns_pack_lengths_that_defeat_best_fit() -> None:
    lengths = [length for length, count in QUICKSTART_LENGTHS.items() for _ in range(count)]
    random.Random(0).shuffle(lengths)
    bfd, refined = pack_best_fit(lengths, 128), pack(lengths, 128)
    assert sorted(i for row in refined for i in row) == list(range(len(lengths)))  # each sample once
    assert all(sum(lengths[i] for i in row) <= 128 for row in refined)
    assert (len(bfd), len(refined)) == (210, 198)  # 198 is optimal: a counting argument shows 112 rows of 4 at most
    assert packing_efficiency(lengths, refined, 128) > 0.93 > 0.92 > packing_efficiency(lengths, bfd, 128)


def test_many_distinct_lengths_keep_best_fit_rows() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(20, 700) for _ in range(3000)]
    assert pack(lengths, 2048) == pack_best_fit(lengths, 2048)
    assert packing_efficiency(lengths, pack(lengths, 2048), 2048) > 0.99


def test_too_long_sample_is_an_error() -> None:
    with pytest.raises(ValueError, match="longer than the packing capacity"):
        pack_best_fit([10, 200], 128)


@pytest.fixture(scope="module")
def samples(tiny_tokenizer) -> list[dict]:
    texts = [
        "<|im_start|>user\nWhat is the capital of Peru?<|im_end|>\n<|im_start|>assistant\nLima<|im_end|>\n",
        "<|im_start|>user\nOpposite of hot?<|im_end|>\n<|im_start|>assistant\ncold<|im_end|>\n",
        "<|im_start|>user\nWhat is 3 plus 4? Think.<|im_end|>\n"
        "<|im_start|>assistant\n7, because 3 + 4 = 7.<|im_end|>\n",
    ]
    out = []
    for text in texts:
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        labels = [IGNORE] * (len(ids) // 2) + ids[len(ids) // 2 :]
        out.append({"input_ids": ids, "labels": labels, "seq_lengths": [len(ids)]})
    return out


def packed_row(samples: list[dict]) -> dict:
    return {
        "input_ids": [t for s in samples for t in s["input_ids"]],
        "labels": [t for s in samples for t in s["labels"]],
        "seq_lengths": [len(s["input_ids"]) for s in samples],
    }


def available_attention() -> list:
    """Every implementation rayft lets packed rows use that runs on this machine: flash only with
    a GPU and its package, flex_attention in the slow lane (it compiles for ~2 minutes on CPU)."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    from rayft.spec.schema import ATTENTION_KEEPS_PACKED_SAMPLES_APART

    safe = [name for name, apart in ATTENTION_KEEPS_PACKED_SAMPLES_APART.items() if apart]
    present = {
        "flash_attention_2": torch.cuda.is_available() and is_flash_attn_2_available(),
        "flash_attention_3": torch.cuda.is_available() and is_flash_attn_3_available(),
    }
    slow = [] if torch.cuda.is_available() else ["flex_attention"]
    return [
        pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in safe if present.get(name, True)
    ]


@pytest.mark.parametrize("attention", available_attention())
def test_logits_inside_a_pack_equal_logits_alone(tiny_llama, samples, attention) -> None:
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    on_gpu = attention.startswith("flash")  # flash kernels run in 16-bit on CUDA only
    dtype, device = (torch.bfloat16, "cuda") if on_gpu else (torch.float32, "cpu")
    tolerance = 2e-2 if on_gpu else 1e-5
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attention, dtype=dtype)
    model = model.to(device).eval()
    # As in training: TRL's compute_loss passes use_cache=False. transformers derives the
    # block-diagonal mask from position_ids only without a KV cache.
    model.config.use_cache = False
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    # two packed rows in one batch, flattened by the collator as in training
    batch = collate([packed_row(samples[:2]), packed_row(samples[2:])])
    assert "attention_mask" not in batch  # position_ids carry the sample boundaries
    ids, positions = batch["input_ids"].to(device), batch["position_ids"].to(device)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions).logits[0]
        start = 0
        for sample in samples:
            alone = model(input_ids=torch.tensor([sample["input_ids"]], device=device)).logits[0]
            inside = packed[start : start + len(sample["input_ids"])]
            torch.testing.assert_close(inside, alone, atol=tolerance, rtol=tolerance)
            start += len(sample["input_ids"])
        # the test can fail: without per-sample positions the later samples attend to earlier ones
        naive = model(input_ids=ids).logits[0]
        second = slice(len(samples[0]["input_ids"]), len(samples[0]["input_ids"]) + len(samples[1]["input_ids"]))
        assert not torch.allclose(naive[second], packed[second], atol=1e-3)


def test_the_implementation_rayft_refuses_for_packing_does_mix_packed_samples(tiny_llama, samples) -> None:
    """`paged|eager` (continuous batching) takes no mask from position_ids: inside a pack the
    second sample attends to the first. Why the spec refuses it with data.packing."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from rayft.spec.schema import ATTENTION_KEEPS_PACKED_SAMPLES_APART

    assert ATTENTION_KEEPS_PACKED_SAMPLES_APART["paged|eager"] is False
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="paged|eager").eval()
    model.config.use_cache = False
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([packed_row(samples[:2])])
    first = len(samples[0]["input_ids"])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone = model(input_ids=torch.tensor([samples[1]["input_ids"]])).logits[0]
    assert (packed[first:] - alone).abs().max() > 1e-2


def test_packing_trains_the_same_tokens_with_the_same_loss(tiny_llama, samples) -> None:
    """Summed token loss over a packed batch equals the sum over the same samples padded."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model.config.use_cache = False  # as the trainer sets it
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([packed_row(samples)])
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(samples)

    def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shifted, targets = logits[..., :-1, :].reshape(-1, logits.size(-1)), labels[..., 1:].reshape(-1)
        keep = targets != IGNORE
        return torch.nn.functional.cross_entropy(shifted[keep], targets[keep], reduction="none")

    with torch.no_grad():
        packed_loss = token_losses(
            model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits, packed["labels"]
        )
        padded_loss = token_losses(
            model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits, padded["labels"]
        )
    assert (
        packed_loss.numel()
        == padded_loss.numel()
        == sum(sum(1 for label in s["labels"][1:] if label != IGNORE) for s in samples)
    )
    torch.testing.assert_close(packed_loss.sum(), padded_loss.sum(), atol=1e-4, rtol=1e-5)
