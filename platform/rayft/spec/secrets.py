"""Secrets stay names: what counts as a secret in a spec or a string, and how it is hidden
wherever rayft writes or prints a spec, a W&B config or a log line."""

from __future__ import annotations

import os
import re
from typing import Any

# Keys whose values are secrets wherever they appear, and environment variables whose values
# must never be written out even if a user pasted one into a string.
# Whole words at the end of a key: `hf_token`, `api_key`, `secret`, not `max_new_tokens`.
SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|apikey|token|secret|password|passwd|credentials?)$", re.IGNORECASE)
SECRET_ENV_VARS = (
    "WANDB_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "OPENAI_API_KEY",
)
REDACTED = "***"


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


def redact_text(text: str) -> str:
    for name in SECRET_ENV_VARS:
        secret = os.environ.get(name)
        if secret and len(secret) >= 6 and secret in text:
            text = text.replace(secret, REDACTED)
    return text
