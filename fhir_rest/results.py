"""What an interaction returns: a protocol-neutral result the REST layer (or a Bundle) renders.

Contract: ``body`` is either stored resource bytes (served as they are) or a JSON-ready value that
may embed stored bytes as :class:`orjson.Fragment` (never re-parsed). ``status`` is the HTTP status
the interaction means; for a Bundle entry it becomes ``entry.response.status``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from subgraphs.store.dates import instant
from subgraphs.store.repository import StoredResource


@dataclass(slots=True)
class Result:
    status: int
    body: bytes | dict[str, Any] | None = None
    etag: str | None = None
    last_modified: datetime | None = None
    location: str | None = None
    outcome: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def resource_result(stored: StoredResource, status: int = 200, location: str | None = None) -> Result:
    return Result(status, stored.content, stored.etag, stored.last_updated, location)


def fragment(stored: StoredResource) -> orjson.Fragment:
    assert stored.content is not None
    return orjson.Fragment(stored.content)


def entry(base: str, stored: StoredResource, mode: str | None = "match") -> dict[str, Any]:
    out: dict[str, Any] = {"fullUrl": f"{base}/{stored.type}/{stored.id}", "resource": fragment(stored)}
    if mode:
        out["search"] = {"mode": mode}
    return out


def searchset(entries: list[dict[str, Any]], links: list[tuple[str, str]], total: int | None) -> dict[str, Any]:
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "timestamp": instant(_now())}
    if total is not None:
        bundle["total"] = total
    bundle["link"] = [{"relation": rel, "url": url} for rel, url in links]
    bundle["entry"] = entries
    return bundle


def _now() -> datetime:
    from datetime import UTC

    return datetime.now(UTC)


def information(diagnostics: str, code: str = "informational", severity: str = "information") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }
