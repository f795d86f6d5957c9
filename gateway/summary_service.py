"""The patient summary as served: the local summary (cached), linked records, break-the-glass.

Contract: :func:`summary` returns the summary Bundle of :mod:`gateway.summary` for the caller,
plus what other facilities share (:mod:`gateway.linked`), labelled ``BTG`` while a
break-the-glass session is open. The local part is cached per (facility, patient, encounter count,
caller access level, base URL) for ``settings.summary_ttl`` seconds under ``facility|summary|patient|...``,
which every change in the patient's compartment drops (:mod:`streams.invalidation`); linked
records are never cached (they depend on other facilities' data and consents). A cached summary
is still audited, with its patient, like a computed one. A summary computed while a change to the
patient was being invalidated is never stored: the generation of ``facility|summary|patient|`` is
read before the transaction opens and the store is conditional on it (``streams.cache``, Races).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import orjson

from fhir_rest.results import Result
from streams.invalidation import summary_prefix
from subgraphs.store import fhirjson
from subgraphs.store.dates import instant

from .backends import Backends
from .context import RequestContext
from .linked import glass, linked_records, linked_summary_entries
from .security import break_glass
from .security.policy import access_level
from .summary import patient_summary


def cache_key(ctx: RequestContext, patient_id: str, encounters: int) -> str:
    """``facility|summary|patient|encounters|access level|base``: the entries carry ``fullUrl``s
    built from the request's base URL (its Host unless UNIHEALTH_BASE_URL is set), so a summary
    cached for one base is never served under another."""
    base = hashlib.sha256(ctx.base.encode()).hexdigest()[:12]
    return f"{summary_prefix(ctx.facility, patient_id)}{encounters}|{access_level(ctx.policy)}|{base}"


async def summary(
    backends: Backends, ctx: RequestContext, patient_id: str, encounters: int, reason: str | None
) -> Result:
    assert ctx.principal is not None
    key = cache_key(ctx, patient_id, encounters)
    cached = await backends.cache.get(key) if reason is None else None
    prefix = summary_prefix(ctx.facility, patient_id)
    generation = await backends.cache.generation(prefix) if cached is None else ""  # before reading
    btg: break_glass.Session | None = None
    async with backends.session(ctx, write=reason is not None) as repo:
        if cached is None:
            bundle = await patient_summary(repo, ctx.base, patient_id, encounters)  # 404 before glass breaks
            entries: list[Any] = bundle["entry"]
            local = fhirjson.dumps(entries)
        else:
            repo.patients.add(patient_id)
            local = cached
            entries = []
        others = await linked_records(repo, ctx, patient_id)
        btg = await glass(repo, ctx, backends, patient_id, reason, others)
    if cached is None:
        await backends.cache.set_if_current(key, local, backends.settings.summary_ttl, prefix, generation)
    linked = await linked_summary_entries(backends, ctx, others, encounters, btg) if others else []
    out: dict[str, Any] = {"resourceType": "Bundle", "type": "collection", "timestamp": instant(datetime.now(UTC))}
    if btg is not None:
        out["meta"] = {"security": [break_glass.LABEL]}
    if linked:
        out["entry"] = [*(entries or orjson.loads(local)), *linked]
    else:
        out["entry"] = orjson.Fragment(local)
    return Result(200, out)
