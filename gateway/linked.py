"""Linked records: the same person's data held by other facilities, shared by consent or
break-the-glass.

Contract: :func:`linked_summary_entries` finds the patient's records at other facilities through
the master patient index (the national identifier, see :mod:`subgraphs.store.links`), and for
each returns the summary resources that the data owner's active Consents permit the requesting
facility to see for the purpose of use (default treatment) — per resource, honouring its
security labels — or all of them while a break-the-glass session is open. Nothing is returned,
counted or hinted at for what is not shared. Each entry names its source facility in an
extension, and every facility whose data was shared gets its own access record in its own audit
chain. Callers with ``patient/`` scopes (a launch context of this facility) get no linked records.

:func:`linked_everything_page` does the same for ``Patient/{id}/$everything``: the compartments
of the linked records, source by source in (facility, patient id) order and within a source in
the compartment's (type, id) order, one page of shared entries at a time. Consent and an open
break-the-glass session are evaluated again on every page (a withdrawn consent stops the paging),
and the page looks one shared entry ahead, so a next page is offered only when something shared
follows: neither the presence of a next link nor a count reveals data that is not shared.
:func:`glass` opens or finds the caller's break-the-glass session (the summary and ``$everything``
use it). :func:`shared_with_patients` is the GraphQL side (``Patient.linkedRecords``): the summary's
resources of each linked record, for many patients at once, under the same rules — it only finds
an open break-the-glass session, never opens one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fhir_rest.results import fragment
from subgraphs.store import engine, links
from subgraphs.store.access import AccessPolicy
from subgraphs.store.errors import FhirError
from subgraphs.store.records import StoredResource
from subgraphs.store.repository import ResourceRepository
from subgraphs.store.search import parse_search

from .backends import Backends
from .context import RequestContext
from .security import break_glass
from .security.audit import AccessAudit
from .security.break_glass import Session
from .security.consent import TREATMENT, labels_of, permits
from .summary import summary_parts

SOURCE_FACILITY = "https://unihealth.dev/fhir/StructureDefinition/source-facility"
_READ_CONSENTS = AccessPolicy.unrestricted("consent evaluation")


async def _consents(repo: ResourceRepository, patient_id: str) -> list[dict[str, Any]]:
    internal = ResourceRepository(repo.db, repo.conn, repo.facility, _READ_CONSENTS)
    query = parse_search(
        "Consent", [("patient", f"Patient/{patient_id}"), ("status", "active")], default_count=1000, max_count=1000
    )
    return [r.json() for r in (await internal.search(query)).resources]


async def linked_records(repo: ResourceRepository, ctx: RequestContext, patient_id: str) -> list[tuple[str, str]]:
    """``(facility, patient id)`` of the person's records elsewhere, if this caller may have them."""
    if ctx.principal is None or any(g.groups is not None for g in ctx.policy.grants.values()):
        return []
    return [(f, p) for f, p in await links.linked_to(repo.conn, ctx.facility, patient_id) if f != ctx.facility]


def _purpose(ctx: RequestContext) -> str:
    assert ctx.principal is not None
    purpose = ctx.principal.purpose_of_use
    return str(purpose) if purpose not in (None, "BTG") else TREATMENT


def linked_entry(facility: str, stored: StoredResource, mode: str | None = None) -> dict[str, Any]:
    """A Bundle entry for ``stored`` from ``facility``, marked with its source facility."""
    out: dict[str, Any] = {
        "fullUrl": f"urn:unihealth:{facility}:{stored.type}/{stored.id}",
        "extension": [{"url": SOURCE_FACILITY, "valueString": facility}],
        "resource": fragment(stored),
    }
    if mode is not None:
        out["search"] = {"mode": mode}
    return out


async def glass(
    repo: ResourceRepository,
    ctx: RequestContext,
    backends: Backends,
    patient_id: str,
    reason: str | None,
    others: list[tuple[str, str]],
) -> Session | None:
    """The caller's break-the-glass session for the patient: engaged now when ``reason`` is given
    (403 for roles not allowed; ``repo`` must be writable), else the open one, looked up only
    when there is something linked to share."""
    assert ctx.principal is not None
    if reason is not None:
        s = backends.settings
        return await break_glass.engage(repo, ctx.principal, patient_id, reason, s.btg_minutes, s.btg_roles)
    return await break_glass.open_session(repo, ctx.principal, patient_id) if others else None


LINKED = "linked"  # first element of a $everything cursor position inside the linked records


def _start(others: list[tuple[str, str]], position: Sequence[Any] | None) -> tuple[int, list[str] | None]:
    """Where a linked position resumes: (index into ``others``, compartment position there)."""
    if not position:
        return 0, None
    facility, patient_id, after = str(position[1]), str(position[2]), position[3]
    for i, source in enumerate(others):
        if source == (facility, patient_id):
            return i, ([str(x) for x in after] if after else None)
        if source > (facility, patient_id):
            return i, None  # the source is no longer linked or shared: go on with the next one
    return len(others), None


async def linked_everything_page(
    backends: Backends,
    ctx: RequestContext,
    others: list[tuple[str, str]],
    btg: Session | None,
    *,
    position: Sequence[Any] | None,
    room: int,
    types: Sequence[str] | None,
    since: datetime | None,
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """Up to ``room`` shared compartment entries of the linked records (module doc), from
    ``position`` (a linked cursor position, or None for the start), and the position after the
    last of them when more shared entries follow (else None)."""
    assert ctx.principal is not None
    purpose, now = _purpose(ctx), datetime.now(UTC)
    index, after = _start(others, position)
    out: list[dict[str, Any]] = []
    last: list[Any] | None = list(position) if position else None  # position of the last entry returned
    next_position: list[Any] | None = None
    while index < len(others) and next_position is None:
        facility, their_id = others[index]
        shared: list[StoredResource] = []
        async with backends.repository(facility, write=False, policy=ctx.policy) as repo:
            consents = [] if btg else await _consents(repo, their_id)
            try:
                patient = await repo.read("Patient", their_id)
            except FhirError:
                patient = None  # not visible to this caller: nothing to share, nothing to say
            while (btg is not None or consents) and patient is not None and not patient.deleted:
                chunk = min(max(room + 1 - len(out) - len(shared), 20), 1000)
                page = await engine.everything(repo, their_id, types=types, since=since, count=chunk, after=after)
                for r in page.resources:
                    if btg is None and not permits(consents, ctx.facility, purpose, labels_of(r.json()), now):
                        continue
                    if len(out) + len(shared) == room:  # one more is shared: the page ends before it
                        next_position = last or [LINKED, facility, their_id, None]
                        break
                    shared.append(r)
                    last = [LINKED, facility, their_id, [r.type, r.id]]
                if next_position is not None or page.next_position is None:
                    break
                after = page.next_position
        if shared:
            await _record_sharing(backends, ctx, facility, their_id, shared, btg, "$everything")
            out += [linked_entry(facility, r, "match") for r in shared]
        index, after = index + 1, None
    return out, next_position


async def _record_sharing(
    backends: Backends,
    ctx: RequestContext,
    facility: str,
    their_id: str,
    shared: list[StoredResource],
    btg: Session | None,
    via: str,
) -> None:
    """The access record of this sharing, in the data owner's chain (its detail names ``via``:
    what asked)."""
    assert ctx.principal is not None
    audit = AccessAudit(
        interaction="operation",
        facility=facility,
        principal=ctx.principal,
        resource_type="Patient",
        resource_id=their_id,
        request_id=ctx.request_id,
        status=200,
        detail=f"linked {via} for facility {ctx.facility} under {'break-the-glass' if btg else 'consent'}",
    )
    audit.touched.extend((r.type, r.id) for r in shared)
    await backends.record_access(audit)


@dataclass(frozen=True, slots=True)
class Shared:
    """What one source facility shares of one linked record: its resources, as the caller may see
    them, and whether break-the-glass (rather than consent) applied."""

    facility: str
    patient_id: str
    resources: list[StoredResource]
    btg: bool


async def linked_summary_parts(
    backends: Backends,
    ctx: RequestContext,
    others: list[tuple[str, str]],
    encounters: int,
    btg: Session | None,
    *,
    via: str = "summary",
) -> list[Shared]:
    """The summary resources (:func:`gateway.summary.summary_parts`) of ``others`` (see
    :func:`linked_records`) that may be shared (module doc), source by source; sources that share
    nothing are left out. Each source that shares gets one access record in its own chain (its
    detail names ``via``: what asked)."""
    assert ctx.principal is not None
    purpose, now = _purpose(ctx), datetime.now(UTC)
    out: list[Shared] = []
    for facility, their_id in others:
        shared: list[StoredResource] = []
        async with backends.repository(facility, write=False, policy=ctx.policy) as repo:
            consents = [] if btg else await _consents(repo, their_id)
            if btg is None and not consents:
                continue
            try:
                parts = await summary_parts(repo, their_id, encounters)
            except FhirError:
                continue  # gone or not visible: nothing to share, nothing to say
            for part in parts:
                if btg is not None or permits(consents, ctx.facility, purpose, labels_of(part.json()), now):
                    shared.append(part)
        if not shared:
            continue
        await _record_sharing(backends, ctx, facility, their_id, shared, btg, via)
        out.append(Shared(facility, their_id, shared, btg is not None))
    return out


async def linked_summary_entries(
    backends: Backends,
    ctx: RequestContext,
    others: list[tuple[str, str]],
    encounters: int,
    btg: Session | None,
) -> list[dict[str, Any]]:
    """Summary entries from ``others`` (see :func:`linked_records`) that may be shared (module doc)."""
    shared = await linked_summary_parts(backends, ctx, others, encounters, btg)
    return [linked_entry(s.facility, r) for s in shared for r in s.resources]


async def shared_with_patients(
    backends: Backends,
    ctx: RequestContext,
    repo: ResourceRepository,
    patient_ids: Sequence[str],
    encounters: int,
    *,
    via: str,
) -> list[list[Shared]]:
    """For each of ``patient_ids`` (patients of ``ctx.facility`` the caller may read; ``repo`` is
    the caller's transaction there, read-only is enough) what the linked records share with the
    caller now: by consent, or everything while the caller's break-the-glass session for that
    patient is open — a session is only looked up here, never opened (starting one stays an
    explicit act: ``X-Break-Glass-Reason`` on REST). ``patient/``-scoped callers get nothing.
    The master patient index has no batched lookup (:mod:`subgraphs.store.links`), so this asks it
    once per patient; sources are read one after another (one extra transaction at a time)."""
    out: list[list[Shared]] = []
    for patient_id in patient_ids:
        others = await linked_records(repo, ctx, patient_id)
        btg = await glass(repo, ctx, backends, patient_id, None, others)
        out.append(await linked_summary_parts(backends, ctx, others, encounters, btg, via=via) if others else [])
    return out
