"""Batch and transaction Bundles (``POST /fhir/r5``).

Contract:
* transaction: every entry runs in ONE database transaction, in the R5 order (DELETE, POST, PUT,
  GET); any failure rolls everything back and the whole request fails with that entry's error.
  ``urn:uuid:`` fullUrls are rewritten to the assigned ``Type/id`` everywhere in the Bundle;
  conditional references (``Patient?identifier=...``) resolve to exactly one resource of the
  caller's facility, else the transaction fails.
* batch: each entry runs in its own transaction; failures become that entry's response.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import orjson

from gateway.backends import Backends
from gateway.context import RequestContext
from subgraphs.store.dates import instant
from subgraphs.store.errors import FhirError, bad_request
from subgraphs.store.repository import ResourceRepository, check_id, check_type, new_id

from ..results import Result
from . import crud
from .search import search

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    404: "Not Found",
    409: "Conflict",
    410: "Gone",
    412: "Precondition Failed",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
}

Prefer = str  # "minimal" | "representation" | "OperationOutcome"
_T = TypeVar("_T")


def _entries(bundle: Any, kind: str) -> list[dict[str, Any]]:
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise bad_request("Bundle.entry must be a list", expression=["Bundle.entry"])
    for i, e in enumerate(entries):
        req = e.get("request") if isinstance(e, dict) else None
        if not isinstance(req, dict) or req.get("method") not in _ORDER or not isinstance(req.get("url"), str):
            raise bad_request(
                f"a {kind} entry needs request.method and request.url", expression=[f"Bundle.entry[{i}].request"]
            )
    return entries


def _split_url(url: str) -> tuple[list[str], list[tuple[str, str]]]:
    parts = urlsplit(url)
    path = [p for p in parts.path.split("/") if p]
    if path[:2] == ["fhir", "r5"]:
        path = path[2:]
    return path, parse_qsl(parts.query, keep_blank_values=True)


def _status_line(code: int) -> str:
    return f"{code} {_REASONS.get(code, '')}".strip()


def _response(result: Result, prefer: Prefer) -> dict[str, Any]:
    out: dict[str, Any] = {"response": {"status": _status_line(result.status)}}
    resp = out["response"]
    if result.location:
        resp["location"] = result.location
    if result.etag:
        resp["etag"] = result.etag
    if result.last_modified:
        resp["lastModified"] = instant(result.last_modified)
    if result.body is not None and ((result.status == 200 and prefer != "minimal") or prefer == "representation"):
        out["resource"] = orjson.Fragment(result.body) if isinstance(result.body, bytes) else result.body
    return out


async def _run(
    ctx: RequestContext,
    repo: ResourceRepository,
    key: bytes,
    e: dict[str, Any],
    assigned: dict[int, str],
    index: int,
    limits: tuple[int, int],
) -> Result:
    req = e["request"]
    method, (path, query) = req["method"], _split_url(req["url"])
    if not path:
        raise bad_request("request.url must name a resource type", expression=[f"Bundle.entry[{index}].request.url"])
    resource_type = check_type(path[0])
    if method == "POST" and len(path) == 1:
        body = crud.check_body(resource_type, e.get("resource"))
        if req.get("ifNoneExist"):
            matched = await crud.conditional_match(repo, resource_type, req["ifNoneExist"])
            if len(matched) > 1:
                raise FhirError(412, "multiple-matches", f"ifNoneExist matches more than one {resource_type}")
            if matched:
                return await crud.read(repo, resource_type, matched[0])
        stored = await repo.create(resource_type, body, assigned.get(index))
        return Result(
            201,
            stored.content,
            stored.etag,
            stored.last_updated,
            f"{resource_type}/{stored.id}/_history/{stored.version}",
        )
    if method == "PUT" and len(path) == 2:
        if_match = crud.parse_if_match(req.get("ifMatch"))
        return await crud.update(ctx, repo, resource_type, path[1], e.get("resource"), if_match=if_match)
    if method == "PUT" and len(path) == 1 and query:
        matched = await crud.conditional_match(repo, resource_type, req["url"])
        if len(matched) > 1:
            raise FhirError(412, "multiple-matches", f"conditional update matches more than one {resource_type}")
        body = crud.check_body(resource_type, e.get("resource"))
        target = matched[0] if matched else str(body.get("id") or new_id())
        body.setdefault("id", target)
        return await crud.update(ctx, repo, resource_type, target, body)
    if method == "DELETE" and len(path) == 2:
        return await crud.delete(repo, resource_type, path[1])
    if method in ("GET", "HEAD"):
        if len(path) == 1:
            return await search(
                ctx,
                repo,
                key,
                resource_type,
                query,
                url=f"{ctx.base}/{resource_type}",
                default_count=limits[0],
                max_count=limits[1],
            )
        if len(path) == 2:
            return await crud.read(repo, resource_type, path[1])
        if len(path) == 4 and path[2] == "_history":
            return await crud.vread(repo, resource_type, path[1], path[3])
    raise FhirError(
        400,
        "not-supported",
        f"{method} {req['url'][:100]} is not supported in a Bundle",
        expression=[f"Bundle.entry[{index}].request"],
    )


def _rewrite(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _rewrite(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, mapping) for v in value]
    if isinstance(value, str) and value in mapping:
        return mapping[value]
    return value


async def _resolve_conditional_refs(repo: ResourceRepository, value: Any) -> Any:
    """Replace ``{"reference": "Type?query"}`` by the one matching resource of this facility."""
    if isinstance(value, list):
        return [await _resolve_conditional_refs(repo, v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for k, v in value.items():
        if k == "reference" and isinstance(v, str) and "?" in v and "/" not in v.split("?", 1)[0]:
            ref_type = check_type(v.split("?", 1)[0])
            matched = await crud.conditional_match(repo, ref_type, v)
            if len(matched) != 1:
                raise FhirError(
                    412 if matched else 400,
                    "multiple-matches" if matched else "not-found",
                    f"conditional reference '{v[:120]}' matches {len(matched) or 'no'} resources",
                )
            out[k] = f"{ref_type}/{matched[0]}"
        else:
            out[k] = await _resolve_conditional_refs(repo, v)
    return out


async def process(ctx: RequestContext, backends: Backends, bundle: Any, prefer: Prefer) -> Result:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise bad_request("POST to the base needs a Bundle", expression=["resourceType"])
    kind = bundle.get("type")
    if kind not in ("batch", "transaction"):
        raise bad_request("Bundle.type must be batch or transaction", expression=["Bundle.type"])
    entries = _entries(bundle, kind)
    s = backends.settings
    limits = (s.default_page_size, s.max_page_size)
    key = s.secret_key
    results: list[dict[str, Any]] = []
    if kind == "batch":
        for i, e in enumerate(entries):
            try:
                async with backends.session(ctx, write=True) as repo:
                    result = await _run(ctx, repo, key, e, {}, i, limits)
                results.append(_response(result, prefer))
            except FhirError as exc:
                results.append({"response": {"status": _status_line(exc.status), "outcome": exc.outcome()}})
        return Result(200, {"resourceType": "Bundle", "type": "batch-response", "entry": results})
    assigned: dict[int, str] = {}
    mapping: dict[str, str] = {}
    for i, e in enumerate(entries):
        full_url = e.get("fullUrl")
        req = e["request"]
        path, _ = _split_url(req["url"])
        if req["method"] == "POST" and len(path) == 1:
            assigned[i] = new_id()
            if isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
                mapping[full_url] = f"{path[0]}/{assigned[i]}"
        elif req["method"] == "PUT" and len(path) == 2 and isinstance(full_url, str) and full_url.startswith("urn:"):
            mapping[full_url] = f"{path[0]}/{check_id(path[1])}"
    order = sorted(range(len(entries)), key=lambda i: _ORDER[entries[i]["request"]["method"]])
    by_index: dict[int, dict[str, Any]] = {}
    async with backends.session(ctx, write=True) as repo:
        existing: dict[int, str] = {}
        for i in order:  # conditional creates that match resolve first, so references point at the match
            e = entries[i]
            if i in assigned and e["request"].get("ifNoneExist"):
                path, _ = _split_url(e["request"]["url"])
                matched = await _guard(i, crud.conditional_match(repo, path[0], e["request"]["ifNoneExist"]))
                if len(matched) > 1:
                    raise FhirError(
                        412,
                        "multiple-matches",
                        f"Bundle.entry[{i}]: ifNoneExist matches several",
                        expression=[f"Bundle.entry[{i}].request.ifNoneExist"],
                    )
                if matched:
                    existing[i] = matched[0]
                    full_url = e.get("fullUrl")
                    if isinstance(full_url, str) and full_url in mapping:
                        mapping[full_url] = f"{path[0]}/{matched[0]}"
        for i in order:
            e = entries[i]
            if i in existing:
                path, _ = _split_url(e["request"]["url"])
                result = await _guard(i, crud.read(repo, path[0], existing[i]))
            else:
                if "resource" in e:
                    resource = await _guard(i, _resolve_conditional_refs(repo, _rewrite(e["resource"], mapping)))
                    e = {**e, "resource": resource, "request": {**e["request"], "ifNoneExist": None}}
                result = await _guard(i, _run(ctx, repo, key, e, assigned, i, limits))
            by_index[i] = _response(result, prefer)
    results = [by_index[i] for i in range(len(entries))]
    return Result(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": results})


async def _guard(index: int, work: Awaitable[_T]) -> _T:
    """Run one entry's work; a failure names the entry (and fails the whole transaction)."""
    try:
        return await work
    except FhirError as exc:
        exc.diagnostics = f"Bundle.entry[{index}]: {exc.diagnostics}"
        exc.expression = exc.expression or [f"Bundle.entry[{index}]"]
        raise
