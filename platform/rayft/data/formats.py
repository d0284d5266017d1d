"""Records in the common SFT formats -> one canonical sample.

A canonical sample is either a conversation, `{"messages": [...], "tools": [...]}`, whose
assistant turns are trained, or raw text, `{"text": ...}`, trained on every token (continued
pre-training). Every error names the file:line and the field, so a user can fix the record.

A canonical message is `{"role", "content"}` (content always a string), plus what agentic and
reasoning data carry, only where present (some templates test `'tool_calls' in message`):
  assistant: "reasoning_content" (from the field, or a leading <think>...</think> block of the
             content) and "tool_calls": [{"type": "function", "id"?, "function": {"name",
             "arguments": a JSON object}}] (arguments given as a JSON string are parsed)
  tool:      "tool_call_id" and "name" when the data has them
`tools` (JSON schemas, OpenAI style {"type": "function", "function": {...}}) is per sample.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rayft.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
# Roles other tools write for a tool result.
ROLE_ALIASES = {"function": "tool", "ipython": "tool", "observation": "tool", "tool_results": "tool"}
# A reasoning trace written inside the reply, as DeepSeek-R1 and Qwen3 emit it.
THINK_BLOCK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)
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
    "function_call": "assistant",  # a tool call (LLaMA-Factory's ShareGPT); its value is the call as JSON
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
        role = turn.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise f.error(f"unknown role {turn.get('role')!r}; expected one of {', '.join(ROLES)}", f"{where}.role")
        message: dict[str, Any] = {"role": role}
        calls = turn.get(f.name("tool_calls"))
        content = turn.get("content")
        if content is None and (calls or role == "tool"):
            content = ""  # an assistant turn that only calls tools; a tool that returned nothing
        message["content"] = _content_text(f, content, f"{where}.content")
        if role == "assistant":
            _add_reasoning(f, message, turn, where)
            if calls is not None:
                _add_tool_calls(f, message, calls, f"{where}.{f.name('tool_calls')}")
        elif calls:
            raise f.error(f"only assistant turns call tools, not {role} turns", f"{where}.{f.name('tool_calls')}")
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if turn.get(key) is not None:
                    message[key] = str(turn[key])
        messages.append(message)
    return _with_tools(f, {"messages": messages})


def _add_reasoning(f: _Fields, message: dict[str, Any], turn: dict[str, Any], where: str) -> None:
    """reasoning_content (or its remapped column, or `reasoning` / `thinking`), else a leading
    <think> block of the content: kept apart, so the template places it and train_on decides."""
    names = [f.name("reasoning_content"), "reasoning_content", "reasoning", "thinking"]
    reasoning = next((turn[name] for name in names if turn.get(name) is not None), None)
    if reasoning is not None and not isinstance(reasoning, str):
        raise f.error(f"expected a string, got {type(reasoning).__name__}", f"{where}.{names[0]}")
    block = THINK_BLOCK.match(message["content"])
    if block:
        if reasoning is None:
            reasoning = block.group(1).strip("\n")
        message["content"] = message["content"][block.end() :]
    if reasoning is not None and reasoning.strip():
        message["reasoning_content"] = reasoning


def _add_tool_calls(f: _Fields, message: dict[str, Any], calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise f.error(f"expected a list of tool calls, got {type(calls).__name__}", where)
    if calls:
        message["tool_calls"] = [_tool_call(f, call, f"{where}[{i}]") for i, call in enumerate(calls)]


def _tool_call(f: _Fields, call: Any, where: str) -> dict[str, Any]:
    """One call, OpenAI style ({"id", "type", "function": {"name", "arguments"}}) or flat
    ({"name", "arguments"}); arguments become a JSON object (the form chat templates expect)."""
    if not isinstance(call, dict):
        raise f.error(f"expected an object with a function name and arguments, got {type(call).__name__}", where)
    function = call.get("function", call)
    if not isinstance(function, dict):
        raise f.error(f"expected an object, got {type(function).__name__}", f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise f.error("a tool call needs a function name", f"{where}.function.name")
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise f.error(
                f"arguments are not valid JSON ({exc.msg} at column {exc.colno})", f"{where}.arguments"
            ) from None
    if not isinstance(arguments, dict):
        raise f.error(f"arguments must be a JSON object, got {type(arguments).__name__}", f"{where}.arguments")
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call.get("id") is not None:
        out["id"] = str(call["id"])
    return out


def _with_tools(f: _Fields, sample: dict[str, Any]) -> dict[str, Any]:
    """The record's tool schemas (a list, or a JSON string of one), each as {"type": "function",
    "function": {...}}, so every template sees the form transformers documents."""
    column = f.name("tools")
    tools = f.record.get(column)
    if tools is None or tools == "" or tools == []:
        return sample
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise f.error(f"tools are not valid JSON ({exc.msg} at column {exc.colno})", column) from None
    if not isinstance(tools, list):
        raise f.error(f"expected a list of tool schemas, got {type(tools).__name__}", column)
    schemas = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("function", tool).get("name"), str):
            raise f.error("a tool schema needs a function name", f"{column}[{index}]")
        schemas.append(tool if "function" in tool else {"type": "function", "function": tool})
    sample["tools"] = schemas
    return sample


def _sharegpt(f: _Fields) -> dict[str, Any]:
    column, turns = f.turns("conversations", "conversation", "messages")
    messages: list[dict[str, Any]] = []
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
        value = _content_text(f, turn.get("value"), f"{where}.value")
        if str(speaker).lower() == "function_call":
            _sharegpt_call(f, messages, value, f"{where}.value")
            continue
        message: dict[str, Any] = {"role": role, "content": value}
        if role == "assistant":
            _add_reasoning(f, message, turn, where)
        messages.append(message)
    system = f.text("system", required=False)
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return _with_tools(f, {"messages": messages})


def _sharegpt_call(f: _Fields, messages: list[dict[str, Any]], value: str, where: str) -> None:
    """A function_call turn: one call or a list of calls as JSON. It joins the assistant turn
    just before it when that turn has no calls yet (text, then the call), else it is one."""
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as exc:
        raise f.error(f"a function_call must be JSON ({exc.msg} at column {exc.colno})", where) from None
    calls = calls if isinstance(calls, list) else [calls]
    parsed = [_tool_call(f, call, f"{where}[{i}]") for i, call in enumerate(calls)]
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and "tool_calls" not in last:
        last["tool_calls"] = parsed
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": parsed})


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
