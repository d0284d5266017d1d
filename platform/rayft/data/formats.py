"""Records in the common SFT formats -> one canonical sample.

A canonical sample is either a conversation, `{"messages": [{"role", "content"}, ...]}`, whose
assistant turns are trained, or raw text, `{"text": ...}`, trained on every token (continued
pre-training). Every error names the file:line and the field, so a user can fix the record.
"""

from __future__ import annotations

from typing import Any

from rayft.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names seen in the wild, mapped to the canonical roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
FORMATS = ("alpaca", "prompt_response", "prompt_completion", "messages", "sharegpt", "text")


def detect_format(record: dict[str, Any], columns: dict[str, str]) -> str | None:
    """The format a record is in, from the fields it has (after column remapping)."""

    def has(name: str) -> bool:
        return columns.get(name, name) in record

    for key in ("messages", "conversations", "conversation"):
        if has(key) and isinstance(record[columns.get(key, key)], list):
            turns = record[columns.get(key, key)]
            first = turns[0] if turns and isinstance(turns[0], dict) else {}
            return "sharegpt" if "from" in first or "value" in first else "messages"
    if has("instruction") and has("output"):
        return "alpaca"
    if has("prompt") and has("response"):
        return "prompt_response"
    if has("prompt") and has("completion"):
        return "prompt_completion"
    if has("text"):
        return "text"
    return None


def to_sample(
    record: Any, fmt: str, columns: dict[str, str], system_prompt: str | None, file: str, line: int
) -> dict[str, Any]:
    """One record -> {"messages": [...]} or {"text": "..."}; DataError names file:line and field."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", file=file, line=line)
    if fmt == "auto":
        fmt = detect_format(record, columns) or ""
        if not fmt:
            raise DataError(
                f"cannot tell the format from the fields {sorted(record)[:8]}; set data.format "
                f"(one of {', '.join(FORMATS)}) or map columns with data.columns",
                file=file,
                line=line,
            )
    convert = _CONVERTERS.get(fmt)
    if convert is None:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}", file=file, line=line)
    field = _Fields(record, columns, file, line)
    sample = convert(field)
    if "messages" in sample:
        messages = sample["messages"]
        if system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system_prompt})
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(
                "conversation has no assistant turn to train on",
                file=file,
                line=line,
                field=columns.get("messages", "messages"),
            )
    return sample


class _Fields:
    """Reads fields of one record by canonical name, raising errors that point at the record."""

    def __init__(self, record: dict[str, Any], columns: dict[str, str], file: str, line: int):
        self.record, self.columns, self.file, self.line = record, columns, file, line

    def name(self, canonical: str) -> str:
        return self.columns.get(canonical, canonical)

    def error(self, message: str, field: str) -> DataError:
        return DataError(message, file=self.file, line=self.line, field=field)

    def text(self, canonical: str, *, required: bool = True) -> str:
        column = self.name(canonical)
        if column not in self.record or self.record[column] is None:
            if required:
                raise self.error("missing field", column)
            return ""
        value = self.record[column]
        if not isinstance(value, str):
            raise self.error(f"expected a string, got {type(value).__name__}", column)
        return value

    def turns(self, *candidates: str) -> tuple[str, list[Any]]:
        for canonical in candidates:
            column = self.name(canonical)
            if column in self.record:
                value = self.record[column]
                if not isinstance(value, list):
                    raise self.error(f"expected a list of turns, got {type(value).__name__}", column)
                if not value:
                    raise self.error("empty conversation", column)
                return column, value
        raise self.error("missing field", self.name(candidates[0]))


def _alpaca(f: _Fields) -> dict[str, Any]:
    instruction, extra = f.text("instruction"), f.text("input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": f.text("output")}]
    system = f.text("system", required=False)
    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


def _prompt_reply(reply_field: str):
    def convert(f: _Fields) -> dict[str, Any]:
        messages = [
            {"role": "user", "content": f.text("prompt")},
            {"role": "assistant", "content": f.text(reply_field)},
        ]
        system = f.text("system", required=False)
        return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}

    return convert


def _messages(f: _Fields) -> dict[str, Any]:
    column, turns = f.turns("messages", "conversations", "conversation")
    messages = []
    for index, turn in enumerate(turns):
        where = f"{column}[{index}]"
        if not isinstance(turn, dict):
            raise f.error(f"expected an object with role and content, got {type(turn).__name__}", where)
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise f.error(f"unknown role {role!r}; expected one of {', '.join(ROLES)}", f"{where}.role")
        messages.append({"role": role, "content": _content_text(f, content, f"{where}.content")})
    return {"messages": messages}


def _sharegpt(f: _Fields) -> dict[str, Any]:
    column, turns = f.turns("conversations", "conversation", "messages")
    messages = []
    for index, turn in enumerate(turns):
        where = f"{column}[{index}]"
        if not isinstance(turn, dict):
            raise f.error(f"expected an object with from and value, got {type(turn).__name__}", where)
        speaker = turn.get("from")
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise f.error(
                f"unknown speaker {speaker!r}; expected one of {', '.join(sorted(SHAREGPT_ROLES))}", f"{where}.from"
            )
        messages.append({"role": role, "content": _content_text(f, turn.get("value"), f"{where}.value")})
    system = f.text("system", required=False)
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages}


def _content_text(f: _Fields, content: Any, where: str) -> str:
    # OpenAI-style content parts: [{"type": "text", "text": ...}, ...] -> their text joined.
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise f.error(f"expected a string, got {type(content).__name__}", where)
    return content


def _text(f: _Fields) -> dict[str, Any]:
    return {"text": f.text("text")}


_CONVERTERS = {
    "alpaca": _alpaca,
    "prompt_response": _prompt_reply("response"),
    "prompt_completion": _prompt_reply("completion"),
    "messages": _messages,
    "sharegpt": _sharegpt,
    "text": _text,
}
