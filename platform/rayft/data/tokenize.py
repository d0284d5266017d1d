"""Canonical samples -> input_ids + labels, with loss only where the spec says.

An assistant reply is the text between the conversation rendered up to the reply with a
generation prompt (what inference renders at that turn) and rendered with the reply (so it
includes the end-of-turn marker, which the model must learn to emit). The whole conversation is
tokenized once; a token is trained when it starts inside a reply. This equals masking by
re-tokenizing each prefix (the reference in the tests, and the fallback for tokenizers without
offsets), at a fraction of the cost. A token that BPE merged across the start of a reply (the
prompt's last newline with the reply's first) is not trained: at inference the prompt is
tokenized alone and that token never occurs there.

Templates that render history differently from how inference rendered it (Qwen3 drops the
reasoning of earlier turns) cannot train every turn in one sequence: under `data.split_turns:
auto` each trained turn becomes a sample of its own, rendered as inference renders it at that
turn (never refused, never trained on a history the model did not see). A template that renders
the system message only before a generation (Mistral v0.3) gets the same: each turn after the
prompt inference renders for it, system message included.

Content is text. A control-token string typed inside content ("<|im_end|>" in a user message, a
reply, a tool result, a raw text) is tokenized as the characters it is, never as the control
token, unless `data.allow_control_tokens` opts in. Content strings are escaped before rendering
(each control string replaced by as many private-use characters), so after rendering the
template's own control tokens and the ones that came from content are told apart by position.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rayft.data.templates import THINK_CLOSE, ChatTemplate
from rayft.errors import DataError

IGNORE = -100
TrainOn = Literal["all_assistant", "last_assistant", "everything"]
SplitTurns = Literal["auto", "always", "never"]
SystemTurns = Literal["auto", "keep", "fold", "drop"]
# Content characters that stand for a control string while a conversation is rendered: one code
# point per control token, from Supplementary Private Use Area-A (never produced by tokenizers).
_ESCAPE_BASE = 0xF0000
_ESCAPED = re.compile("[\U000f0000-\U000ffffd]+")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    # Per trained span of the rendered text (fast tokenizers): the characters from the start of its
    # first trained token to the end of its last, or None where no token is trained (the fidelity check)
    extents: list[tuple[int, int] | None] | None = None

    @property
    def n_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE)  # list.count runs in C


@dataclass(frozen=True)
class Training:
    """What carries the loss (data.train_on, flattened)."""

    turns: TrainOn = "all_assistant"
    reasoning: bool = True
    tool_calls: bool = True

    @classmethod
    def of(cls, train_on: Any) -> Training:
        """From a TrainOnSpec, a Training, or the shorthand string."""
        if isinstance(train_on, Training):
            return train_on
        if isinstance(train_on, str):
            return cls(turns=train_on)  # type: ignore[arg-type]
        return cls(turns=train_on.turns, reasoning=train_on.reasoning, tool_calls=train_on.tool_calls)


@dataclass
class Rendered:
    """One training sequence: its text, the character spans trained, the replies of the trained
    turns (for the fidelity check), and the spans of control strings that came from content."""

    text: str
    spans: list[tuple[int, int]]
    replies: list[tuple[int, int]] = field(default_factory=list)
    forged: list[tuple[int, int]] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)  # the message index of each reply


class RecordError(DataError):
    """A record that cannot be trained as the template renders it; `reason` is what the
    prepared data's statistics count it under."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's control-token strings (special tokens, added ones included), longest
    first. Added tokens that are not special ("<think>", "<tool_call>" in Qwen) are text."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    return tuple(sorted((t for t in found if t), key=lambda t: (-len(t), t)))


# ------------------------------------------------------------------------------- rendering
def fit_system_turns(
    sample: dict[str, Any], template: ChatTemplate, policy: SystemTurns = "auto"
) -> tuple[dict[str, Any], str | None]:
    """The conversation with its system messages as data.system_turns places them, before it is
    rendered (so masking and the check against apply_chat_template see what is trained), and
    what was done ("system_folded", "system_dropped"; None when nothing changed).

    fold: each system message goes into the user turn after it, its text, a blank line, then
    the user's text (what Google documents for Gemma, which has no system role; several in a
    row are joined the same way). drop: they are left out. keep, or auto under a template with a
    system role: unchanged. auto under a template without one: fold."""
    messages = sample.get("messages") or []
    if policy == "auto":
        policy = "keep" if template.supports_system else "fold"
    if policy == "keep" or not any(m["role"] == "system" for m in messages):
        return sample, None
    if policy == "drop":
        return {**sample, "messages": [m for m in messages if m["role"] != "system"]}, "system_dropped"
    out: list[dict[str, Any]] = []
    pending: list[str] = []
    for message in messages:
        if message["role"] == "system":
            if message["content"].strip():
                pending.append(message["content"])
            continue
        if pending and message["role"] == "user":
            message = {**message, "content": "\n\n".join([*pending, message["content"]])}
            pending = []
        elif pending:
            break  # a system message followed by another role: refused below
        out.append(message)
    if pending:
        raise RecordError(
            "template_error",
            "a system message is not followed by a user turn to fold it into (data.system_turns folds each into "
            f"the user turn after it; template {template.name!r} "
            f"{'has' if template.supports_system else 'has no'} system role); set data.system_turns: drop to leave "
            "it out" + (", or keep" if template.supports_system else ""),
        )
    return {**sample, "messages": out}, "system_folded"


def render_sample(
    sample: dict[str, Any],
    template: ChatTemplate,
    train_on: Any = "all_assistant",
    *,
    controls: Sequence[str] = (),
    split_turns: SplitTurns = "auto",
) -> list[Rendered]:
    """The training sequences of one conversation. Raises RecordError naming the cause when
    the template cannot render it, or cannot render it as inference would."""
    training = Training.of(train_on)
    messages, tools = sample["messages"], sample.get("tools") or None
    if not template.supports_system and any(m["role"] == "system" for m in messages):
        raise RecordError(
            "template_error",
            f"template {template.name!r} has no system role, but this conversation has a system turn "
            "(or data.system_prompt adds one); set data.system_turns: fold (into the user turn after it) or drop, "
            "or choose another template",
        )
    if controls:
        # Every string of the conversation (tool schemas and dict keys included) in one text: a
        # control string inside any of them shows in it; none there, nothing to escape. (A match
        # across the separator could only send a conversation down the escaping path for nothing.)
        strings = "\0".join(_strings([messages, tools], []))
        _refuse_escape_characters(strings)
        if _control_pattern(tuple(controls)).search(strings):
            escapes = _escapes(controls)
            messages, tools = _escape(messages, escapes), _escape(tools, escapes)
    adapted = template.adapt(messages)
    out = [_unescape(r, controls) for r in _render(adapted, messages, tools, template, training, split_turns)]
    return out


def _render(
    adapted: list[dict[str, Any]],
    messages: list[dict[str, Any]],
    tools: list | None,
    template: ChatTemplate,
    training: Training,
    split_turns: SplitTurns,
) -> list[Rendered]:
    def render(upto: int | None, prompt: bool = False, source: list[dict[str, Any]] = adapted) -> str:
        try:
            return template.render(source if upto is None else source[:upto], prompt, tools=tools)
        except Exception as exc:  # raise_exception(), undefined variables, a template's own type errors
            roles = ", ".join(m["role"] + ("(tool_calls)" if "tool_calls" in m else "") for m in messages)
            raise RecordError(
                "template_error",
                f"template {template.name!r} cannot render this conversation ({type(exc).__name__}: {exc}); "
                f"its turns: {roles}",
            ) from None

    if template.system_in_prompt_only and messages and messages[0]["role"] == "system":
        return _render_system_in_prompt(render, adapted, messages, template, training, split_turns)
    text = _drop_final(render(None), template)
    if training.turns == "everything":
        return [Rendered(text, [(0, len(text))])]
    turns = _trained_turns(messages, training)
    replies: list[tuple[int, str, str]] = []  # (turn, prompt, prompt + reply)
    consistent = True
    for index in turns:
        prompt = render(index, prompt=True)
        upto = text if index == len(messages) - 1 else _drop_final(render(index + 1), template)
        if not upto.startswith(prompt):
            raise RecordError(
                "template_error",
                f"template {template.name!r} does not render turn {index} after its generation prompt: the "
                f"prompt ends {prompt[-40:]!r}, the conversation continues {upto[len(_common(prompt, upto)) :][:40]!r}",
            )
        consistent &= text.startswith(upto)
        replies.append((index, prompt, upto))
    if consistent and split_turns != "always":
        _refuse_dropped(template, messages, text)
        spans = [_trained_span(len(p), len(u), u, messages[i], training) for i, p, u in replies]
        return [Rendered(text, spans, [(len(p), len(u)) for _, p, u in replies], turns=[i for i, _, _ in replies])]
    if split_turns == "never":
        index = next(i for i, _, u in replies if not text.startswith(u))
        raise RecordError(
            "history_differs",
            f"template {template.name!r} renders turn {index} differently once later turns follow it (it drops "
            "or changes what inference rendered at that turn, e.g. past reasoning), and data.split_turns is never; "
            "set data.split_turns: auto to train each turn as inference renders it",
        )
    for i, _, u in replies:
        _refuse_dropped(template, messages[i : i + 1], u)  # history may drop what inference drops; a reply not
    return [
        Rendered(u, [_trained_span(len(p), len(u), u, messages[i], training)], [(len(p), len(u))], turns=[i])
        for i, p, u in replies
    ]


def _trained_turns(messages: list[dict[str, Any]], training: Training) -> list[int]:
    turns = [
        i for i, m in enumerate(messages) if m["role"] == "assistant" and (training.tool_calls or "tool_calls" not in m)
    ]
    return turns[-1:] if training.turns == "last_assistant" else turns


def _render_system_in_prompt(
    render: Any,
    adapted: list[dict[str, Any]],
    messages: list[dict[str, Any]],
    template: ChatTemplate,
    training: Training,
    split_turns: SplitTurns,
) -> list[Rendered]:
    """A template that renders the system message only into a conversation that ends with a
    user turn (Mistral v0.3: into the last user turn) shows it to inference at every turn, but
    leaves it out of any conversation that goes on past a reply. Each trained turn is then a
    sequence of its own: the prompt inference renders at that turn (system message included),
    then the reply as the template renders it after the same history without the system message."""
    name = template.name
    if training.turns == "everything":
        raise RecordError(
            "content_dropped",
            f"template {name!r} renders the system message only when the conversation ends with a user turn, "
            "so a whole conversation rendered for data.train_on: everything would leave it out; train on the "
            "assistant turns (all_assistant or last_assistant), or drop the system turn",
        )
    if split_turns == "never":
        raise RecordError(
            "history_differs",
            f"template {name!r} renders the system message only into the last user turn of a conversation that "
            "ends with one (what inference renders at each turn), never once a reply follows, so each turn is "
            "trained as a sequence of its own and data.split_turns is never; set data.split_turns: auto",
        )
    bare = adapted[1:]  # the same conversation without its system message (index i -> i - 1)
    out = []
    for index in _trained_turns(messages, training):
        prompt = render(index, prompt=True)
        before, after = render(index - 1, True, bare), _drop_final(render(index, False, bare), template)
        if not after.startswith(before):
            raise RecordError(
                "template_error",
                f"template {name!r} does not render turn {index} after its generation prompt: the prompt ends "
                f"{before[-40:]!r}, the conversation continues {after[len(_common(before, after)) :][:40]!r}",
            )
        text = prompt + after[len(before) :]
        _refuse_dropped(template, [messages[0], messages[index]], text)
        span = _trained_span(len(prompt), len(text), text, messages[index], training)
        out.append(Rendered(text, [span], [(len(prompt), len(text))], turns=[index]))
    return out


def _refuse_dropped(template: ChatTemplate, messages: list[dict[str, Any]], text: str) -> None:
    """A template that silently leaves out part of a message (tool calls it has no place for,
    a reasoning field it ignores) would train a reply that is not the data's."""
    for message in messages:
        parts = [("content", message.get("content", "")), ("reasoning", message.get("reasoning_content", ""))]
        parts += [("tool call", call["function"]["name"]) for call in message.get("tool_calls", [])]
        for what, value in parts:
            if value and value.strip() and value.strip() not in text:
                raise RecordError(
                    "content_dropped",
                    f"template {template.name!r} drops the {what} of a {message['role']} turn "
                    f"({value.strip()[:40]!r} is not in the rendered conversation); choose a template that renders it",
                )


def _trained_span(start: int, end: int, text: str, message: dict[str, Any], training: Training) -> tuple[int, int]:
    """The reply, or with train_on.reasoning false, the reply after its reasoning block."""
    reasoning = message.get("reasoning_content")
    if training.reasoning or not reasoning:
        return start, end
    at = text.find(reasoning.strip(), start, end)
    if at < 0:
        return start, end  # the template does not render this reasoning: nothing to leave out
    after = at + len(reasoning.strip())
    close = text.find(THINK_CLOSE, after, end)
    if close >= 0 and not text[after:close].strip():
        after = close + len(THINK_CLOSE)
    while after < end and text[after].isspace():
        after += 1
    return after, end


def _drop_final(text: str, template: ChatTemplate) -> str:
    """Without what the template appends only after the last message (Phi-3.5's EOS): no turn
    of inference ever renders it, so it belongs to no reply."""
    suffix = template.final_suffix
    return text[: -len(suffix)] if suffix and text.endswith(suffix) else text


def _common(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _strings(value: Any, out: list[str]) -> list[str]:
    """Every string inside `value`, dict keys included, appended to `out`."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _strings(key, out)
            _strings(item, out)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _strings(item, out)
    return out


@functools.lru_cache(maxsize=8)
def _control_pattern(controls: tuple[str, ...]) -> re.Pattern[str]:
    """Any of the control strings (longest first, as control_tokens lists them: alternation takes
    the first that matches)."""
    return re.compile("|".join(re.escape(c) for c in controls))


def _escapes(controls: Sequence[str]) -> list[tuple[str, str]]:
    return [(c, chr(_ESCAPE_BASE + k) * len(c)) for k, c in enumerate(controls)]


def _escape(value: Any, escapes: list[tuple[str, str]]) -> Any:
    """Every string inside (content, reasoning, tool-call names and arguments, tool schemas,
    dict keys included) with its control strings replaced, longest first."""
    if isinstance(value, str):
        for control, stand_in in escapes:
            if control in value:
                value = value.replace(control, stand_in)
        return value
    if isinstance(value, list):
        return [_escape(v, escapes) for v in value]
    if isinstance(value, dict):
        return {_escape(k, escapes): _escape(v, escapes) for k, v in value.items()}
    return value


def _refuse_escape_characters(dumped: str) -> None:
    if _ESCAPED.search(dumped):
        raise RecordError(
            "control_tokens",
            "the content holds characters of Unicode's Supplementary Private Use Area-A (U+F0000-U+FFFFD), which "
            "rayft uses to keep control-token strings in content as text; remove them",
        )


def _unescape(rendered: Rendered, controls: Sequence[str]) -> Rendered:
    if not controls:
        return rendered
    text, forged = rendered.text, []
    pieces, last = [], 0
    for run in _ESCAPED.finditer(text):
        pieces.append(text[last : run.start()])
        position = run.start()
        for char, length in _runs(run.group()):
            control = controls[ord(char) - _ESCAPE_BASE]
            for _ in range(length // len(control)):
                forged.append((position, position + len(control)))
                position += len(control)
            pieces.append(control * (length // len(control)))
            if length % len(control):
                raise RecordError("control_tokens", "the template cut a control-token string inside the content")
        last = run.end()
    if not forged:
        return rendered
    pieces.append(text[last:])
    return Rendered("".join(pieces), rendered.spans, rendered.replies, forged, rendered.turns)


def _runs(text: str) -> list[tuple[str, int]]:
    runs: list[tuple[str, int]] = []
    for char in text:
        if runs and runs[-1][0] == char:
            runs[-1] = (char, runs[-1][1] + 1)
        else:
            runs.append((char, 1))
    return runs


# ------------------------------------------------------------------------------ tokenizing
def tokenize_rendered(items: Sequence[Rendered], tokenizer: Any, controls: Sequence[str] = ()) -> list[Encoded]:
    """Token ids and labels of rendered sequences; content control strings as text. A token is
    trained when it starts inside a span: the tokens of a span are a run, from the first that
    starts at or after the span's start to the first that starts at or after its end."""
    if not getattr(tokenizer, "is_fast", False):
        return [_encode_by_prefixes(item, tokenizer) for item in items]
    out = []
    tokenized: Sequence[_Listed | _Encoding] = _tokenized(tokenizer, [item.text for item in items])
    for item, tokens in zip(items, tokenized):
        if item.forged:
            tokens = _Listed(*_as_text(item, tokens.ids, tokens.offsets(), tokenizer, controls))
        ids = tokens.ids
        labels = [IGNORE] * len(ids)
        extents: list[tuple[int, int] | None] = []
        for start, end in item.spans:
            first, stop = tokens.first_from(start), tokens.first_from(end)
            labels[first:stop] = ids[first:stop]
            extents.append((tokens.chars(first)[0], tokens.chars(stop - 1)[1]) if first < stop else None)
        out.append(Encoded(ids, labels, extents))
    return out


class _Listed:
    """A text's tokens with their character offsets as lists."""

    def __init__(self, ids: list[int], offsets: list[tuple[int, int]]):
        self.ids, self._offsets = ids, offsets
        self._starts = [s for s, _ in offsets]

    def offsets(self) -> list[tuple[int, int]]:
        return self._offsets

    def chars(self, token: int) -> tuple[int, int]:
        return self._offsets[token]

    def first_from(self, position: int) -> int:
        """The first token that starts at or after `position` (tokens come in text order)."""
        return bisect.bisect_left(self._starts, position)


class _Encoding:
    """A text's tokens as the Rust tokenizer returned them: offsets are asked for at the span
    boundaries only (every token's offsets as Python tuples cost a tenth of preparation)."""

    def __init__(self, encoding: Any, length: int):
        self.encoding, self.length, self.ids = encoding, length, encoding.ids
        self._listed: _Listed | None = None

    def offsets(self) -> list[tuple[int, int]]:
        return self._as_list().offsets()

    def chars(self, token: int) -> tuple[int, int]:
        return self.encoding.token_to_chars(token)

    def first_from(self, position: int) -> int:
        if position >= self.length:
            return len(self.ids)
        token = self.encoding.char_to_token(position)
        if token is None:  # a character no token covers (stripped around an added token)
            return self._as_list().first_from(position)
        starts = self._start
        while token > 0 and starts(token - 1) >= position:  # byte-fallback tokens share one character
            token -= 1
        while token < len(self.ids) and starts(token) < position:  # the token runs across `position`
            token += 1
        return token

    def _start(self, token: int) -> int:
        return self.encoding.token_to_chars(token)[0]

    def _as_list(self) -> _Listed:
        if self._listed is None:
            self._listed = _Listed(self.ids, self.encoding.offsets)
        return self._listed


def _tokenized(tokenizer: Any, texts: list[str]) -> Sequence[_Listed | _Encoding]:
    """Each text's tokens, no special tokens added: straight from the Rust tokenizer where
    transformers would only pass the call through (_direct)."""
    if _direct(tokenizer):
        encodings = tokenizer._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [_Encoding(e, len(text)) for e, text in zip(encodings, texts)]
    batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    pairs = zip(batch["input_ids"], batch["offset_mapping"])
    return [_Listed(list(ids), [tuple(o) for o in offsets]) for ids, offsets in pairs]


def _direct(tokenizer: Any) -> bool:
    """No truncation or padding set in the Rust tokenizer, special tokens matched as such: a
    transformers call would add nothing but its per-sequence Python conversion (a sixth of
    preparation)."""
    backend: Any = getattr(tokenizer, "_tokenizer", None)
    return (
        backend is not None
        and backend.truncation is None
        and backend.padding is None
        and not getattr(tokenizer, "split_special_tokens", False)
        and not getattr(backend, "encode_special_tokens", False)
    )


def _as_text(
    item: Rendered, ids: list[int], offsets: list[tuple[int, int]], tokenizer: Any, controls: Sequence[str]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Re-tokenize, with special tokens split, each stretch between two of the template's own
    control tokens that holds a control string from content: the tokens the tokenizer gives that
    text when it is not a control token."""
    special = set(tokenizer.all_special_ids) | {
        i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if getattr(t, "special", False)
    }
    forged = set(item.forged)
    own = [(s, e) for s, e in _occurrences(item.text, controls) if (s, e) not in forged]
    bounds = [0] + [b for s, e in own for b in (s, e)] + [len(item.text)]
    stretches = [(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2)]
    for start, end in stretches:
        if not any(start <= s < end for s, _ in item.forged):
            continue
        keep = [i for i, (s, _) in enumerate(offsets) if not start <= s < end]
        at = next((n for n, i in enumerate(keep) if offsets[i][0] >= end), len(keep))
        new_ids, new_offsets = _stretch_as_text(item.text, start, end, tokenizer)
        ids = [ids[i] for i in keep[:at]] + new_ids + [ids[i] for i in keep[at:]]
        offsets = [offsets[i] for i in keep[:at]] + new_offsets + [offsets[i] for i in keep[at:]]
    for token, (s, _) in zip(ids, offsets):
        if token in special and any(fs <= s < fe for fs, fe in item.forged):
            raise RecordError("control_tokens", "a control-token string in the content could not be tokenized as text")
    return ids, offsets


def _stretch_as_text(text: str, start: int, end: int, tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    piece = text[start:end]
    if start == 0 or _tokenizes_locally(tokenizer):
        enc = tokenizer(piece, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(s + start, e + start) for s, e in enc["offset_mapping"]]
    # A tokenizer that treats the start of its input apart (SentencePiece's prefix space) sees
    # this stretch mid-text: tokenize it after an anchor and drop the anchor's tokens.
    anchor = "\n"
    enc = tokenizer(anchor + piece, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    pairs = list(zip(enc["input_ids"], enc["offset_mapping"]))
    if any(s < len(anchor) < e for _, (s, e) in pairs):
        raise RecordError(
            "control_tokens",
            "a control-token string in the content cannot be tokenized as text exactly with this tokenizer; remove "
            "it, or set data.allow_control_tokens: true to let content emit control tokens",
        )
    kept = [(i, (s - len(anchor) + start, e - len(anchor) + start)) for i, (s, e) in pairs if s >= len(anchor)]
    return [i for i, _ in kept], [o for _, o in kept]


_LOCAL: dict[int, bool] = {}


def _tokenizes_locally(tokenizer: Any) -> bool:
    """Whether a text is tokenized the same at the start of an input and after a special token."""
    if id(tokenizer) not in _LOCAL:
        token = tokenizer.eos_token or tokenizer.bos_token
        probe = "word and more"
        alone = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        after = list(tokenizer(token + probe, add_special_tokens=False)["input_ids"]) if token else [0, *alone]
        _LOCAL[id(tokenizer)] = after[1:] == alone
    return _LOCAL[id(tokenizer)]


def _occurrences(text: str, controls: Sequence[str]) -> list[tuple[int, int]]:
    """Control strings in text, leftmost-longest as the tokenizer matches them."""
    if not controls:
        return []
    return [(m.start(), m.end()) for m in _control_pattern(tuple(controls)).finditer(text)]


def _encode_by_prefixes(item: Rendered, tokenizer: Any) -> Encoded:
    """Slow path: token boundaries from tokenizing every span boundary's prefix."""
    if item.forged:
        raise RecordError(
            "control_tokens",
            "the content holds control-token strings and this (slow) tokenizer cannot keep them as text; remove "
            "them, or set data.allow_control_tokens: true",
        )
    text = item.text

    def count(prefix: str) -> int:
        return len(tokenizer(prefix, add_special_tokens=False)["input_ids"])

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    labels = [IGNORE] * len(ids)
    for start, end in item.spans:
        for position in range(count(text[:start]), count(text[:end])):
            labels[position] = ids[position]
    return Encoded(list(ids), labels)


# ----------------------------------------------------------------------------- entry points
def encode_conversations(
    conversations: Sequence[list[dict[str, Any]]],
    template: ChatTemplate,
    tokenizer: Any,
    train_on: Any = "all_assistant",
    *,
    allow_control_tokens: bool = False,
    tools: Sequence[list | None] | None = None,
) -> list[Encoded]:
    """Each conversation's training sequences (one each unless its turns are split), in order."""
    controls = () if allow_control_tokens else control_tokens(tokenizer)
    items = [
        item
        for n, messages in enumerate(conversations)
        for item in render_sample(
            {"messages": messages, "tools": tools[n] if tools else None}, template, train_on, controls=controls
        )
    ]
    return tokenize_rendered(items, tokenizer, controls)


def encode_texts(texts: Sequence[str], tokenizer: Any, *, allow_control_tokens: bool = False) -> list[Encoded]:
    """Raw text: BOS if the tokenizer adds one, EOS at the end, loss on every token. Control
    strings inside the text are text (split), unless allowed."""
    batch = tokenizer(
        list(texts),
        add_special_tokens=True,
        return_attention_mask=False,
        split_special_tokens=not allow_control_tokens,
    )
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
