"""The response cache of ``/graphql``: single-patient answers kept in the edge's ``Backends.cache``.

Contract of :class:`GraphQLCache` (a :class:`~gateway.federation.gateway.ResponseCache`):

* What is cached: operations with exactly one root field, ``Query.patient(id:)`` with a FHIR id
  (``__typename`` beside it is fine), whose selection reaches — besides values (names, codes,
  quantities) — only resources of that patient's compartment selected directly on the Patient
  (:func:`cacheable`): exactly what a change event for that patient invalidates. Operations over
  several patients (a ward page) are never cached: their membership changes with writes to other
  patients, so no per-patient invalidation can be correct for them. Nor is any operation that
  selects ``Patient.linkedRecords`` (:data:`NEVER_CACHED`): other facilities' records and consents
  change without invalidating anything here, and a break-the-glass session ends by time.
* Who: a caller whose bearer token ``backends.verifier`` accepts and whose token names the
  ``X-Facility-Id`` facility. Anyone else (no token, bad token, facility not in the token) goes
  through unchanged and the subgraphs answer 401/403 as they do without a cache.
* Key: ``facility|graphql|<patient>|<access level>|<fingerprint>`` — the access level is
  :func:`gateway.security.policy.access_level` of the caller's policy (the same fingerprint the
  REST summary cache uses), the fingerprint the sha256 of query text, operation name and variables.
  Every change in the patient's compartment deletes ``facility|graphql|<patient>|``
  (:func:`streams.invalidation.graphql_prefix`); entries also expire after ``ttl`` seconds.
* Stored: 200 answers without ``errors`` or ``extensions``, as the JSON bytes of ``data`` (stored
  FHIR decimals keep their digits), only if the generation of the patient's prefix read at lookup
  — before any subgraph was asked — is still current (``streams.cache``, Races): an answer computed
  before a change and offered after its invalidation is dropped, not stored.
* Served (a hit): no subgraph is asked, so the edge writes the access record itself first — the same
  kind the subgraphs write (interaction ``graphql``, the principal, facility, patient, request id,
  client address, the operation text) through ``Backends.record_access``. If that record cannot be
  written, the request is not served from cache (it goes through, and the subgraphs audit it).
* Cache failures (Redis down or slow) never fail a request: they are logged and the request goes
  through uncached.

It is also the gateway's entity cache (:class:`~gateway.federation.executor.EntityCache`), which
makes operations over many patients (a ward page) cheap without caching their membership:

* What: the ``_entities`` answers of fetches on ``Patient`` whose selection reaches only that
  patient's compartment, by the same rules as above (:func:`entity_cacheable`) — e.g. each ward
  patient's ``latestVitals`` and ``medicationRequests``. Root fields (which patients are on the
  page) are never cached: the subgraph that owns them is always asked.
* Key: ``facility|graphql|<patient>|<access level>|e|<digest>``, the digest the sha256 of the
  subgraph, the printed selection, the values of the variables it uses and the representation; so
  the invalidation of the patient's prefix drops them with the patient's whole answers. Looked up
  once per plan level for all its representations (one ``MGET``), stored with the generation read
  at lookup, before the subgraph was asked (one pipelined round trip), only from answers without
  ``errors``; ``null`` entities are not stored.
* Served: before cached entities are returned, the edge writes one access record for the level —
  interaction ``graphql``, the caller, the operation text, request id, and every patient whose
  entities came from the cache. If it cannot be written, nothing is served from the cache.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from streams.invalidation import NOT_IN_PATIENT_VIEWS, graphql_prefix
from subgraphs.store import fhirjson
from subgraphs.store.errors import FhirError
from subgraphs.store.params import PARAM_BY_NAME, PATIENT_PARAM
from subgraphs.store.validation import SUPPORTED_TYPES

from .context import check_facility
from .federation.executor import CachedEntities, EntityBatch
from .federation.gateway import PreparedOperation
from .federation.operation import Field, Operation, Selection
from .federation.planner import Fetch, PlanFragment, PlanItem
from .federation.transport import Forwarded
from .identity_memo import IdentityMemo
from .security.audit import AccessAudit
from .security.policy import access_level, policy_for
from .security.tokens import Principal

if TYPE_CHECKING:
    from .backends import Backends

log = logging.getLogger("unihealth.federation")
AUDITED_QUERY_CHARS = 4000  # as the subgraphs keep it (subgraphs.graphql.context)
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_LEVELS = 10_000  # remembered (token -> access level) pairs
NEVER_CACHED = frozenset({"LinkedRecord"})  # types whose answers no change event here invalidates


def in_patient_view(resource_type: str) -> bool:
    """True for resource types whose changes name their patient (a ``patient`` search parameter,
    so the change event invalidates that patient's views) and that belong in those views."""
    return (
        resource_type != "Patient"
        and resource_type not in NOT_IN_PATIENT_VIEWS
        and PATIENT_PARAM in PARAM_BY_NAME.get(resource_type, {})
    )


def cacheable(operation: Operation) -> bool:
    """True if ``operation`` reads one patient's compartment and nothing else (module contract)."""
    roots = [s for s in operation.selections if not (isinstance(s, Field) and s.name == "__typename")]
    if len(roots) != 1 or not isinstance(roots[0], Field):
        return False
    root = roots[0]
    if root.name != "patient" or root.parent != operation.root_type or root.named != "Patient":
        return False
    return _only_compartment(root.selections or [])


def _only_compartment(selections: list[Selection]) -> bool:
    for selection in selections:
        if isinstance(selection, Field):
            named = selection.named
            if named in NEVER_CACHED:
                return False  # other facilities' data and consents: nothing here invalidates it
            if named in SUPPORTED_TYPES and (selection.parent != "Patient" or not in_patient_view(named)):
                return False  # another resource (Medication, another patient...): not invalidated with this one
            if not _only_compartment(selection.selections or []):
                return False
        elif not _only_compartment(selection.selections):
            return False
    return True


def entity_cacheable(fetch: Fetch) -> bool:
    """True if ``fetch`` is an ``_entities`` fetch on Patient whose selection reads only that
    patient's compartment (module contract)."""
    return fetch.type_name == "Patient" and _items_only_compartment(fetch.items, "Patient")


def _items_only_compartment(items: list[PlanItem], parent: str) -> bool:
    for item in items:
        if isinstance(item, PlanFragment):
            if not _items_only_compartment(item.children, item.type_condition):
                return False
            continue
        named = item.named
        if named in NEVER_CACHED:
            return False
        if named in SUPPORTED_TYPES and (parent != "Patient" or not in_patient_view(named)):
            return False
        if item.children is not None and not _items_only_compartment(item.children, named):
            return False
    return True


class GraphQLCache:
    """See the module contract. ``backends`` gives the cache, the token verifier and the audit writer."""

    def __init__(self, backends: Backends, ttl: float) -> None:
        if not ttl > 0:
            raise ValueError("the GraphQL cache needs a positive TTL")
        self.backends = backends
        self.ttl = ttl
        self._levels: OrderedDict[str, str] = OrderedDict()  # verified token -> access level
        self._cacheable = IdentityMemo(cacheable, 1000)  # plans are cached: few distinct operations
        self.hits = 0
        self.stores = 0
        self._entity_cacheable = IdentityMemo(entity_cacheable, 1000)  # fetches live in cached plans

    # ------------------------------------------------------------------ who and what
    def _caller(self, forwarded: Forwarded) -> tuple[str, Principal, str] | None:
        """(facility, principal, access level) of a verified caller of that facility; else None."""
        scheme, _, token = forwarded.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        try:
            principal = self.backends.verifier.verify(token)
            facility = check_facility(forwarded.headers.get("x-facility-id"))
            if facility not in principal.facilities:
                return None
            level = self._levels.get(token)
            if level is None:
                level = access_level(policy_for(principal))
                self._levels[token] = level
                while len(self._levels) > _LEVELS:
                    self._levels.popitem(last=False)
        except FhirError:
            return None  # the subgraphs refuse it with the right status
        return facility, principal, level

    def _key(self, prepared: PreparedOperation, forwarded: Forwarded) -> tuple[str, str, Principal] | None:
        """(key, patient prefix, principal), or None when this request is not cached."""
        if len(prepared.patients) != 1 or not _FHIR_ID.match(prepared.patients[0]):
            return None
        if not self._cacheable(prepared.plan.operation):
            return None
        caller = self._caller(forwarded)
        if caller is None:
            return None
        facility, principal, level = caller
        prefix = graphql_prefix(facility, prepared.patients[0])
        return f"{prefix}{level}|{prepared.fingerprint}", prefix, principal

    # ------------------------------------------------------------------ the hook
    async def lookup(self, operation: PreparedOperation, forwarded: Forwarded) -> dict[str, Any] | None:
        """The cached body (after recording the access), or None — then ``store`` may follow."""
        found = self._key(operation, forwarded)
        if found is None:
            return None
        key, prefix, principal = found
        cache = self.backends.cache
        try:
            value = await cache.get(key)
            if value is None:
                operation.state["graphql_cache"] = (key, prefix, await cache.generation(prefix))
                return None
        except Exception:
            log.warning("GraphQL cache unavailable; answering uncached", exc_info=True)
            return None
        try:
            await self.backends.record_access(self._audit(operation, forwarded, principal, prefix))
        except Exception:
            log.warning("could not record the access of a cached GraphQL answer; answering uncached", exc_info=True)
            return None
        self.hits += 1
        return {"data": orjson.Fragment(value)}

    async def store(self, operation: PreparedOperation, forwarded: Forwarded, body: dict[str, Any]) -> None:
        """Store ``body`` if lookup prepared this request and the patient's generation is unchanged."""
        prepared = operation.state.pop("graphql_cache", None)
        if prepared is None or set(body) != {"data"}:
            return
        key, prefix, generation = prepared
        try:
            stored = await self.backends.cache.set_if_current(
                key, fhirjson.dumps(body["data"]), self.ttl, prefix, generation
            )
        except Exception:
            log.warning("GraphQL cache unavailable; answer not stored", exc_info=True)
            return
        self.stores += stored

    # ------------------------------------------------------------------ the entity hook
    async def lookup_entities(
        self, batches: Sequence[EntityBatch], variables: Mapping[str, Any], forwarded: Forwarded, query: str
    ) -> CachedEntities | None:
        """Cached entities of the cacheable batches (after recording their access), with tickets
        for the misses; None when nothing here is cacheable or the cache failed."""
        cacheable = [self._entity_cacheable(b.fetch) for b in batches]
        if not any(cacheable):
            return None
        caller = self._caller(forwarded)
        if caller is None:
            return None
        facility, principal, level = caller
        keys: list[tuple[int, int, str, str, str]] = []  # (batch, representation, key, prefix, patient)
        for b, batch in enumerate(batches):
            if not cacheable[b]:
                continue
            fetch = batch.fetch
            used = {name: variables.get(name) for name in sorted(fetch.variables)}
            shape = fhirjson.dumps([fetch.subgraph, fetch.type_name, fetch.selection, used])
            for n, representation in enumerate(batch.representations):
                patient = representation.get("id")
                if not isinstance(patient, str) or not _FHIR_ID.match(patient):
                    continue
                digest = hashlib.sha256(shape + fhirjson.dumps(representation)).hexdigest()
                prefix = graphql_prefix(facility, patient)
                keys.append((b, n, f"{prefix}{level}|e|{digest}", prefix, patient))
        if not keys:
            return None
        entities: list[list[dict[str, Any] | None]] = [[None] * len(b.representations) for b in batches]
        tickets: list[list[Any]] = [[None] * len(b.representations) for b in batches]
        cache = self.backends.cache
        try:
            values = await cache.get_many([k for _, _, k, _, _ in keys])
            misses = [(b, n, k, p) for (b, n, k, p, _), v in zip(keys, values, strict=True) if v is None]
            prefixes = sorted({p for _, _, _, p in misses})
            generations = dict(zip(prefixes, await cache.generations(prefixes), strict=True))
        except Exception:
            log.warning("GraphQL entity cache unavailable; asking the subgraphs", exc_info=True)
            return None
        served: set[str] = set()
        for (b, n, _, _, patient), value in zip(keys, values, strict=True):
            if value is not None:
                entities[b][n] = fhirjson.loads(value)
                served.add(patient)
        for b, n, key, prefix in misses:
            tickets[b][n] = (key, prefix, generations[prefix])
        if served:
            audit = AccessAudit(
                interaction="graphql",
                facility=facility,
                principal=principal,
                query=query[:AUDITED_QUERY_CHARS],
                client=forwarded.client,
                request_id=forwarded.headers.get("x-request-id", ""),
                status=200,
                patients=served,
            )
            try:
                await self.backends.record_access(audit)
            except Exception:
                log.warning("could not record the access of cached entities; asking the subgraphs", exc_info=True)
                return None
        return CachedEntities(entities, tickets)

    async def store_entities(self, offered: Sequence[tuple[Any, dict[str, Any]]], forwarded: Forwarded) -> None:
        """Store the answered entities under their tickets (if their generation is still current).
        Serializes before its first await: the executor goes on merging into those objects."""
        items = [(key, fhirjson.dumps(entity), prefix, generation) for (key, prefix, generation), entity in offered]
        try:
            await self.backends.cache.set_many_if_current(items, self.ttl)
        except Exception:
            log.warning("GraphQL entity cache unavailable; entities not stored", exc_info=True)

    def _audit(
        self, operation: PreparedOperation, forwarded: Forwarded, principal: Principal, prefix: str
    ) -> AccessAudit:
        facility = prefix.partition("|")[0]
        return AccessAudit(
            interaction="graphql",
            facility=facility,
            principal=principal,
            query=operation.query[:AUDITED_QUERY_CHARS],
            client=forwarded.client,
            request_id=forwarded.headers.get("x-request-id", ""),
            status=200,
            patients={operation.patients[0]},
        )
