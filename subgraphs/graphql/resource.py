"""One stored FHIR resource as the GraphQL types read it, and plain accessors of FHIR JSON.

Contract: :class:`Resource` wraps a current, not deleted :class:`StoredResource`; its JSON is
parsed at most once (on the first typed field read), with decimals as :class:`decimal.Decimal`;
:meth:`Resource.raw` hands the stored bytes to the response unparsed (``orjson.Fragment``: the
subgraph view serializes responses with orjson, so ``resource`` is served byte for byte). The
accessors never raise on unexpected shapes: what is not there (or not of the expected JSON type)
is ``None`` or empty.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from subgraphs.store import fhirjson
from subgraphs.store.dates import instant
from subgraphs.store.records import StoredResource


class Resource:
    __slots__ = ("_data", "stored")

    def __init__(self, stored: StoredResource) -> None:
        assert stored.content is not None, "a deleted version has no fields"
        self.stored = stored
        self._data: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return self.stored.id

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            value = fhirjson.loads(self.stored.content or b"{}")
            self._data = value if isinstance(value, dict) else {}
        return self._data

    def raw(self) -> orjson.Fragment:
        """The stored JSON for the response, unparsed."""
        return orjson.Fragment(self.stored.content or b"null")

    def last_updated(self) -> str:
        return instant(self.stored.last_updated)

    def get(self, key: str) -> Any:
        return self.data.get(key)


def string(value: Any) -> str | None:
    """``value`` if it is a string, else None."""
    return value if isinstance(value, str) else None


def obj(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def objects(value: Any) -> list[dict[str, Any]]:
    """The JSON objects of a list (or the object itself): FHIR repeating elements."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return []


def strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def choice(data: dict[str, Any], stem: str) -> tuple[str, Any] | None:
    """The ``stem[x]`` element of ``data`` as (type suffix, value): ``effectiveDateTime`` →
    ``("DateTime", "2024-...")``."""
    for key, value in data.items():
        if key.startswith(stem) and key[len(stem) : len(stem) + 1].isupper():
            return key[len(stem) :], value
    return None


def moment(data: dict[str, Any], stem: str) -> str | None:
    """A ``stem[x]`` date-ish choice as one FHIR dateTime string: the dateTime/instant itself, a
    Period's start (else end); None for other types."""
    found = choice(data, stem)
    if found is None:
        return None
    kind, value = found
    if kind in ("DateTime", "Instant", "Date") and isinstance(value, str):
        return value
    if kind == "Period" and isinstance(value, dict):
        return string(value.get("start")) or string(value.get("end"))
    return None


def decimal_text(value: Any) -> str | None:
    """A JSON number's exact digits (``1.50`` stays ``"1.50"``); None for non-numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal | int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return None


def as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, Decimal | int | float):
        return None
    return float(value)
