"""Secrets stay names: what counts as a secret in a spec or in the environment, and how its
value is hidden wherever rayft writes or prints a spec, a W&B setting or a log line."""

from __future__ import annotations

import os
import re
from typing import Any

# Keys (and environment variable names) whose values are secrets: whole words at the end of
# the name, so `hf_token`, `api_key`, `MY_SERVICE_TOKEN` are and `max_new_tokens` is not.
SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|apikey|token|secret|password|passwd|credentials?)$", re.IGNORECASE)
# Secret environment variables whose names the pattern does not catch.
SECRET_ENV_VARS = (
    "WANDB_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "OPENAI_API_KEY",
)
REDACTED = "***"
MIN_SECRET_LENGTH = 6  # shorter values ("1", "true") would redact ordinary text


def is_secret_name(name: str) -> bool:
    """Whether an environment variable (or a spec key) holds a secret."""
    return name.upper() in SECRET_ENV_VARS or bool(SECRET_KEY.search(name))


def secret_values(names: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The values of this environment's secret variables (and of `names`, e.g. run.forward_env),
    longest first so that a secret containing another is hidden whole."""
    values = {
        value
        for name, value in os.environ.items()
        if (is_secret_name(name) or name in names) and len(value) >= MIN_SECRET_LENGTH
    }
    return sorted(values, key=len, reverse=True)


def redact(value: Any, key: str = "") -> Any:
    """A copy with secret values replaced: by key name, and by the values of secret env vars."""
    if key and SECRET_KEY.search(key) and value not in (None, "", [], {}):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_text(text: str, names: tuple[str, ...] | list[str] = ()) -> str:
    """`text` with every secret value hidden, in any letter case (a name lowercased for a
    Kubernetes object or a W&B tag still hides it)."""
    for secret in secret_values(names):
        if secret.lower() in text.lower():
            text = re.sub(re.escape(secret), REDACTED, text, flags=re.IGNORECASE)
    return text


def contains_secret(text: str, names: tuple[str, ...] | list[str] = ()) -> bool:
    return redact_text(text, names) != text


def redact_command(words: list[str] | tuple[str, ...]) -> list[str]:
    """A command line as it may be written down: a dotted override whose key names a secret
    (`tracking.wandb.api_key=...`) keeps its key only, and secret values are hidden anywhere."""
    out = []
    for word in words:
        key, equals, value = word.partition("=")
        if equals and value and SECRET_KEY.search(key.rsplit(".", 1)[-1]):
            word = f"{key}={REDACTED}"
        out.append(redact_text(word))
    return out
