"""Prompts for `rayft generate` and the interactive loop of `rayft chat`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from rayft.errors import DataError, RayftError
from rayft.eval.generation import Prompt, generate


def prompts_from(prompt: str | None, file: Path | None, system: str | None = None) -> list[Prompt]:
    """One prompt, or a file: .txt (one prompt per line) or .jsonl (prompt / instruction / messages)."""
    texts: list[Any] = []
    if prompt:
        texts.append(prompt)
    if file:
        if not file.is_file():
            raise RayftError(f"no such file: {file}")
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            if file.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"not valid JSON: {exc.msg}", file=str(file), line=number) from None
                texts.append(record.get("messages") or record.get("prompt") or record.get("instruction"))
                if texts[-1] is None:
                    raise DataError("expected a prompt, instruction or messages field", file=str(file), line=number)
            else:
                texts.append(line)
    if not texts:
        raise RayftError("give a prompt or --file")
    system_turn = [{"role": "system", "content": system}] if system else []
    out = []
    for item in texts:
        messages = item if isinstance(item, list) else [{"role": "user", "content": item}]
        if messages and messages[-1]["role"] == "assistant":  # a full conversation: answer its last prompt
            messages = messages[:-1]
        out.append(Prompt(system_turn + messages, None))
    return out


def chat_loop(
    model: Any, tokenizer: Any, console: Console, *, max_new_tokens: int = 256, system: str | None = None
) -> None:
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    console.print("[dim]chat: /reset to start over, /exit or Ctrl-D to leave[/]")
    while True:
        try:
            text = console.input("[bold green]you> [/]")
        except EOFError:
            break
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = history[:1] if system else []
            console.print("[dim](new conversation)[/]")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        answers, _ = generate(model, tokenizer, [Prompt(list(history), None)], max_new_tokens=max_new_tokens)
        history.append({"role": "assistant", "content": answers[0]})
        console.print(f"[bold cyan]model> [/]{escape(answers[0])}", soft_wrap=True)
