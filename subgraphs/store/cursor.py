"""Opaque, facility-bound paging cursors.

Contract: :func:`encode` signs ``(facility, scope, position)`` with HMAC-SHA256 under the server's
secret key; :func:`decode` returns the position only for the same facility and scope (the search or
history the cursor was made for) and raises 400 for anything altered, truncated or replayed by
another facility — never another facility's data, never a 500.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import orjson

from .errors import bad_request

_MAC_LEN = 16


def encode(key: bytes, facility: str, scope: str, position: list[Any]) -> str:
    body = orjson.dumps([facility, scope, position])
    mac = hmac.new(key, body, hashlib.sha256).digest()[:_MAC_LEN]
    return base64.urlsafe_b64encode(mac + body).rstrip(b"=").decode()


def decode(key: bytes, facility: str, scope: str, token: str) -> list[Any]:
    invalid = bad_request("the paging cursor is not valid for this search", code="invalid")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, TypeError):
        raise invalid from None
    mac, body = raw[:_MAC_LEN], raw[_MAC_LEN:]
    if len(mac) != _MAC_LEN or not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()[:_MAC_LEN]):
        raise invalid
    try:
        got_facility, got_scope, position = orjson.loads(body)
    except (orjson.JSONDecodeError, ValueError):
        raise invalid from None
    if got_facility != facility or got_scope != scope or not isinstance(position, list):
        raise invalid
    return position
