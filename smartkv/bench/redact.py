"""Keep secrets (HF tokens and other credentials from the environment) out of logs, result files and messages.

Masked, wherever they appear in text the runner writes or prints:
  - the value of every environment variable whose name contains TOKEN, SECRET, KEY, PASSWORD, PASSWD, PASSPHRASE
    or CREDENTIAL (any case: `HF_TOKEN`, `WANDB_API_KEY`, `AWS_SECRET_ACCESS_KEY`, `MY_KEY`...), 8 characters or
    longer (shorter values are too likely to be ordinary words to mask everywhere);
  - text shaped like a token even when it is not in our environment: `hf_...`, `ghp_...`, `sk-...`;
  - the password of a URL with credentials (`https://user:password@host` -> `https://user:***@host`).
"""
from __future__ import annotations

import logging
import os
import re

_SECRET_NAME = re.compile(r"(TOKEN|SECRET|KEY|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL)", re.IGNORECASE)
MIN_SECRET_CHARS = 8
# Token shapes that may reach an error message without being in our environment (e.g. from a config file).
_TOKEN_SHAPES = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,})\b")
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)([^/\s@]+)(@)", re.IGNORECASE)
MASK = "***"


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look like credentials (long enough to be real)."""
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= MIN_SECRET_CHARS},
                  key=len, reverse=True)


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    text = _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), text)
    return _TOKEN_SHAPES.sub(MASK, text)


class RedactingFilter(logging.Filter):
    """Masks secrets in every record a handler emits (the message with its arguments filled in)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


class RedactingStream:
    """A text stream that masks secrets in what is written to it (the CLI's consoles write through one)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(redact(text))

    def __getattr__(self, name: str):
        return getattr(self._stream, name)
