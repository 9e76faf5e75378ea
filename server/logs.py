"""Log output for `turboserve serve`: one handler and formatter for every logger (ours and uvicorn's), as
readable text or one JSON object per line, and the access line EdgeMiddleware writes after each response."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, Literal, TextIO

# The id of the request being handled, set by EdgeMiddleware; app log lines written while handling it
# (on the event loop or in a threadpool call, both of which copy the context) carry it.
REQUEST_ID: ContextVar[str | None] = ContextVar("turboserve_request_id", default=None)

ACCESS_LOGGER = "turboserve.access"
# Fields an access line carries besides time/level/logger/message (README: Logs).
ACCESS_FIELDS = ("request_id", "method", "path", "route", "status", "duration_ms", "client", "bytes_out", "tokens",
                 "tokenization_ms", "queue_ms", "inference_ms", "user_agent")


def printable(value: object) -> str:
    """`value` as text that cannot break a text log line: quoted and escaped (JSON) when it holds a space,
    a control character or a quote (a path may carry a decoded %0A)."""
    text = str(value)
    return text if text.isprintable() and " " not in text and '"' not in text else json.dumps(text)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    request_id = REQUEST_ID.get()
    if request_id is not None:
        fields["request_id"] = request_id
    fields.update(getattr(record, "fields", None) or {})
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the request id when there
    is one, the record's `fields` (extra={"fields": {...}}), and the traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        # ensure_ascii: escape every control and non-ASCII character, so one record is always one line.
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`, the fields appended in order."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = _fields(record)
        return line + "".join(f" {k}={printable(v)}" for k, v in fields.items()) if fields else line


def configure_logging(level: str, fmt: Literal["text", "json"], access_log: bool, stream: TextIO | None = None) -> None:
    """Send every record (ours, uvicorn's, `warnings`) through one handler in `fmt`, on `stream` (stderr).

    Run uvicorn with `log_config=None` so it keeps these handlers; its own access line stays off (the
    access line is EdgeMiddleware's, which knows the request id and timings).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()  # records reach the root handler by propagation
        logger.propagate = True
    # An enabled access log is written even when log_level is above info; a disabled one costs nothing.
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.INFO if access_log else logging.CRITICAL + 1)
    logging.captureWarnings(True)
