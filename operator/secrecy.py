"""Keeping credentials out of plain text: what the operator stores and logs never holds a password.

``cache.redisUrl`` with credentials is refused (validation.py), but the refused spec still passes
through kopf: its last-handled-configuration annotation and its DEBUG lines ("... is in progress:
<body>") would repeat it. ``redact`` blanks the user-info of every URL in a text or a structure, and
the values of query parameters that carry a credential (``redis://redis:6379/0?password=...``: redis
clients read any query parameter as a connection option), and ``install_log_redaction`` applies it to
every log record of the process.
"""

from __future__ import annotations

import logging
import re
from typing import Any

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]*@")
# Query parameters whose value is a credential (compared lowercased).
SECRET_QUERY_NAMES = frozenset(
    {"password", "passwd", "pwd", "pass", "token", "access_token", "api_key", "apikey", "key", "secret"}
)
_SECRET_QUERY = re.compile(
    rf"(?P<name>[?&](?:{'|'.join(sorted(SECRET_QUERY_NAMES))})=)[^&#\s'\"]*", re.IGNORECASE
)
REDACTED = "***"


def redact(text: str) -> str:
    """``redis://admin:S3cr3t@redis:6379/0`` -> ``redis://***@redis:6379/0``, and
    ``redis://redis:6379/0?password=S3cr3t`` -> ``redis://redis:6379/0?password=***``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['name']}{REDACTED}", text)


def redacted(value: Any) -> Any:
    """A copy of a JSON-like structure with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redacted(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redacted(item) for item in value]
    return value


_installed = False


def install_log_redaction() -> None:
    """Redact every log record of this process, kopf's included, before any handler sees it (once)."""
    global _installed
    if _installed:
        return
    _installed = True
    make_record = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        message = record.getMessage()
        if "@" in message or "=" in message:
            record.msg, record.args = redact(message), None
        return record

    logging.setLogRecordFactory(factory)
