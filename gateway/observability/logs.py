"""The one logging setup of every UniHealth process (``serve``, ``subgraph``, ``streams relay``,
``streams worker``).

Contract: :func:`setup_logging` (or :func:`logging_config`, the same as a ``dictConfig`` dict for
processes whose framework applies it, e.g. Faust) sends every logger's records at ``level`` and
above to stderr, one line per record:

* ``text``: ``[time] LEVEL logger [request id]: message``;
* ``json``: one JSON object per line with ``ts`` (UTC, ISO 8601, milliseconds), ``level``,
  ``logger``, ``msg``, ``service`` (which process), ``request_id`` (the current request's, see
  :mod:`.request_id`; ``""`` outside a request), every ``extra=`` field the caller passed, and
  ``exc`` (the formatted traceback) when there is one.

Callers keep PHI out of messages and extras: no query strings, bodies or patient ids.
"""

from __future__ import annotations

import logging
import logging.config
import time
from typing import Any, Literal

import orjson

from .request_id import REQUEST_ID

LogFormat = Literal["json", "text"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "[%(asctime)s] %(levelname)s %(name)s [%(request_id)s]: %(message)s"
_OURS = {"message", "asctime", "request_id", "service", "color_message"}  # color_message: uvicorn's ANSI copy
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | _OURS


class ContextFilter(logging.Filter):
    """Stamps each record with the current request id and the process's service name."""

    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        record.service = self.service
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module contract)."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "service": getattr(record, "service", ""),
            "request_id": str(getattr(record, "request_id", "")).strip("-") or REQUEST_ID.get(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return orjson.dumps(out, default=str).decode()


def logging_config(log_format: str, level: str | int = "INFO", *, service: str = "") -> dict[str, Any]:
    """The ``logging.config.dictConfig`` dict of :func:`setup_logging` (``log_format`` is one of
    :data:`LOG_FORMATS`, else ValueError)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    level = level.upper() if isinstance(level, str) else logging.getLevelName(level)
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT, "datefmt": "%Y-%m-%d %H:%M:%S"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter, "service": service}},
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["context"],
            }
        },
        "root": {"level": level, "handlers": ["stderr"]},
    }


def setup_logging(log_format: str, level: str | int = "INFO", *, service: str = "") -> None:
    """Configure this process's logging (replaces the root logger's handlers)."""
    logging.config.dictConfig(logging_config(log_format, level, service=service))
