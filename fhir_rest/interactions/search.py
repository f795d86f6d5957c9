"""Type-level search, Patient ``$everything`` and history, with facility-bound keyset paging.

Contract: results come only from ``repo``'s facility; ``next`` links carry an opaque cursor that is
signed for this facility and this exact query (see :mod:`subgraphs.store.cursor`). Ignored
parameters (and other warnings) are reported in an OperationOutcome entry (``search.mode =
outcome``). ``_include``/``_revinclude`` resources are entries with ``search.mode = include``;
``_summary``/``_elements`` reduce the matches (tagged SUBSETTED), never the included resources.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import orjson

from gateway.context import RequestContext
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
    """``Patient/{id}/$everything``: the patient's compartment (R5 CompartmentDefinition), in pages
    of ``_count`` (keyset by type and id), optionally only ``_type`` types changed ``_since``, plus
    the practitioners, organizations, medications... the page refers to (``search.mode =
    include``). 404/410 like a read of the Patient; types the caller may not search are left out."""
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
    after = cursor.decode(key, repo.facility, scope, page_token) if page_token else None
    page = await engine.everything(repo, patient_id, types=types, since=since, count=count, after=after)
    entries = [entry(ctx.base, r) for r in page.resources]
    entries += [entry(ctx.base, r, mode="include") for r in page.included]
    if ignored:
        entries.append(_outcome("ignored unsupported parameters: " + ", ".join(ignored)))
    echo = [(k, v) for k, v in pairs if k != "_page"]
    links = [("self", _link(url, echo))]
    if page.next_position is not None:
        token = cursor.encode(key, repo.facility, scope, page.next_position)
        links.append(("next", _link(url, [*echo, ("_page", token)])))
    return Result(200, searchset(entries, links, page.total))


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
