"""Canonical samples -> input_ids + labels, with loss only where the spec says.

An assistant reply is the text between the conversation rendered up to the reply with a
generation prompt and rendered with the reply (so it includes the end-of-turn marker, which the
model must learn to emit). The whole conversation is tokenized once; a token is trained when it
starts inside a reply. This equals masking by re-tokenizing each prefix (the reference in the
tests, and the fallback for tokenizers without offsets), at a fraction of the cost. A token
that BPE merged across the start of a reply (the prompt's last newline with the reply's first)
is not trained: at inference the prompt is tokenized alone and that token never occurs there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from rayft.data.templates import ChatTemplate
from rayft.errors import SpecError

IGNORE = -100
TrainOn = Literal["all_assistant", "last_assistant", "everything"]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def reply_spans(
    messages: list[dict[str, str]], template: ChatTemplate, train_on: TrainOn
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) character spans to train on."""
    if not template.supports_system and any(m["role"] == "system" for m in messages):
        raise SpecError(
            f"template {template.name!r} does not render system messages, but the data has them "
            "(or data.system_prompt adds one); choose another template or drop the system turns",
            field="data.template",
        )
    text = template.render(messages)
    if train_on == "everything":
        return text, [(0, len(text))]
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    spans = []
    for index in turns:
        prompt = template.render(messages[:index], add_generation_prompt=True)
        upto = text if index == len(messages) - 1 else template.render(messages[: index + 1])
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise SpecError(
                f"template {template.name!r} renders this conversation differently when it is cut "
                f"after turn {index}, so its assistant turns cannot be located",
                field="data.template",
            )
        spans.append((len(prompt), len(upto)))
    return text, spans


def encode_conversations(
    conversations: Sequence[list[dict[str, str]]],
    template: ChatTemplate,
    tokenizer: Any,
    train_on: TrainOn = "all_assistant",
) -> list[Encoded]:
    rendered = [reply_spans(messages, template, train_on) for messages in conversations]
    if not getattr(tokenizer, "is_fast", False):
        return [_encode_by_prefixes(text, spans, tokenizer) for text, spans in rendered]
    batch = tokenizer(
        [text for text, _ in rendered],
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    out = []
    for (_, spans), ids, offsets in zip(rendered, batch["input_ids"], batch["offset_mapping"]):
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        trained: np.ndarray = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            trained |= (offsets[:, 0] >= start) & (offsets[:, 0] < end)
        labels = np.where(trained, np.asarray(ids, dtype=np.int64), IGNORE)
        out.append(Encoded(list(ids), labels.tolist()))
    return out


def _encode_by_prefixes(text: str, spans: list[tuple[int, int]], tokenizer: Any) -> Encoded:
    """Slow path: token boundaries from tokenizing every span boundary's prefix."""

    def count(prefix: str) -> int:
        return len(tokenizer(prefix, add_special_tokens=False)["input_ids"])

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        for position in range(count(text[:start]), count(text[:end])):
            labels[position] = ids[position]
    return Encoded(list(ids), labels)


def encode_texts(texts: Sequence[str], tokenizer: Any) -> list[Encoded]:
    """Raw text: BOS if the tokenizer adds one, EOS at the end, loss on every token."""
    batch = tokenizer(list(texts), add_special_tokens=True, return_attention_mask=False)
    eos = tokenizer.eos_token_id
    out = []
    for ids in batch["input_ids"]:
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.append(Encoded(ids, list(ids)))
    return out


def truncate(sample: Encoded, max_length: int, policy: str) -> Encoded | None:
    """Fit a sample into max_length: keep_start / keep_end cut it, drop returns None."""
    if len(sample.input_ids) <= max_length:
        return sample
    if policy == "drop":
        return None
    cut = slice(None, max_length) if policy == "keep_start" else slice(-max_length, None)
    return Encoded(sample.input_ids[cut], sample.labels[cut])
