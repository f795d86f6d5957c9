"""Type-level search, Patient ``$everything`` and history, with facility-bound keyset paging.

Contract: results come only from ``repo``'s facility; ``next`` links carry an opaque cursor that is
signed for this facility and this exact query (see :mod:`subgraphs.store.cursor`). Ignored
parameters (and other warnings) are reported in an OperationOutcome entry (``search.mode =
outcome``). ``_include``/``_revinclude`` resources are entries with ``search.mode = include``;
``_summary``/``_elements`` reduce the matches (tagged SUBSETTED), never the included resources.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import orjson

from gateway.context import RequestContext
from gateway.linked import LINKED
from subgraphs.store import cursor, engine
from subgraphs.store.dates import date_range, instant
from subgraphs.store.errors import bad_request, gone, not_found
from subgraphs.store.repository import ResourceRepository, StoredResource, check_id, check_type
from subgraphs.store.search import SearchQuery, parse_search
from subgraphs.store.validation import SUPPORTED_TYPES

from ..results import Result, entry, fragment, information, searchset


async def search(
    ctx: RequestContext,
    repo: ResourceRepository,
    key: bytes,
    resource_type: str,
    pairs: list[tuple[str, str]],
    *,
    url: str,
    default_count: int,
    max_count: int,
    strict: bool = False,
    fixed: list[tuple[str, str]] | None = None,
) -> Result:
    """A searchset Bundle. ``fixed`` criteria (e.g. the patient of ``/Patient/x/observations``) are
    applied but not echoed in links, which point at ``url``."""
    check_type(resource_type)
    query = parse_search(
        resource_type,
        [*(fixed or []), *pairs],
        default_count=default_count,
        max_count=max_count,
        strict=strict,
        base=ctx.base,
        registry=await repo.search_registry(),  # the facility's custom SearchParameters included
    )
    after = cursor.decode(key, repo.facility, query.scope(), query.page) if query.page else None
    page = await repo.search(query, after=after)
    entries = [_match(ctx.base, r, query) for r in page.resources]
    if not query.summary_count:
        entries += [entry(ctx.base, r, mode="include") for r in getattr(page, "included", ())]
    notes = []
    if query.ignored:
        notes.append("ignored unknown or unsupported search parameters: " + ", ".join(query.ignored))
    notes += getattr(page, "warnings", ())
    if notes:
        entries.append(_outcome("; ".join(notes)))
    echo = [(k, v) for k, v in pairs if k != "_page"]
    links = [("self", _link(url, echo))]
    if page.next_position is not None:
        token = cursor.encode(key, repo.facility, query.scope(), page.next_position)
        links.append(("next", _link(url, [*echo, ("_page", token)])))
    return Result(200, searchset(entries, links, page.total))


def _match(base: str, stored: StoredResource, query: SearchQuery) -> dict[str, Any]:
    reduced = engine.subset(stored, query.summary, query.elements)
    if reduced is None:
        return entry(base, stored)
    return {
        "fullUrl": f"{base}/{stored.type}/{stored.id}",
        "resource": orjson.Fragment(reduced),
        "search": {"mode": "match"},
    }


def _outcome(diagnostics: str) -> dict[str, Any]:
    return {"resource": information(diagnostics, "not-supported", "warning"), "search": {"mode": "outcome"}}


def _count(raw: str, max_count: int) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= max_count:
        raise bad_request(f"_count must be an integer from 1 to {max_count}", expression=["_count"])
    return int(raw)


def _since(raw: str) -> datetime:
    rng = date_range(raw)
    if rng is None or "T" not in raw:
        raise bad_request("_since must be an instant like 2024-01-01T00:00:00Z", expression=["_since"])
    return rng[0]


LinkedPages = Callable[[list[Any] | None, int], Awaitable[tuple[list[dict[str, Any]], list[Any] | None]]]
"""``(position, room)`` → up to ``room`` linked entries from ``position`` (None: the start) and the
position after them when more follow (see :func:`gateway.linked.linked_everything_page`)."""


@dataclass(frozen=True, slots=True)
class EverythingQuery:
    """A parsed ``$everything`` request; ``position`` is the decoded cursor (facility-bound)."""

    patient_id: str
    count: int
    since: datetime | None
    types: list[str] | None
    scope: str
    position: list[Any] | None
    ignored: list[str]
    echo: list[tuple[str, str]]

    @property
    def in_linked(self) -> bool:
        """The cursor points into the linked records (the local compartment is done)."""
        return bool(self.position) and self.position[0] == LINKED  # type: ignore[index]


async def parse_everything(
    repo: ResourceRepository,
    key: bytes,
    patient_id: str,
    pairs: list[tuple[str, str]],
    default_count: int,
    max_count: int,
) -> EverythingQuery:
    """Parse the parameters and the cursor; 404/410 like a read of the Patient, 400 for a cursor
    of another facility, patient, ``_since`` or ``_type``."""
    check_id(patient_id)
    patient = await repo.read("Patient", patient_id)
    if patient is None:
        raise not_found("Patient", patient_id)
    if patient.deleted:
        raise gone("Patient", patient_id, patient.version)
    count, since, types, page_token, ignored = default_count, None, None, None, []
    for name, raw in pairs:
        if name == "_count":
            count = _count(raw, max_count)
        elif name == "_since":
            since = _since(raw)
        elif name == "_type":
            wanted = [t.strip() for t in raw.split(",") if t.strip()]
            unknown = [t for t in wanted if t not in SUPPORTED_TYPES]
            if unknown or not wanted:
                raise bad_request(f"_type names unsupported types: {', '.join(unknown)[:200]}", expression=["_type"])
            types = sorted(set(wanted))
        elif name == "_page":
            page_token = raw
        elif name not in ("_format", "_pretty"):
            ignored.append(name)
    since_key = since.isoformat() if since else ""
    scope = f"everything:{patient_id}?_since={since_key}&_type={','.join(types or [])}"
    position = cursor.decode(key, repo.facility, scope, page_token) if page_token else None
    if position is not None and position[:1] == [LINKED] and not _linked_position(position):
        raise bad_request("the paging cursor is not valid for this operation")
    echo = [(k, v) for k, v in pairs if k != "_page"]
    return EverythingQuery(patient_id, count, since, types, scope, position, ignored, echo)


def _linked_position(position: list[Any]) -> bool:
    after = position[3] if len(position) == 4 else "bad"
    return (
        isinstance(position[1], str)
        and isinstance(position[2], str)
        and (after is None or (isinstance(after, list) and len(after) == 2))
    )


async def everything_local(repo: ResourceRepository, q: EverythingQuery) -> engine.EverythingPage | None:
    """This facility's page of the compartment, or None when the cursor is past it."""
    if q.in_linked:
        return None
    return await engine.everything(repo, q.patient_id, types=q.types, since=q.since, count=q.count, after=q.position)


async def everything_result(
    ctx: RequestContext,
    key: bytes,
    q: EverythingQuery,
    local: engine.EverythingPage | None,
    url: str,
    linked: LinkedPages | None = None,
    security: list[dict[str, Any]] | None = None,
) -> Result:
    """The searchset page: the local entries, then — once the local compartment is done — the
    linked entries ``linked`` gives to fill the page; ``next`` cursors are signed for ``ctx``'s
    facility. The total is given only when everything fits on one page."""
    entries: list[dict[str, Any]] = []
    next_position: list[Any] | None = None
    total: int | None = None
    room = q.count
    if local is not None:
        entries = [entry(ctx.base, r) for r in local.resources]
        next_position, total, room = local.next_position, local.total, q.count - len(local.resources)
    if next_position is None and linked is not None:
        shared, next_position = await linked(q.position if q.in_linked else None, room)
        entries += shared
        total = total + len(shared) if total is not None and next_position is None else None
    if local is not None:
        entries += [entry(ctx.base, r, mode="include") for r in local.included]
    if q.ignored:
        entries.append(_outcome("ignored unsupported parameters: " + ", ".join(q.ignored)))
    links = [("self", _link(url, q.echo))]
    if next_position is not None:
        token = cursor.encode(key, ctx.facility, q.scope, next_position)
        links.append(("next", _link(url, [*q.echo, ("_page", token)])))
    bundle = searchset(entries, links, total)
    if security:
        bundle["meta"] = {"security": security}
    return Result(200, bundle)


async def everything(
    ctx: RequestContext,
    repo: ResourceRepository,
    key: bytes,
    patient_id: str,
    pairs: list[tuple[str, str]],
    url: str,
    default_count: int,
    max_count: int,
) -> Result:
    """``Patient/{id}/$everything`` of this facility only: the patient's compartment (R5
    CompartmentDefinition), in pages of ``_count`` (keyset by type and id), optionally only
    ``_type`` types changed ``_since``, plus the practitioners, organizations, medications... the
    page refers to (``search.mode = include``). 404/410 like a read of the Patient; types the
    caller may not search are left out. The edge route adds linked records (:mod:`gateway.linked`)."""
    q = await parse_everything(repo, key, patient_id, pairs, default_count, max_count)
    return await everything_result(ctx, key, q, await everything_local(repo, q), url)


def _link(url: str, pairs: list[tuple[str, str]]) -> str:
    return f"{url}?{urlencode(pairs)}" if pairs else url


async def history(
    ctx: RequestContext,
    repo: ResourceRepository,
    key: bytes,
    resource_type: str | None,
    resource_id: str | None,
    pairs: list[tuple[str, str]],
    *,
    url: str,
    default_count: int,
    max_count: int,
) -> Result:
    """A history Bundle, newest first; supports ``_count``, ``_since`` and paging."""
    if resource_type is not None:
        check_type(resource_type)
    if resource_id is not None:
        check_id(resource_id)
    params = dict(pairs)
    count = default_count
    if "_count" in params:
        raw = params["_count"]
        if not raw.isdigit() or not 1 <= int(raw) <= max_count:
            raise bad_request(f"_count must be an integer from 1 to {max_count}", expression=["_count"])
        count = int(raw)
    since: datetime | None = None
    if "_since" in params:
        rng = date_range(params["_since"])
        if rng is None or "T" not in params["_since"]:
            raise bad_request("_since must be an instant like 2024-01-01T00:00:00Z", expression=["_since"])
        since = rng[0]
    scope = f"history:{resource_type}/{resource_id}?{params.get('_since', '')}"
    before = None
    if "_page" in params:
        pos = cursor.decode(key, repo.facility, scope, params["_page"])
        try:
            before = (datetime.fromisoformat(pos[0]), str(pos[1]), str(pos[2]), int(pos[3]))
        except (ValueError, IndexError, TypeError):
            raise bad_request("the paging cursor is not valid for this history") from None
    rows = await repo.history(resource_type, resource_id, since=since, count=count + 1, before=before)
    if resource_id is not None and not rows and before is None and since is None:
        raise not_found(resource_type or "", resource_id)
    entries: list[dict[str, Any]] = []
    for item in rows[:count]:
        r = item.resource
        e: dict[str, Any] = {"fullUrl": f"{ctx.base}/{r.type}/{r.id}"}
        if not r.deleted:
            e["resource"] = fragment(r)
        e["request"] = {"method": item.method, "url": f"{r.type}/{r.id}" if item.method != "POST" else r.type}
        status = "204 No Content" if r.deleted else ("201 Created" if item.method == "POST" else "200 OK")
        e["response"] = {"status": status, "etag": r.etag, "lastModified": instant(r.last_updated)}
        entries.append(e)
    echo = [(k, v) for k, v in pairs if k != "_page"]
    links = [("self", _link(url, echo))]
    if len(rows) > count:
        last = rows[count - 1].resource
        token = cursor.encode(
            key, repo.facility, scope, [last.last_updated.isoformat(), last.type, last.id, last.version]
        )
        links.append(("next", _link(url, [*echo, ("_page", token)])))
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "link": [{"relation": r, "url": u} for r, u in links],
        "entry": entries,
    }
    return Result(200, bundle)
