"""The pre-flight check of template fidelity: before any worker starts, every sample must train
what the model will have to write at inference, and nothing else.

For every training sequence: at least one token is trained; each trained reply is trained from
its start (a token BPE merged across the start, whitespace only, is the one exception: inference
never sees it) up to and including its end-of-turn marker, and no trained token runs past the end
of the reply into the next turn. For a sample of records (the first ones each encoder sees, then
one in `EVERY`), the prompt and reply are also compared with what the tokenizer's own
`apply_chat_template` (transformers' renderer, not rayft's) renders for inference at that turn.

A failure is a RecordError whose reason the prepared data's statistics count.
"""

from __future__ import annotations

from typing import Any

from rayft.data.templates import ChatTemplate
from rayft.data.tokenize import Encoded, RecordError, Rendered

FIRST, EVERY = 64, 50  # records checked against apply_chat_template: the first FIRST, then 1 in EVERY


class FidelityCheck:
    def __init__(self, template: ChatTemplate, tokenizer: Any):
        self.template, self.tokenizer = template, tokenizer
        self.seen = 0

    def problem(self, sample: dict[str, Any], item: Rendered, encoded: Encoded) -> RecordError | None:
        if encoded.n_trained == 0:
            return RecordError(
                "nothing_trained",
                "no token of this conversation is trained (no assistant turn that data.train_on trains); "
                "a sample without a trained token teaches nothing",
            )
        if encoded.extents is not None:
            for span, reply, extent in zip(item.spans, item.replies, encoded.extents):
                found = _span_problem(item.text, span, extent)
                if found:
                    return RecordError(found[0], f"{found[1]} (reply {item.text[reply[0] : reply[1]][:60]!r})")
        self.seen += 1
        if self.seen <= FIRST or self.seen % EVERY == 0:
            return self.against_reference(sample, item)
        return None

    def against_reference(self, sample: dict[str, Any], item: Rendered) -> RecordError | None:
        """Each trained turn's prompt and reply, as the tokenizer's apply_chat_template renders them."""
        apply = getattr(self.tokenizer, "apply_chat_template", None)
        if apply is None or not item.turns:
            return None
        messages = self.template.adapt(sample["messages"])
        tools = sample.get("tools") or None

        def render(upto: int, prompt: bool) -> str:
            return apply(
                messages[:upto],
                tools=tools,
                add_generation_prompt=prompt,
                tokenize=False,
                chat_template=self.template.source,
            )

        for turn, (start, end) in zip(item.turns, item.replies):
            try:
                prompt, upto = render(turn, True), render(turn + 1, False)
            except Exception as exc:  # transformers' renderer refuses what rayft's rendered
                return RecordError("differs_from_inference", f"apply_chat_template cannot render it: {exc}")
            suffix = self.template.final_suffix
            if suffix and upto.endswith(suffix):
                upto = upto[: -len(suffix)]
            if prompt != item.text[:start] or upto[len(prompt) :] != item.text[start:end]:
                return RecordError(
                    "differs_from_inference",
                    f"turn {turn} as trained differs from what apply_chat_template renders for inference at that "
                    f"turn (trained {item.text[start:end][:60]!r}, inference {upto[len(prompt) :][:60]!r})",
                )
        return None


def _span_problem(text: str, span: tuple[int, int], extent: tuple[int, int] | None) -> tuple[str, str] | None:
    """`extent`: the characters of the span's trained tokens (Encoded.extents)."""
    start, end = span
    if extent is None:
        return "reply_untrained", "no token of this reply is trained"
    first, last = extent
    if text[start:first].strip():
        return "reply_untrained", f"its start {text[start:first]!r} is not trained (a token runs across the prompt)"
    if last > end:
        return (
            "end_of_turn_merged",
            f"its last trained token runs past the end of the reply into {text[end:last]!r}, a token inference "
            "never produces",
        )
    if text[last:end].strip():
        return "end_of_turn_untrained", f"its end-of-turn marker {text[last:end]!r} is not trained"
    return None
