"""An Ollama Modelfile for an exported GGUF: the file, the chat template in Ollama's Go-template
syntax, the stop tokens and the system prompt the model was trained with.

Ollama renders a conversation with the Modelfile's TEMPLATE, so it must produce what the chat
template of training produced. Two families are written out: ChatML (SmolLM, Qwen, rayft's
`chatml`) and Llama 3 (`<|start_header_id|>`, rayft's `llama3`); tests/test_export.py renders both
against the Jinja template they stand for. For any other template no TEMPLATE is written and
Ollama picks its own from the GGUF's `tokenizer.chat_template`, which the file carries.

BOS is not in the templates: llama.cpp adds it when the GGUF says so (tokenizer.ggml.add_bos_token).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rayft.errors import ModelError

MODELFILE = "Modelfile"


@dataclass(frozen=True)
class ChatFamily:
    name: str
    marker: str  # a string only this family's template contains
    template: str  # Ollama's Go template
    end_of_turn: str  # the token that closes a reply: Ollama stops on it
    system_turn: tuple[str, str]  # what surrounds a system prompt in the rendered text


FAMILIES = (
    ChatFamily(
        "chatml",
        "<|im_start|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        "<|im_end|>",
        ("<|im_start|>system\n", "<|im_end|>\n"),
    ),
    ChatFamily(
        "llama3",
        "<|start_header_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
        ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
    ),
)


def chat_family(chat_template: str | None) -> ChatFamily | None:
    """The family a Jinja chat template belongs to, or None (no template, or another family)."""
    if not chat_template:
        return None
    return next((family for family in FAMILIES if family.marker in chat_template), None)


def default_system_prompt(tokenizer: Any, family: ChatFamily) -> str | None:
    """The system prompt a template puts in by itself when a conversation has none (SmolLM2's
    "You are a helpful AI assistant named SmolLM..."): Ollama needs it as the Modelfile's SYSTEM."""
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # a template that needs a system turn, or other roles: no default to carry over
        return None
    start, end = family.system_turn
    bos = tokenizer.bos_token or ""
    # a template may begin with BOS; SmolLM2's BOS is <|im_start|> itself, the turn's first token
    text = rendered[len(bos) :] if bos and not rendered.startswith(start) and rendered.startswith(bos) else rendered
    if not text.startswith(start) or end not in text[len(start) :]:
        return None
    return text[len(start) :].split(end, 1)[0]


def modelfile(
    gguf_name: str, tokenizer: Any, *, system_prompt: str | None = None, header: str | None = None
) -> tuple[str, ChatFamily | None]:
    """The Modelfile's text for `gguf_name` (beside it), and the template family written."""
    family = chat_family(getattr(tokenizer, "chat_template", None))
    lines = [f"# {line}" for line in (header or "").splitlines()]
    lines += [f"FROM ./{gguf_name}", ""]
    if family is None:
        lines.append(
            "# No TEMPLATE: the model's chat template is not ChatML or Llama 3; Ollama takes one matching "
            "the GGUF's tokenizer.chat_template"
            if getattr(tokenizer, "chat_template", None)
            else "# No TEMPLATE: the model has no chat template (a base model): prompts go in as they are"
        )
    else:
        lines += [f"# The {family.name} chat template the model was trained with, in Ollama's syntax"]
        lines += [f'TEMPLATE """{family.template}"""']
        system_prompt = system_prompt or default_system_prompt(tokenizer, family)
    if system_prompt:
        if '"""' in system_prompt:
            raise ModelError('the system prompt holds """, which a Modelfile cannot quote; change data.system_prompt')
        lines += ["", f'SYSTEM """{system_prompt}"""']
    lines.append("")
    for stop in stop_tokens(tokenizer, family):
        lines.append(f"PARAMETER stop {_quoted(stop)}")
    return "\n".join(lines) + "\n", family


def stop_tokens(tokenizer: Any, family: ChatFamily | None) -> list[str]:
    """The family's end-of-turn token and the tokenizer's EOS, each once."""
    found = [family.end_of_turn] if family else []
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in found:
        found.append(eos)
    return found


def ollama_tag(name: str) -> str:
    """A name `ollama create` accepts (lowercase letters, digits, . _ -)."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "model"


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
