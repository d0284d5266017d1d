"""Chat templates: the tokenizer's own, built-in ones (chatml, llama3, llama2, plain, none), or a
.jinja file; rendered with Jinja exactly as transformers renders them.

Masking (tokenize.py) finds each assistant reply as the difference between the conversation
rendered up to the reply with a generation prompt (what inference renders at that turn) and
rendered with the reply. `check_template` runs before any data is touched and refuses, with the
true cause, a template whose replies cannot be found that way: the generation prompt must be
followed by the reply, nothing the generation prompt does not emit may come before the reply
(except the reply's own reasoning block), and a reply must be closed by an end-of-turn marker
(else the model never learns to stop).

What the probes also learn about a template, so rendering can adapt the data to it:
- how it takes reasoning: from `reasoning_content` (Qwen3), inline as a <think> block at the start
  of the content (DeepSeek-R1's training variant), or not at all;
- whether its generation prompt opens a reasoning block (DeepSeek-R1: "<think>\\n"), so a reply
  without reasoning gets an empty block, as the model would emit it;
- what it appends only after the last message (Phi-3.5: the end-of-sequence token), which is
  not part of any reply: inference never renders it after a turn;
- whether it renders the system message only into a conversation that ends with a user turn
  (Mistral-7B-Instruct-v0.3 puts it into the last user turn, the one inference answers, and
  leaves it out once a reply follows): each reply is then trained after the prompt inference
  renders for it, system message included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rayft.errors import SpecError

Reasoning = Literal["field", "inline", "none"]

# Pieces the built-ins share: tool calls as Hermes-style JSON (what Qwen2.5 and most open agent
# data use), reasoning as a <think> block before the content.
_CALLS = (
    "{% if message['tool_calls'] is defined %}{% for call in message['tool_calls'] %}"
    "{{ ('\\n' if message['content'] or not loop.first else '') + '<tool_call>\\n'"
    " + {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson"
    " + '\\n</tool_call>' }}"
    "{% endfor %}{% endif %}"
)
_THINK = (
    "{% if message['reasoning_content'] is defined %}"
    "{{ '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    # ChatML (Qwen, SmolLM, OpenHermes): <|im_start|>role\ncontent<|im_end|>\n; tools listed in the
    # system turn, tool calls as <tool_call> JSON, reasoning as a <think> block in every turn.
    "chatml": (
        "{% set turns = messages %}"
        "{% if tools %}{{ '<|im_start|>system\\n' }}"
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
        "{% set turns = messages[1:] %}{% endif %}"
        '{{ \'# Tools\\n\\nCall a tool with <tool_call>{"name": ..., "arguments": ...}</tool_call>. '
        "Available tools:\\n<tools>' }}"
        "{% for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor %}{{ '\\n</tools><|im_end|>\\n' }}{% endif %}"
        "{% for message in turns %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}" + _THINK + "{{ message['content'] }}" + _CALLS + ""
        "{{ '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama 3 / 3.1 instruct, without the date preamble; tools in the system turn, tool calls as
    # {"name", "parameters"} JSON, tool results as ipython turns (as Llama 3.1 renders them).
    "llama3": (
        "{{ bos_token }}"
        "{% set turns = messages %}"
        "{% if tools %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n\\n' }}"
        "{% for tool in tools %}{{ tool | tojson + '\\n\\n' }}{% endfor %}"
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] | trim }}"
        "{% set turns = messages[1:] %}{% endif %}{{ '<|eot_id|>' }}{% endif %}"
        "{% for message in turns %}"
        "{{ '<|start_header_id|>' + ('ipython' if message['role'] == 'tool' else message['role'])"
        " + '<|end_header_id|>\\n\\n' + message['content'] | trim }}"
        "{% if message['tool_calls'] is defined %}{% for call in message['tool_calls'] %}"
        "{{ ('\\n' if message['content'] | trim or not loop.first else '')"
        " + {'name': call['function']['name'], 'parameters': call['function']['arguments']} | tojson }}"
        "{% endfor %}{% endif %}"
        "{{ '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Llama 2 chat: the system prompt folds into the first user turn. It has no place for a later
    # system turn or a tool turn: those are refused, never dropped.
    "llama2": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('llama2 renders a system message only as the first turn') }}{% endif %}"
        "{% if message['role'] == 'tool' or message['tool_calls'] is defined %}"
        "{{ raise_exception('llama2 has no tool turns; choose chatml, llama3 or plain') }}{% endif %}"
        "{% endfor %}"
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% set turns = messages[1:] %}"
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
        "{% if tools %}{{ '### Tools:\\n' }}{% for tool in tools %}{{ tool | tojson + '\\n' }}{% endfor %}"
        "{{ '\\n' }}{% endif %}"
        "{% for message in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}"
        "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] }}"
        "{% elif message['role'] == 'tool' %}{{ '### Tool result:\\n' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Assistant:\\n' }}" + _THINK + "{{ message['content'] }}"
        "" + _CALLS + "{{ eos_token }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\\n\\n### Assistant:\\n' }}{% endif %}"
    ),
    # Data whose prompts are already formatted (e.g. an Alpaca header inside `prompt`):
    # contents verbatim, each reply closed by EOS.
    "none": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ message['content'] }}" + _CALLS + "{{ eos_token }}"
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


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False, **_: Any) -> str:
    # transformers' own tojson: no HTML escaping, unicode kept.
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=False)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlocks, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    template = env.from_string(source)
    # Jinja keeps a template's globals as a ChainMap over its environment's and copies them into
    # every render's context key by key (45 us per render of SmolLM2's template; 27 us with a plain
    # dict). Both are fixed here, so one plain dict renders the same, copied at C speed.
    template.globals = dict(template.globals)
    return template


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str
    bos_token: str = ""
    eos_token: str = ""
    special: dict[str, str] = field(default_factory=dict)
    supports_system: bool = True  # some templates (older Mistral, Gemma) reject or drop system turns
    reasoning: Reasoning = "field"  # how the template takes a reply's reasoning (module docstring)
    opens_reasoning: bool = False  # its generation prompt opens a <think> block
    final_suffix: str = ""  # appended after the last message only (Phi-3.5: EOS); never trained
    system_in_prompt_only: bool = False  # the system message is rendered only before a generation (Mistral v0.3)

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, tools: list | None = None
    ) -> str:
        return _compile(self.source).render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **self.special,
        )

    def adapt(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Canonical messages in the form this template reads: a template that takes reasoning
        inline gets it as a <think> block at the start of the content (an empty one when its
        generation prompt opens the block, as the model then always emits one)."""
        if self.reasoning != "inline":
            return messages
        out = []
        for message in messages:
            if message["role"] == "assistant" and ("reasoning_content" in message or self.opens_reasoning):
                message = dict(message)
                reasoning = message.pop("reasoning_content", "")
                message["content"] = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{message['content']}"
            out.append(message)
        return out

    def end_of_turn(self) -> str:
        """Text a rendered reply ends with (e.g. '<|im_end|>\\n'): what the model must learn to emit."""
        probe = self.adapt([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])
        prompt = self.render(probe[:1], add_generation_prompt=True)
        full = self.render(probe)
        reply = full[len(prompt) :] if full.startswith(prompt) else ""
        if self.final_suffix and reply.endswith(self.final_suffix):
            reply = reply[: -len(self.final_suffix)]
        return reply[reply.rfind("A") + 1 :] if "A" in reply else ""


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
    return check_template(template)


_SYSTEM_PROBE = [
    {"role": "system", "content": "SYS-PROBE"},
    {"role": "user", "content": "U"},
    {"role": "assistant", "content": "A"},
]


def _renders_system(template: ChatTemplate, prompt: bool = False) -> bool:
    """Whether the system message is rendered: in a conversation with a reply, or (prompt) in
    the generation prompt that inference renders before the reply."""
    probe = template.adapt(_SYSTEM_PROBE)
    try:
        return "SYS-PROBE" in (
            template.render(probe[:2], add_generation_prompt=True) if prompt else template.render(probe)
        )
    except jinja2.TemplateError:
        return False


_PROBE = [
    {"role": "user", "content": "USER-1"},
    {"role": "assistant", "content": "REPLY-1"},
    {"role": "user", "content": "USER-2"},
    {"role": "assistant", "content": "REPLY-2"},
]
_THOUGHT = "THINK-PROBE"


def _reasoning_mode(template: ChatTemplate) -> Reasoning:
    """Where the template reads a reply's reasoning from, found by rendering one."""
    as_field = [_PROBE[0], {**_PROBE[1], "reasoning_content": _THOUGHT}]
    inline = [_PROBE[0], {**_PROBE[1], "content": f"{THINK_OPEN}\n{_THOUGHT}\n{THINK_CLOSE}\n\nREPLY-1"}]
    for mode, probe in (("field", as_field), ("inline", inline)):
        try:
            if _THOUGHT in template.render(probe):
                return mode  # type: ignore[return-value]
        except jinja2.TemplateError:
            pass
    return "none"


def _final_suffix(template: ChatTemplate) -> str:
    """What the template appends only after the last message: the tail of a conversation that
    ends with a user turn, beyond what the same turn is followed by mid-conversation. Text is
    compared character by character, so a tail that shares its first characters with what
    follows mid-conversation ('</s>' and '<|assistant|>' share '<') is widened to the EOS token."""
    ending = template.render(template.adapt(_PROBE[:1]))
    middle = template.render(template.adapt(_PROBE[:3]))
    tail = ending[ending.find("USER-1") + len("USER-1") :]
    continued = middle[middle.find("USER-1") + len("USER-1") :]
    common = 0
    while common < min(len(tail), len(continued)) and tail[common] == continued[common]:
        common += 1
    suffix = tail[common:]
    for token in (template.eos_token, template.bos_token):
        if suffix and token and len(token) > len(suffix) and tail.endswith(token):
            return token
    return suffix


def check_template(template: ChatTemplate) -> ChatTemplate:
    """Fail early, naming the template and the true cause, if masking or stopping cannot work
    with it; return it with what the probes learned (module docstring)."""
    where, name = "data.template", template.name
    try:
        prompt = template.render(_PROBE[:1], add_generation_prompt=True)
        template = replace(
            template, reasoning=_reasoning_mode(template), opens_reasoning=prompt.rstrip().endswith(THINK_OPEN)
        )
        probe = template.adapt(_PROBE)
        template = replace(template, final_suffix=_final_suffix(template))
        full = template.render(probe)
        turns = [
            (template.render(probe[:i], add_generation_prompt=True), template.render(probe[: i + 1])) for i in (1, 3)
        ]
    except jinja2.TemplateError as exc:
        raise SpecError(
            f"template {name!r} fails to render a user/assistant conversation: {exc}", field=where
        ) from None
    for text in ("USER-1", "REPLY-1", "USER-2", "REPLY-2"):
        if text not in full:
            raise SpecError(
                f"template {name!r} drops message content ({text!r} is missing from the rendered conversation)",
                field=where,
            )
    for prompt, upto in turns:
        if not upto.startswith(prompt):
            raise SpecError(_no_reply_after_prompt(template, prompt, upto), field=where)
    prompt, upto = turns[0]
    reply = upto[len(prompt) :]
    before = reply[: reply.find("REPLY-1")]
    if before.strip() and not _is_reasoning_frame(template, before):
        raise SpecError(
            f"template {name!r} renders {before!r} before a reply that add_generation_prompt=True does not emit "
            "(usually the assistant header), so it would be trained as part of the reply; emit it when "
            "add_generation_prompt is set",
            field=where,
        )
    if not template.end_of_turn().strip():
        raise SpecError(
            f"template {name!r} does not close an assistant reply with an end-of-turn "
            "marker (e.g. eos_token or <|im_end|>), so a tuned model would never learn to stop",
            field=where,
        )
    in_conversation, in_prompt = _renders_system(template), _renders_system(template, prompt=True)
    return replace(
        template,
        supports_system=in_conversation or in_prompt,
        system_in_prompt_only=in_prompt and not in_conversation,
    )


def _is_reasoning_frame(template: ChatTemplate, before: str) -> bool:
    """Whether text the template puts before a reply is the reply's own (empty) reasoning block,
    e.g. Qwen3's "<think>\\n\\n</think>\\n\\n": the model emits it, so it is part of the reply."""
    if template.reasoning == "none":
        return False
    probe = template.adapt([_PROBE[0], {**_PROBE[1], "reasoning_content": _THOUGHT}])
    prompt = template.render(probe[:1], add_generation_prompt=True)
    reply = template.render(probe)[len(prompt) :]
    framed = reply[: reply.find("REPLY-1")]
    return _THOUGHT in framed and framed.replace(_THOUGHT, "") == before


def _no_reply_after_prompt(template: ChatTemplate, prompt: str, upto: str) -> str:
    common = 0
    while common < min(len(prompt), len(upto)) and prompt[common] == upto[common]:
        common += 1
    emitted, rendered = prompt[common:], upto[common:]
    if template.opens_reasoning and template.reasoning == "none":
        return (
            f"template {template.name!r} opens a reasoning block in its generation prompt ({emitted!r}) but "
            f"renders past replies without it ({rendered[:40]!r}...): it drops the reasoning of assistant turns, "
            "so no reply can be trained as inference renders it. Use a training variant of the template that "
            "keeps the reasoning (TRL ships some as trl/chat_templates/*_training.jinja, e.g. "
            "deepseek_r1_distill_training.jinja) as data.template"
        )
    return (
        f"template {template.name!r} does not render the generation prompt (add_generation_prompt=True) as a "
        f"prefix of the conversation: it emits {emitted!r} where a reply is rendered as {rendered[:40]!r}..., "
        "so assistant turns cannot be located; it needs the assistant header emitted when add_generation_prompt "
        "is set, and nothing else"
    )
