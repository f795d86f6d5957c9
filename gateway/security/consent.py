"""R5 Consent evaluation for sharing a patient's records with another facility.

Contract: :func:`permits` answers whether the data owner's Consents let ``requester`` (a facility
id) see one resource (given its security labels) for ``purpose`` at ``now``:

* only Consents with status ``active`` whose ``period`` covers ``now`` count;
* ``grantee`` (if present) must name the requester; a Consent without grantees is network-wide;
* the base ``decision`` (``permit``/``deny``; absent means deny) holds unless a provision that
  applies is an exception to it; a nested provision is an exception to its parent (R5 semantics,
  no ``provision.type``); a provision applies when its ``period`` covers now, its ``actor``s (if
  any) include the requester, its ``purpose``s (if any) include ``purpose``, and its
  ``securityLabel``s (if any) intersect the resource's labels;
* any applicable Consent that ends in deny wins over any that permits; no applicable Consent
  means no sharing.

Facilities are named by an Identifier with :data:`FACILITY_SYSTEM` (in a Reference's
``identifier``) or by a Reference ``Organization/<facility id>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from subgraphs.store.dates import date_range

FACILITY_SYSTEM = "https://unihealth.dev/fhir/sid/facility"
TREATMENT = "TREAT"


def _covers(period: Any, now: datetime) -> bool:
    if not isinstance(period, dict):
        return True
    start = date_range(period["start"]) if isinstance(period.get("start"), str) else None
    end = date_range(period["end"]) if isinstance(period.get("end"), str) else None
    return (start is None or start[0] <= now) and (end is None or now <= end[1])


def _names_facility(reference: Any, facility: str) -> bool:
    if not isinstance(reference, dict):
        return False
    ident = reference.get("identifier")
    if isinstance(ident, dict) and ident.get("system") == FACILITY_SYSTEM and ident.get("value") == facility:
        return True
    return reference.get("reference") == f"Organization/{facility}"


def _codes(items: Any) -> set[str]:
    out = set()
    for item in items or []:
        if isinstance(item, dict):
            for coding in item.get("coding", [item]):
                if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                    out.add(coding["code"])
    return out


def _applies(provision: dict[str, Any], requester: str, purpose: str, labels: set[str], now: datetime) -> bool:
    if not _covers(provision.get("period"), now):
        return False
    actors = provision.get("actor") or []
    if actors and not any(_names_facility(a.get("reference"), requester) for a in actors if isinstance(a, dict)):
        return False
    purposes = _codes(provision.get("purpose"))
    if purposes and purpose not in purposes:
        return False
    wanted = _codes(provision.get("securityLabel"))
    return not wanted or bool(wanted & labels)


def _decide(provisions: Any, decision: bool, requester: str, purpose: str, labels: set[str], now: datetime) -> bool:
    for provision in provisions or []:
        if isinstance(provision, dict) and _applies(provision, requester, purpose, labels, now):
            return _decide(provision.get("provision"), not decision, requester, purpose, labels, now)
    return decision


def decision(consent: dict[str, Any], requester: str, purpose: str, labels: set[str], now: datetime) -> bool | None:
    """True (permit), False (deny) or None (this Consent does not apply)."""
    if consent.get("status") != "active" or not _covers(consent.get("period"), now):
        return None
    grantees = consent.get("grantee") or []
    if grantees and not any(_names_facility(g, requester) for g in grantees):
        return None
    base = consent.get("decision") == "permit"
    return _decide(consent.get("provision"), base, requester, purpose, labels, now)


def permits(consents: Iterable[dict[str, Any]], requester: str, purpose: str, labels: set[str], now: datetime) -> bool:
    verdicts = [d for d in (decision(c, requester, purpose, labels, now) for c in consents) if d is not None]
    return bool(verdicts) and all(verdicts)


def labels_of(resource: dict[str, Any]) -> set[str]:
    """The codes of ``meta.security``."""
    meta = resource.get("meta")
    return _codes(meta.get("security") if isinstance(meta, dict) else None)
