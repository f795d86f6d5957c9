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
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fhir_rest.results import fragment
from subgraphs.store import links
from subgraphs.store.access import AccessPolicy
from subgraphs.store.errors import FhirError
from subgraphs.store.repository import ResourceRepository
from subgraphs.store.search import parse_search

from .backends import Backends
from .context import RequestContext
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


async def linked_summary_entries(
    backends: Backends,
    ctx: RequestContext,
    others: list[tuple[str, str]],
    encounters: int,
    btg: Session | None,
) -> list[dict[str, Any]]:
    """Summary entries from ``others`` (see :func:`linked_records`) that may be shared (module doc)."""
    assert ctx.principal is not None
    purpose = ctx.principal.purpose_of_use if ctx.principal.purpose_of_use not in (None, "BTG") else TREATMENT
    now = datetime.now(UTC)
    out: list[dict[str, Any]] = []
    for facility, their_id in others:
        audit = AccessAudit(
            interaction="operation",
            facility=facility,
            principal=ctx.principal,
            resource_type="Patient",
            resource_id=their_id,
            request_id=ctx.request_id,
            status=200,
            detail=f"linked summary for facility {ctx.facility} under {'break-the-glass' if btg else 'consent'}",
        )
        shared = []
        async with backends.repository(facility, write=False, policy=ctx.policy) as repo:
            consents = [] if btg else await _consents(repo, their_id)
            if btg is None and not consents:
                continue
            try:
                parts = await summary_parts(repo, their_id, encounters)
            except FhirError:
                continue  # gone or not visible: nothing to share, nothing to say
            for part in parts:
                if btg is not None or permits(consents, ctx.facility, str(purpose), labels_of(part.json()), now):
                    shared.append(part)
            audit.touched.extend((p.type, p.id) for p in shared)
        if not shared:
            continue
        await backends.record_access(audit)
        for part in shared:
            out.append(
                {
                    "fullUrl": f"urn:unihealth:{facility}:{part.type}/{part.id}",
                    "extension": [{"url": SOURCE_FACILITY, "valueString": facility}],
                    "resource": fragment(part),
                }
            )
    return out
