"""Process logging: human-readable text on a terminal, one JSON object per line otherwise.

Every record carries the id of the request being served (``request_id``) when
it is logged during a gRPC call: the call lifecycle (:mod:`server_kit.call_lifecycle`) puts the id in
:data:`request_id_var`, which asyncio copies into the call's task and into
``asyncio.to_thread`` workers.

A JSON line has ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
``request_id`` (or null), any of ``rpc``, ``status``, ``duration_ms``,
``peer`` and ``client`` a record was given through ``extra=``, and ``exc``
(the traceback) when there is one.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Literal

#: The id of the request the current task (or worker thread) is serving; None outside a call.
request_id_var: ContextVar[str | None] = ContextVar("seqsal_request_id", default=None)

#: Fields copied from a record's ``extra`` into its JSON line, in this order.
EXTRA_FIELDS = ("rpc", "status", "duration_ms", "peer", "client")

LogFormat = Literal["auto", "json", "text"]


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request id (``record.request_id``), unless it has one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exc"] = record.exc_text
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def resolve_format(log_format: LogFormat, stream: IO[str] | None = None) -> Literal["json", "text"]:
    """``auto`` means text when ``stream`` (default stderr) is a terminal and JSON otherwise."""
    if log_format != "auto":
        return log_format
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (it may be swapped, e.g. by test runners)."""

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def json_handler(stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing JSON lines with request ids to ``stream`` (default: the current stderr)."""
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    return handler


def configure_json_logging(level: str, stream: IO[str] | None = None) -> None:
    """Replace the root logger's handlers with one JSON-lines handler at ``level``."""
    logging.basicConfig(level=level.upper(), handlers=[json_handler(stream)], force=True)
