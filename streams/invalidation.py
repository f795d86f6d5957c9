"""Cache invalidation: which cache entries a change makes stale, and dropping them.

Contract: :func:`affected` maps a :class:`~streams.events.ChangeEvent` to the entries it can make
stale, all inside the event's facility:

* the resource itself: ``facility|Type|id`` (:func:`resource_key`);
* when the resource is in a patient's compartment (or is the Patient) — or an update moved it out
  of one (``previous_patient_id``: then both patients) — that patient's summary
  ``facility|summary|patient`` (:func:`summary_key`) with its variants ``facility|summary|patient|...``
  (per encounter count and caller access level), and every GraphQL variant of it, the prefix
  ``facility|graphql|patient|`` (:func:`graphql_prefix`);
* every cached search of that type: the prefix ``facility|search|Type|`` (:func:`search_prefix`).

AuditEvents are in the patient compartment but in no patient view; the sealer stores one for every
access, so letting them reach the patient's views would make every summary read invalidate that
summary. Types in :data:`NOT_IN_PATIENT_VIEWS` therefore only drop their own resource and searches.

A search entry must therefore be cached under the type whose rows it returns, and a search whose
result depends on other types (chains, ``_include``, ``_revinclude``) must not be cached under one
type only. :func:`invalidate` deletes the entries; it is idempotent, so redelivered events are
harmless. :class:`CacheInvalidator` is the handler the in-process bus and the worker's agent call.
Deleting a prefix also ends its generation, so a reader that read the summary's or the GraphQL
variants' generation before the change cannot store what it computed (``streams.cache``, Races).
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache import Cache
from .events import ChangeEvent

NOT_IN_PATIENT_VIEWS = frozenset({"AuditEvent"})


def resource_key(facility: str, resource_type: str, resource_id: str) -> str:
    return f"{facility}|{resource_type}|{resource_id}"


def summary_key(facility: str, patient_id: str) -> str:
    return f"{facility}|summary|{patient_id}"


def summary_prefix(facility: str, patient_id: str) -> str:
    """Prefix of a patient's summary variants: ``facility|summary|patient|<variant>``."""
    return f"{summary_key(facility, patient_id)}|"


def graphql_prefix(facility: str, patient_id: str) -> str:
    """Prefix of the GraphQL variants of a patient's summary: ``facility|graphql|patient|<variant>``."""
    return f"{facility}|graphql|{patient_id}|"


def search_prefix(facility: str, resource_type: str) -> str:
    """Prefix of cached searches of a type: ``facility|search|Type|<query digest>``."""
    return f"{facility}|search|{resource_type}|"


@dataclass(frozen=True, slots=True)
class Affected:
    keys: tuple[str, ...]
    prefixes: tuple[str, ...]


def patient_of(event: ChangeEvent) -> str | None:
    """The patient whose compartment the changed resource is in (a Patient is its own)."""
    if event.patient_id is not None:
        return event.patient_id
    return event.resource_id if event.resource_type == "Patient" else None


def affected(event: ChangeEvent) -> Affected:
    """The cache entries ``event`` can make stale (see the module docstring)."""
    f = event.facility
    keys = [resource_key(f, event.resource_type, event.resource_id)]
    prefixes = [search_prefix(f, event.resource_type)]
    if event.resource_type not in NOT_IN_PATIENT_VIEWS:
        # the patient whose compartment holds it now, and the one an update moved it out of
        for patient in dict.fromkeys(p for p in (patient_of(event), event.previous_patient_id) if p is not None):
            keys.append(summary_key(f, patient))
            prefixes.append(summary_prefix(f, patient))  # its variants (encounters, access level)
            prefixes.append(graphql_prefix(f, patient))
    return Affected(tuple(keys), tuple(prefixes))


async def invalidate(cache: Cache, event: ChangeEvent) -> int:
    """Delete every entry ``event`` makes stale; returns how many live entries were removed."""
    target = affected(event)
    removed = await cache.delete(*target.keys)
    for prefix in target.prefixes:
        removed += await cache.delete_prefix(prefix)
    return removed


class CacheInvalidator:
    """Bus handler for change topics: ``await invalidator(event)`` runs :func:`invalidate`."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.events = 0
        self.removed = 0

    async def __call__(self, event: ChangeEvent) -> None:
        self.removed += await invalidate(self.cache, event)
        self.events += 1
