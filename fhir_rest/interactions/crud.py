"""Instance interactions: read, vread, create (also conditional), update, delete.

Contract: each function works inside the caller's transaction (``repo``) and facility; an id that
is absent or belongs to another facility is 404 either way; a deleted resource reads as 410.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from gateway.context import RequestContext
from subgraphs.store.errors import FhirError, bad_request, gone, not_found
from subgraphs.store.repository import ResourceRepository, check_id, check_type
from subgraphs.store.search import parse_search

from ..results import Result, resource_result


def check_body(resource_type: str, body: Any, url_id: str | None = None) -> dict[str, Any]:
    """400 unless ``body`` is a JSON object of ``resource_type`` (and, for PUT, has the URL's id)."""
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object holding a FHIR resource", code="structure")
    body_type = body.get("resourceType")
    if body_type != resource_type:
        raise bad_request(
            f"resourceType '{body_type}' does not match the URL's type {resource_type}", expression=["resourceType"]
        )
    if url_id is not None:
        if "id" not in body:
            raise bad_request(
                "the resource must have an id equal to the URL's id",
                code="required",
                expression=[f"{resource_type}.id"],
            )
        if body["id"] != url_id:
            raise bad_request(
                f"the body's id '{body['id']}' does not match the URL's id '{url_id}'",
                expression=[f"{resource_type}.id"],
            )
    return body


async def read(repo: ResourceRepository, resource_type: str, resource_id: str) -> Result:
    check_type(resource_type)
    stored = await repo.read(resource_type, check_id(resource_id))
    if stored is None:
        raise not_found(resource_type, resource_id)
    if stored.deleted:
        raise gone(resource_type, resource_id, stored.version)
    return resource_result(stored)


async def vread(repo: ResourceRepository, resource_type: str, resource_id: str, version: str) -> Result:
    check_type(resource_type)
    check_id(resource_id)
    if not version.isdigit() or len(version) > 9:
        raise not_found(resource_type, f"{resource_id}/_history/{version[:20]}")
    stored = await repo.vread(resource_type, resource_id, int(version))
    if stored is None:
        raise not_found(resource_type, f"{resource_id}/_history/{version}")
    if stored.deleted:
        raise gone(resource_type, resource_id, stored.version)
    return resource_result(stored)


async def create(
    ctx: RequestContext, repo: ResourceRepository, resource_type: str, body: Any, *, if_none_exist: str | None = None
) -> Result:
    """201 with the new resource; with ``if_none_exist``: 200 on one match, 412 on several."""
    check_type(resource_type)
    body = check_body(resource_type, body)
    if if_none_exist is not None:
        matched = await conditional_match(repo, resource_type, if_none_exist)
        if len(matched) > 1:
            raise FhirError(
                412, "multiple-matches", f"If-None-Exist '{if_none_exist}' matches more than one {resource_type}"
            )
        if matched:
            existing = await repo.read(resource_type, matched[0])
            assert existing is not None
            return resource_result(existing, 200)
    stored = await repo.create(resource_type, body)
    return resource_result(stored, 201, f"{ctx.base}/{resource_type}/{stored.id}/_history/{stored.version}")


async def conditional_match(repo: ResourceRepository, resource_type: str, criteria: str) -> list[str]:
    """Ids matching a conditional query, under a lock so concurrent identical requests serialize."""
    criteria = criteria.split("?", 1)[1] if "?" in criteria else criteria
    try:
        pairs = parse_qsl(criteria, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise bad_request(f"'{criteria}' is not a valid search query", expression=["If-None-Exist"]) from None
    query = parse_search(resource_type, pairs, strict=True, registry=await repo.search_registry())
    if not query.criteria:
        raise bad_request("a conditional query needs at least one search criterion", expression=["If-None-Exist"])
    await repo.lock(f"cond:{query.scope()}")
    return await repo.find_ids(query, limit=2)


def parse_if_match(value: str | None) -> int | None:
    """``W/"3"`` or ``"3"`` → 3; None when absent; 400 when malformed."""
    if value is None:
        return None
    raw = value.strip()
    if raw.startswith("W/"):
        raw = raw[2:]
    if len(raw) >= 3 and raw[0] == raw[-1] == '"' and raw[1:-1].isdigit() and len(raw) < 12:
        return int(raw[1:-1])
    raise bad_request(f"If-Match '{value[:40]}' is not a version ETag like W/\"3\"", expression=["If-Match"])


async def update(
    ctx: RequestContext,
    repo: ResourceRepository,
    resource_type: str,
    resource_id: str,
    body: Any,
    *,
    if_match: int | None = None,
) -> Result:
    """200 (updated) or 201 (created with the client's id); 412 if ``if_match`` is stale."""
    check_type(resource_type)
    check_id(resource_id)
    body = check_body(resource_type, body, resource_id)
    stored, created = await repo.update(resource_type, resource_id, body, if_match=if_match)
    location = f"{ctx.base}/{resource_type}/{resource_id}/_history/{stored.version}"
    return resource_result(stored, 201 if created else 200, location if created else None)


async def delete(repo: ResourceRepository, resource_type: str, resource_id: str) -> Result:
    """204 whether or not there was something to delete (idempotent, and no existence oracle)."""
    check_type(resource_type)
    stored = await repo.delete(resource_type, check_id(resource_id))
    return Result(204, etag=stored.etag if stored else None)
