"""Chat templates: the tokenizer's own, built-in ones (chatml, llama3, llama2, plain, none), or a
.jinja file; rendered with Jinja exactly as transformers renders them.

Masking (tokenize.py) finds each assistant reply as the difference between the conversation
rendered up to the reply with a generation prompt and rendered with the reply. So a template
needs two things, checked by `check_template` before any data is touched: the generation prompt
must be a prefix of the rendered reply, and a reply must be closed by an end-of-turn marker
(else the model never learns to stop).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rayft.errors import SpecError

BUILTIN_TEMPLATES: dict[str, str] = {
    # ChatML (Qwen, SmolLM, OpenHermes): <|im_start|>role\ncontent<|im_end|>\n
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama 3 / 3.1 instruct, without the tool-calling and date preamble.
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Llama 2 chat: the system prompt folds into the first user turn.
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
    # For base models without a template (no special tokens needed): headers and the EOS token.
    # Separators come before a turn, so every reply ends exactly at EOS (a token boundary).
    "plain": (
        "{{ bos_token }}"
        "{% for message in messages %}{% if not loop.first %}{{ '\n\n' }}{% endif %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}"
        "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Assistant:\n' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\n\n### Assistant:\n' }}{% endif %}"
    ),
    # Data whose prompts are already formatted (e.g. an Alpaca header inside `prompt`):
    # contents verbatim, each reply closed by EOS.
    "none": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
    ),
}


class _GenerationBlocks(Extension):
    """Accept transformers' `{% generation %}` markers; rendering ignores them (masking here
    does not depend on them, see the module docstring)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlocks, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda value, indent=None, **_: __import__("json").dumps(
        value, indent=indent, ensure_ascii=False
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str
    bos_token: str = ""
    eos_token: str = ""
    special: dict[str, str] = field(default_factory=dict)
    supports_system: bool = True  # some templates (older Mistral, Gemma) reject or drop system turns

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return _compile(self.source).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **self.special,
        )

    def end_of_turn(self) -> str:
        """Text a rendered reply ends with (e.g. '<|im_end|>\\n'): what the model must learn to emit."""
        probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
        prompt = self.render(probe[:1], add_generation_prompt=True)
        full = self.render(probe)
        reply = full[len(prompt) :] if full.startswith(prompt) else ""
        return reply[reply.find("A") + 1 :] if "A" in reply else ""


def resolve_template(name: str, tokenizer: Any) -> ChatTemplate:
    """`data.template` -> a ChatTemplate bound to the tokenizer's special tokens."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one is what chat uses
        own = own.get("default")
    if name == "auto":
        name = "tokenizer" if own else "plain"
    if name == "tokenizer":
        if not own:
            raise SpecError(
                f"the tokenizer has no chat template; choose one of {', '.join(BUILTIN_TEMPLATES)} or a .jinja file",
                field="data.template",
            )
        source = own
    elif name in BUILTIN_TEMPLATES:
        source = BUILTIN_TEMPLATES[name]
    elif name.endswith((".jinja", ".j2")):
        path = Path(name)
        if not path.is_file():
            raise SpecError(f"no such template file: {name}", field="data.template")
        source = path.read_text(encoding="utf-8")
    else:
        raise SpecError(
            f"unknown template {name!r}; expected auto, tokenizer, "
            f"{', '.join(BUILTIN_TEMPLATES)} or a path to a .jinja file",
            field="data.template",
        )
    template = ChatTemplate(
        name=name,
        source=source,
        bos_token=getattr(tokenizer, "bos_token", None) or "",
        eos_token=getattr(tokenizer, "eos_token", None) or "",
    )
    check_template(template)
    return replace(template, supports_system=_renders_system(template))


def _renders_system(template: ChatTemplate) -> bool:
    probe = [
        {"role": "system", "content": "SYS-PROBE"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    try:
        return "SYS-PROBE" in template.render(probe)
    except jinja2.TemplateError:
        return False


def check_template(template: ChatTemplate) -> None:
    """Fail early, naming the template, if masking or stopping cannot work with it."""
    where = "data.template"
    probe = [
        {"role": "user", "content": "USER-1"},
        {"role": "assistant", "content": "REPLY-1"},
        {"role": "user", "content": "USER-2"},
        {"role": "assistant", "content": "REPLY-2"},
    ]
    try:
        full = template.render(probe)
        prompts = [template.render(probe[:i], add_generation_prompt=True) for i in (1, 3)]
        partial = template.render(probe[:2])
    except jinja2.TemplateError as exc:
        raise SpecError(
            f"template {template.name!r} fails to render a user/assistant conversation: {exc}", field=where
        ) from None
    for text in ("USER-1", "REPLY-1", "USER-2", "REPLY-2"):
        if text not in full:
            raise SpecError(
                f"template {template.name!r} drops message content ({text!r} is missing "
                "from the rendered conversation)",
                field=where,
            )
    if not (full.startswith(partial) and partial.startswith(prompts[0]) and full.startswith(prompts[1])):
        raise SpecError(
            f"template {template.name!r} does not render the generation prompt "
            "(add_generation_prompt=True) as a prefix of the conversation, so assistant turns cannot "
            "be located; it needs an assistant header emitted when add_generation_prompt is set",
            field=where,
        )
    reply = partial[len(prompts[0]) :]
    if not reply.lstrip().startswith("REPLY-1"):
        raise SpecError(
            f"template {template.name!r} renders {reply[: reply.find('REPLY-1')]!r} before a reply that "
            "add_generation_prompt=True does not emit (usually the assistant header), so it would be trained "
            "as part of the reply; emit it when add_generation_prompt is set",
            field=where,
        )
    if not template.end_of_turn().strip():
        raise SpecError(
            f"template {template.name!r} does not close an assistant reply with an end-of-turn "
            "marker (e.g. eos_token or <|im_end|>), so a tuned model would never learn to stop",
            field=where,
        )
