"""Type-level search and history, with facility-bound keyset paging.

Contract: results come only from ``repo``'s facility; ``next`` links carry an opaque cursor that is
signed for this facility and this exact query (see :mod:`subgraphs.store.cursor`). Ignored
parameters are reported in an OperationOutcome entry (``search.mode = outcome``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from gateway.context import RequestContext
from subgraphs.store import cursor
from subgraphs.store.dates import date_range, instant
from subgraphs.store.errors import bad_request, not_found
from subgraphs.store.repository import ResourceRepository, check_id, check_type
from subgraphs.store.search import parse_search

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
        resource_type, [*(fixed or []), *pairs], default_count=default_count, max_count=max_count, strict=strict
    )
    after = cursor.decode(key, repo.facility, query.scope(), query.page) if query.page else None
    page = await repo.search(query, after=after)
    entries = [entry(ctx.base, r) for r in page.resources]
    if query.ignored:
        entries.append(
            {
                "resource": information(
                    "ignored unknown or unsupported search parameters: " + ", ".join(query.ignored),
                    "not-supported",
                    "warning",
                ),
                "search": {"mode": "outcome"},
            }
        )
    echo = [(k, v) for k, v in pairs if k != "_page"]
    links = [("self", _link(url, echo))]
    if page.next_position is not None:
        token = cursor.encode(key, repo.facility, query.scope(), page.next_position)
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
