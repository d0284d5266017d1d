"""Scoring generated answers against references: SQuAD-style normalization, exact match,
containment, ROUGE-L and token F1, and the stop rate."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

SCORERS = ("exact_match", "contains", "rouge_l", "token_f1")


def normalize(text: str) -> str:
    """Lowercase, no punctuation, articles or extra spaces (SQuAD-style answer normalization)."""
    text = text.lower().strip()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over normalized tokens (longest common subsequence)."""
    a, b = normalize(prediction).split(), normalize(reference).split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    a, b = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(a) & Counter(b)).values())
    if not a or not b or not common:
        return float(a == b)
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, reference: str, metric: str) -> float:
    if metric == "exact_match":
        return float(normalize(prediction) == normalize(reference))
    if metric == "contains":
        return float(normalize(reference) in normalize(prediction))
    if metric == "rouge_l":
        return rouge_l(prediction, reference)
    if metric == "token_f1":
        return token_f1(prediction, reference)
    raise ValueError(f"unknown metric {metric!r}; expected one of {SCORERS}")


def mean_scores(
    answers: Sequence[str], references: Sequence[str | None], metrics: Sequence[str], stopped: Sequence[bool]
) -> dict[str, float]:
    pairs = [(a, r) for a, r in zip(answers, references) if r is not None]
    out = {m: sum(score(a, r, m) for a, r in pairs) / len(pairs) for m in metrics} if pairs else {}
    out["stop_rate"] = sum(stopped) / len(stopped) if stopped else 0.0
    return out
