"""Quality filters over canonical samples. Each returns the reason a sample is dropped, so the
report can count drops per reason; the heuristics are the ones SFT practitioners apply to
distilled instruction data."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

from rayft.spec import FilterSpec

SURE_OPENER = re.compile(r"^\s*(sure|certainly|of course|absolutely|great question)\b[!,.:]", re.IGNORECASE)
PLACEHOLDER = re.compile(
    r"lorem ipsum|\[insert [^\]]*\]|\[your [^\]]*\]|<placeholder>|\bTODO:|\{\{\s*\w+\s*\}\}", re.IGNORECASE
)
REFUSAL = re.compile(
    r"\bas an ai (language )?model\b|\bI(?:'m| am) (?:sorry|afraid),? but I (?:can(?:no|')t|am unable)", re.IGNORECASE
)


def replies(sample: dict[str, Any]) -> list[str]:
    """What each assistant turn says: its content, or for a turn that only calls tools, the calls."""
    if "text" in sample:
        return [sample["text"]]
    return [
        m["content"] if m["content"].strip() or "tool_calls" not in m else json.dumps(m["tool_calls"])
        for m in sample["messages"]
        if m["role"] == "assistant"
    ]


def drop_reason(sample: dict[str, Any], filters: FilterSpec) -> str | None:
    """Why this sample should not be trained on, or None to keep it (duplicates are separate)."""
    answers = replies(sample)
    if any(not answer.strip() for answer in answers):
        return "empty_reply"
    if filters.min_reply_chars and any(len(answer.strip()) < filters.min_reply_chars for answer in answers):
        return "short_reply"
    if filters.drop_placeholders and any(PLACEHOLDER.search(answer) for answer in answers):
        return "placeholder"
    if filters.drop_sure_openers and any(SURE_OPENER.search(answer) for answer in answers):
        return "sure_opener"
    if filters.drop_refusals and any(REFUSAL.search(answer) for answer in answers):
        return "refusal"
    return None


def content_hash(sample: dict[str, Any], near: bool = False) -> int:
    """64-bit hash of a sample's content; with near=True, of its normalized text (case,
    whitespace, punctuation and accents ignored) so trivial variants collide."""
    text = json.dumps(sample, sort_keys=True, ensure_ascii=False)
    if near:
        text = unicodedata.normalize("NFKD", text.lower())
        text = re.sub(r"[\W_]+", " ", text).strip()
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
