"""The request id: which request a log line belongs to, across the edge and the subgraphs.

Contract: :func:`accept` returns the incoming ``X-Request-Id`` when it is 1 to 64 characters of
``[A-Za-z0-9._-]``, else a new random id (32 hex digits); :data:`REQUEST_ID` holds the id of the
request the current task serves ("" outside a request) and :func:`current` reads it.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

HEADER = "x-request-id"
_VALID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
REQUEST_ID: ContextVar[str] = ContextVar("unihealth_request_id", default="")


def valid(value: str | None) -> bool:
    """True when ``value`` may be used as a request id as it is."""
    return value is not None and _VALID.match(value) is not None


def accept(value: str | None) -> str:
    """``value`` if :func:`valid`, else a new id."""
    return value if value is not None and valid(value) else uuid.uuid4().hex


def current() -> str:
    """The id of the request being served ("" outside one)."""
    return REQUEST_ID.get()
