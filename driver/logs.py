"""structlog set-up: console for people, JSON or logfmt for journald and
collectors; no timestamps under journald, which adds its own."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_SECRETS: set[str] = set()


def register_secret(value: str | None) -> None:
    """Values that must never reach a log line, whatever key they hide under."""
    if value:
        _SECRETS.add(value)


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    if _SECRETS:
        for key, value in event.items():
            if isinstance(value, str) and any(s in value for s in _SECRETS):
                for secret in _SECRETS:
                    value = value.replace(secret, "********")
                event[key] = value
    return event


def configure(fmt: str = "console", level: str = "info") -> None:
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if not under_journald:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors += [structlog.processors.format_exc_info, _redact]
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer())
    elif fmt == "logfmt":
        processors.append(structlog.processors.LogfmtRenderer(key_order=["level", "event"]))
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get(name: str) -> Any:
    return structlog.get_logger(name)
