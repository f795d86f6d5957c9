"""Checks of GraphQL field arguments; failures are 400 (``BAD_USER_INPUT``) naming the argument.

Contract: each check returns the value to use or raises
:func:`~subgraphs.store.errors.bad_request`; nothing unchecked reaches a query.
"""

from __future__ import annotations

from subgraphs.store.dates import date_range
from subgraphs.store.errors import bad_request


def count(value: int, name: str, *, low: int = 1, high: int = 1000) -> int:
    """``value`` if ``low <= value <= high``."""
    if not low <= value <= high:
        raise bad_request(f"{name} must be an integer from {low} to {high}", expression=[name])
    return value


def date_time(value: str, name: str) -> str:
    """``value`` if it is a FHIR date, dateTime or instant (``2024``, ``2024-03-05T10:00:00Z``...)."""
    if date_range(value) is None:
        raise bad_request(f"{name} must be a FHIR date or dateTime, e.g. 2024-03-05T10:00:00Z", expression=[name])
    return value


def token(value: str, name: str) -> str:
    """A search token (``code``, ``system|code``; comma-separated alternatives)."""
    if not value or len(value) > 1000 or any(not part for part in value.split(",")):
        raise bad_request(f"{name} must be a code or system|code (comma-separated alternatives)", expression=[name])
    return value
