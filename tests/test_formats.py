"""Every common SFT format -> canonical messages; bad records -> errors naming file:line and field."""

from __future__ import annotations

import pytest

from rayft.data.formats import detect_format, to_sample
from rayft.errors import DataError


def convert(record, fmt="auto", columns=None, system=None):
    return to_sample(record, fmt, columns or {}, system, "data.jsonl", 17)


def test_alpaca_with_and_without_input() -> None:
    assert convert({"instruction": "Add", "input": "2 and 3", "output": "5"})["messages"] == [
        {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert convert({"instruction": "Say hi", "input": "  ", "output": "hi"})["messages"][0]["content"] == "Say hi"


def test_prompt_response_and_prompt_completion() -> None:
    assert convert({"prompt": "Q", "response": "A"})["messages"] == [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert convert({"prompt": "Q", "completion": "A"})["messages"][1] == {"role": "assistant", "content": "A"}


def test_openai_messages_multi_turn_with_system_and_content_parts() -> None:
    record = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "A2"},
        ]
    }
    messages = convert(record)["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == "Hi there"


def test_sharegpt_speakers() -> None:
    record = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "A"},
        ]
    }
    assert convert(record)["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]


def test_raw_text() -> None:
    assert convert({"text": "Once upon a time"}) == {"text": "Once upon a time"}


def test_column_remapping() -> None:
    record = {"question": "Q", "answer": "A"}
    sample = convert(record, "prompt_response", {"prompt": "question", "response": "answer"})
    assert sample["messages"][1]["content"] == "A"
    assert detect_format(record, {"prompt": "question", "response": "answer"}) == "prompt_response"


def test_system_prompt_from_spec_only_when_data_has_none() -> None:
    assert convert({"prompt": "Q", "response": "A"}, system="Be brief.")["messages"][0] == {
        "role": "system",
        "content": "Be brief.",
    }
    record = {
        "messages": [
            {"role": "system", "content": "own"},
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"},
        ]
    }
    assert convert(record, system="Be brief.")["messages"][0]["content"] == "own"


@pytest.mark.parametrize(
    "record, fmt, message",
    [
        ({"instruction": "x"}, "alpaca", 'data.jsonl:17: field "output": missing field'),
        ({"instruction": "x", "output": 5}, "alpaca", 'data.jsonl:17: field "output": expected a string, got int'),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages",
            "field \"messages[0].role\": unknown role 'robot'",
        ),
        ({"messages": []}, "messages", 'field "messages": empty conversation'),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "messages", "no assistant turn"),
        (
            {"conversations": [{"from": "alien", "value": "x"}]},
            "sharegpt",
            'field "conversations[0].from": unknown speaker',
        ),
        ({"foo": 1}, "auto", "cannot tell the format from the fields ['foo']"),
        (["not", "an", "object"], "auto", "expected a JSON object, got list"),
        ({"text": "x"}, "yaml", "unknown format 'yaml'"),
    ],
)
def test_bad_records_name_file_line_and_field(record, fmt, message) -> None:
    with pytest.raises(DataError) as error:
        convert(record, fmt)
    assert message in str(error.value)
    assert str(error.value).startswith("data.jsonl:17")
