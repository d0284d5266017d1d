"""Answers to chat prompts with a model's own chat template, in left-padded batches, and the
held-out prompts they are asked: the eval split's conversations cut before their last reply."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rayft.data.prepared import Prepared
from rayft.data.templates import ChatTemplate


@dataclass
class Prompt:
    messages: list[dict[str, str]]  # the conversation up to the reply to generate
    reference: str | None


def held_out_prompts(prepared: Prepared, limit: int) -> list[Prompt]:
    """The first `limit` eval conversations, cut before their last assistant reply."""
    import pyarrow.parquet as pq

    from rayft.storage import filesystem

    prompts: list[Prompt] = []
    for path in prepared.files("eval"):
        fs, inner = filesystem(path)
        for value in pq.read_table(inner, filesystem=fs, columns=["messages"]).column("messages").to_pylist():
            if value is None:
                continue
            messages = json.loads(value)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompts.append(Prompt(messages[:last], messages[last]["content"]))
            if len(prompts) >= limit:
                return prompts
    return prompts


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    batch_size: int = 8,
) -> tuple[list[str], list[bool]]:
    """Answers to chat prompts with the tokenizer's chat template, in left-padded batches.
    Returns the answers and whether each stopped on an end-of-turn token by itself."""
    import torch

    stop_ids = end_of_turn_ids(tokenizer)
    tokenizer.padding_side = "left"
    answers, stopped = [], []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=top_p if do_sample else None,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in output[:, inputs["input_ids"].shape[1] :].tolist():
            ended = next((i for i, t in enumerate(row) if t in stop_ids), None)
            stopped.append(ended is not None)
            answers.append(tokenizer.decode(row[:ended], skip_special_tokens=True).strip())
    return answers, stopped


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """EOS plus the template's end-of-turn token when it is a single token (e.g. <|im_end|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if tokenizer.chat_template:
        marker = (
            ChatTemplate("tokenizer", tokenizer.chat_template, tokenizer.bos_token or "", tokenizer.eos_token or "")
            .end_of_turn()
            .strip()
        )
        encoded = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
        if len(encoded) == 1:
            ids.add(encoded[0])
    return sorted(ids)
