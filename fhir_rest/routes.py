"""Starlette routes for ``/fhir/r5``: each one parses HTTP, opens the request's transaction and
calls one interaction. No FHIR logic lives here.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import summary_service
from gateway.context import RequestContext
from gateway.linked import glass, linked_everything_page, linked_records
from gateway.security import break_glass
from subgraphs.store import fhirjson
from subgraphs.store.errors import FhirError, bad_request
from subgraphs.store.repository import check_id

from . import http
from .auditing import audited
from .capability import capability_statement
from .interactions import bundle, crud
from .interactions.search import everything_local, everything_result, history, parse_everything, search
from .outcome import FHIR_JSON


def _pairs(request: Request) -> list[tuple[str, str]]:
    return list(request.query_params.multi_items())


async def metadata(request: Request) -> Response:
    http.check_accept(request)
    from gateway import __version__

    return Response(
        fhirjson.dumps(capability_statement(http.base_url(request), __version__)), 200, media_type=FHIR_JSON
    )


@audited({"GET": "search-type", "POST": "create"}, inline=frozenset({"POST"}))
async def type_root(request: Request) -> Response:
    ctx = http.context(request)
    resource_type = request.path_params["type"]
    b = http.backends(request)
    if request.method == "POST":
        body = await http.json_body(request)
        async with b.session(ctx, write=True) as repo:
            result = await crud.create(
                ctx, repo, resource_type, body, if_none_exist=request.headers.get("if-none-exist")
            )
        return http.render(result, http.prefer_return(request))
    return await _search(request, ctx, resource_type, _pairs(request))


@audited("search-type")
async def type_search(request: Request) -> Response:
    ctx = http.context(request)
    raw = await http.read_body(request, allow_form=True)
    try:
        form = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(raw))
    except (UnicodeDecodeError, ValueError):
        raise bad_request("the _search body must be application/x-www-form-urlencoded") from None
    return await _search(request, ctx, request.path_params["type"], [*_pairs(request), *form])


async def _search(
    request: Request,
    ctx: RequestContext,
    resource_type: str,
    pairs: list[tuple[str, str]],
    fixed: list[tuple[str, str]] | None = None,
    url: str | None = None,
) -> Response:
    b = http.backends(request)
    s = b.settings
    async with b.session(ctx, write=False) as repo:
        result = await search(
            ctx,
            repo,
            s.secret_key,
            resource_type,
            pairs,
            url=url or f"{ctx.base}/{resource_type}",
            default_count=s.default_page_size,
            max_count=s.max_page_size,
            strict=http.prefer_strict(request),
            fixed=fixed,
        )
    return http.render(result)


@audited({"GET": "read", "PUT": "update", "DELETE": "delete"}, inline=frozenset({"PUT", "DELETE"}))
async def instance(request: Request) -> Response:
    ctx = http.context(request)
    resource_type, resource_id = request.path_params["type"], request.path_params["id"]
    b = http.backends(request)
    if request.method == "GET":
        async with b.session(ctx, write=False) as repo:
            return http.render(await crud.read(repo, resource_type, resource_id))
    if request.method == "PUT":
        if_match = crud.parse_if_match(request.headers.get("if-match"))
        body = await http.json_body(request)
        async with b.session(ctx, write=True) as repo:
            result = await crud.update(ctx, repo, resource_type, resource_id, body, if_match=if_match)
        return http.render(result, http.prefer_return(request))
    async with b.session(ctx, write=True) as repo:
        return http.render(await crud.delete(repo, resource_type, resource_id))


@audited("vread")
async def vread(request: Request) -> Response:
    ctx = http.context(request)
    p = request.path_params
    async with http.backends(request).session(ctx, write=False) as repo:
        return http.render(await crud.vread(repo, p["type"], p["id"], p["vid"]))


@audited("history")
async def history_route(request: Request) -> Response:
    ctx = http.context(request)
    p = request.path_params
    b = http.backends(request)
    resource_type, resource_id = p.get("type"), p.get("id")
    request.state.audit.interaction = (
        "history-instance" if resource_id else "history-type" if resource_type else "history-system"
    )
    url = "/".join(x for x in (ctx.base, resource_type, resource_id, "_history") if x)
    async with b.session(ctx, write=False) as repo:
        result = await history(
            ctx,
            repo,
            b.settings.secret_key,
            resource_type,
            resource_id,
            _pairs(request),
            url=url,
            default_count=b.settings.default_page_size,
            max_count=b.settings.max_page_size,
        )
    return http.render(result)


@audited("transaction", inline=frozenset({"POST"}))
async def system(request: Request) -> Response:
    ctx = http.context(request)
    body = await http.json_body(request)
    if isinstance(body, dict) and body.get("type") == "batch":
        request.state.audit.interaction = "batch"
        request.state.audit.inline = False  # entries commit one by one; the record follows them
    result = await bundle.process(ctx, http.backends(request), body, http.prefer_return(request))
    return http.render(result)


@audited("operation")
async def patient_everything(request: Request) -> Response:
    """``GET /Patient/{id}/$everything``: the Patient compartment (``_since``, ``_type``, ``_count``,
    paging), then the linked records other facilities share by consent or break-the-glass."""
    ctx = http.context(request)
    patient_id = check_id(request.path_params["id"])
    assert ctx.principal is not None
    reason = break_glass.requested(ctx.principal, request.headers.get("x-break-glass-reason"))
    b = http.backends(request)
    s = b.settings
    async with b.session(ctx, write=reason is not None) as repo:
        q = await parse_everything(
            repo, s.secret_key, patient_id, _pairs(request), s.default_page_size, s.max_page_size
        )
        local = await everything_local(repo, q)
        others = await linked_records(repo, ctx, patient_id)
        btg = await glass(repo, ctx, b, patient_id, reason, others)

    async def linked(position: list[Any] | None, room: int) -> tuple[list[dict[str, Any]], list[Any] | None]:
        return await linked_everything_page(
            b, ctx, others, btg, position=position, room=room, types=q.types, since=q.since
        )

    url = f"{ctx.base}/Patient/{patient_id}/$everything"
    security = [break_glass.LABEL] if btg is not None else None
    result = await everything_result(ctx, s.secret_key, q, local, url, linked if others else None, security)
    return http.render(result)


def _encounters(request: Request) -> int:
    raw = request.query_params.get("encounters", "5")
    if not raw.isdigit() or not 1 <= int(raw) <= 50:
        raise bad_request("encounters must be an integer from 1 to 50", expression=["encounters"])
    return int(raw)


@audited("operation")
async def summary(request: Request) -> Response:
    ctx = http.context(request)
    patient_id = check_id(request.path_params["id"])
    encounters = _encounters(request)
    assert ctx.principal is not None
    reason = break_glass.requested(ctx.principal, request.headers.get("x-break-glass-reason"))
    return http.render(await summary_service.summary(http.backends(request), ctx, patient_id, encounters, reason))


@audited("search-type")
async def patient_list(request: Request) -> Response:
    """``/Patient/{id}/observations`` and ``/medication-requests``: a search fixed to the patient."""
    ctx = http.context(request)
    patient_id = check_id(request.path_params["id"])
    resource_type = "Observation" if request.url.path.endswith("/observations") else "MedicationRequest"
    pairs = _pairs(request)
    if any(k.split(":")[0] in ("patient", "subject") for k, _ in pairs):
        raise bad_request("the patient is given by the path; do not pass patient or subject", expression=["patient"])
    async with http.backends(request).session(ctx, write=False) as repo:
        await crud.read(repo, "Patient", patient_id)  # 404/410 like a read of the patient
    suffix = "observations" if resource_type == "Observation" else "medication-requests"
    return await _search(
        request,
        ctx,
        resource_type,
        pairs,
        fixed=[("patient", f"Patient/{patient_id}")],
        url=f"{ctx.base}/Patient/{patient_id}/{suffix}",
    )


async def method_not_allowed(request: Request) -> Response:
    raise FhirError(405, "not-supported", f"{request.method} is not supported on {request.url.path}")


def routes() -> list[Route]:
    return [
        Route("/metadata", metadata, methods=["GET"]),
        Route("/", system, methods=["POST"]),
        Route("/_history", history_route, methods=["GET"]),
        Route("/Patient/{id}/summary", summary, methods=["GET"]),
        Route("/Patient/{id}/$everything", patient_everything, methods=["GET"]),
        Route("/Patient/{id}/observations", patient_list, methods=["GET"]),
        Route("/Patient/{id}/medication-requests", patient_list, methods=["GET"]),
        Route("/{type}/_history", history_route, methods=["GET"]),
        Route("/{type}/_search", type_search, methods=["POST"]),
        Route("/{type}", type_root, methods=["GET", "POST"]),
        Route("/{type}/{id}/_history", history_route, methods=["GET"]),
        Route("/{type}/{id}/_history/{vid}", vread, methods=["GET"]),
        Route("/{type}/{id}", instance, methods=["GET", "PUT", "DELETE"]),
    ]
