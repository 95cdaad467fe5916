"""Structured logs: one JSON object per line, with the account, the service and the change id.

Every record carries ``time``, ``level``, ``logger`` and ``message``; the fields the code passes in
``extra=`` (``account``, ``change_id``, ``queue``, ``run_id``...) are added as they are. ``service``
comes from ``extra``, else from the service whose task is logging (:func:`service_context`),
else from the process (``prefsync run writer`` → ``writer``).

Secrets stay out: fields whose name says they hold a secret are replaced by ``***``, and
credentials inside URLs (``amqp://user:password@host``) are masked in every string. The
level is ``PREFSYNC_LOG_LEVEL`` (default INFO); ``PREFSYNC_LOG_FORMAT=text`` gives plain lines
for reading at a terminal.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
import traceback
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO, TypeVar

import orjson

T = TypeVar("T")

# The service a task works for; set once per service task (runtime) and read by logs and metrics.
current_service: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "prefsync_service", default=None)

_SECRET_FIELD = re.compile(r"pass(word)?|secret|token|authori[sz]ation|api[_-]?key|credential",
                           re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]*@", re.IGNORECASE)
# LogRecord's own attributes: everything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


def mask(text: str) -> str:
    """``text`` with any ``scheme://user:password@`` credentials masked."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)


@contextmanager
def service_context(service: str) -> Iterator[None]:
    """Within this block (and the tasks it starts), logs and metrics name ``service``."""
    token = current_service.set(service)
    try:
        yield
    finally:
        current_service.reset(token)


def _clean(name: str, value: Any) -> Any:
    if _SECRET_FIELD.search(name):
        return "***"
    if isinstance(value, str):
        return mask(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean("", v) for v in value]
    if isinstance(value, dict):
        return {str(k): _clean(str(k), v) for k, v in value.items()}
    return mask(str(value))


class JsonFormatter(logging.Formatter):
    def __init__(self, *, default_service: str | None = None) -> None:
        super().__init__()
        self.default_service = default_service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": mask(record.getMessage()),
        }
        service = getattr(record, "service", None) or current_service.get() or self.default_service
        if service:
            entry["service"] = service
        for name, value in vars(record).items():
            if name not in _RECORD_FIELDS and name not in entry:
                entry[name] = _clean(name, value)
        if record.exc_info:
            entry["error"] = mask("".join(traceback.format_exception(*record.exc_info)).rstrip())
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """Plain lines for people; still masked."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))


def configure_logging(*, service: str | None = None, level: str | None = None,
                      fmt: str | None = None, stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr) as JSON lines (or text), at ``level``."""
    env_level = level or os.environ.get("PREFSYNC_LOG_LEVEL") or "INFO"
    resolved = logging.getLevelName(env_level.strip().upper())
    if not isinstance(resolved, int):
        resolved = logging.INFO
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    kind = (fmt or os.environ.get("PREFSYNC_LOG_FORMAT") or "json").strip().lower()
    handler.setFormatter(TextFormatter() if kind == "text"
                         else JsonFormatter(default_service=service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(resolved)
    # aio-pika and aiormq narrate every reconnect attempt at INFO
    for chatty in ("aio_pika", "aiormq"):
        logging.getLogger(chatty).setLevel(max(resolved, logging.WARNING))


async def as_service(service: str, work: Awaitable[T]) -> T:
    """Run ``work`` (as its own task) on behalf of ``service``: its logs and metrics say so."""
    current_service.set(service)
    return await work
