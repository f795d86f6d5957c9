"""The store's value types and id rules, shared by repository, interactions and tests.

Contract: :class:`StoredResource` carries the stored JSON bytes of one version (``None`` for a
delete); :func:`document` builds the stored form of a client body (the client's JSON, with the
server's ``id`` and ``meta.versionId``/``meta.lastUpdated``); :func:`check_id` and
:func:`check_type` raise the client-facing errors for malformed ids (400) and unknown types (404).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import fhirjson
from .crypto import reveal
from .dates import as_utc, instant
from .errors import FhirError, bad_request
from .validation import SUPPORTED_TYPES

ID_MAX = 64
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.")


@dataclass(frozen=True, slots=True)
class StoredResource:
    type: str
    id: str
    version: int
    last_updated: datetime
    deleted: bool
    content: bytes | None

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'

    @classmethod
    def from_row(cls, row: Any) -> StoredResource:
        content = None if row.content is None else reveal(row.type, row.id, row.content)
        return cls(row.type, row.id, row.version, as_utc(row.last_updated), bool(row.deleted), content)

    def json(self) -> dict[str, Any]:
        assert self.content is not None, "a deleted version has no content"
        value: dict[str, Any] = fhirjson.loads(self.content)
        return value


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    resource: StoredResource
    method: str


@dataclass(frozen=True, slots=True)
class Change:
    """One write to make in :meth:`ResourceRepository.save_many`."""

    type: str
    id: str
    body: dict[str, Any] | None  # None = delete
    if_match: int | None = None


@dataclass(frozen=True, slots=True)
class SearchPage:
    resources: list[StoredResource]
    next_position: list[Any] | None
    total: int | None


def check_id(resource_id: str) -> str:
    """400 unless ``resource_id`` is a FHIR id: ``[A-Za-z0-9\\-\\.]{1,64}``."""
    if not 0 < len(resource_id) <= ID_MAX or not _ID_CHARS.issuperset(resource_id):
        raise bad_request(f"'{resource_id[:80]}' is not a valid FHIR id", expression=["id"])
    return resource_id


def check_type(resource_type: str) -> str:
    """404 unless this server stores ``resource_type``."""
    if resource_type not in SUPPORTED_TYPES:
        raise FhirError(404, "not-supported", f"resource type '{resource_type[:80]}' is not supported")
    return resource_type


def new_id() -> str:
    return str(uuid.uuid4())


def document(
    body: dict[str, Any], resource_type: str, resource_id: str, version: int, when: datetime
) -> dict[str, Any]:
    """The stored form: the client's JSON with ``id`` and ``meta.versionId/lastUpdated`` set."""
    meta = {"versionId": str(version), "lastUpdated": instant(when)}
    client_meta = body.get("meta")
    if isinstance(client_meta, dict):
        meta.update({k: v for k, v in client_meta.items() if k not in ("versionId", "lastUpdated")})
    doc: dict[str, Any] = {"resourceType": resource_type, "id": resource_id, "meta": meta}
    doc.update({k: v for k, v in body.items() if k not in ("resourceType", "id", "meta")})
    return doc
