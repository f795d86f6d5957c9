"""The resource repository: every read and write of resources for one facility and one caller.

Contract:
* A :class:`ResourceRepository` is bound to one open transaction (owned by the caller: the
  request), one facility and one :class:`~subgraphs.store.access.AccessPolicy`. Every statement
  carries ``facility = :facility``; nothing returned belongs to another facility, and the same id
  in another facility is simply absent.
* The policy is enforced here, in SQL: an interaction without a grant is 403; rows outside the
  grant's groups (query-constrained scopes, the launch patient's compartment) are absent for reads
  and searches (404 / left out, never counted), and a write whose old or new content falls outside
  them is 403 and rolled back with the transaction.
* Writes validate the resource (R5 model), set ``id`` / ``meta.versionId`` / ``meta.lastUpdated``
  (never trusted from the body), keep everything else exactly as received, and in the same
  transaction append the history row, replace the search index rows and append one outbox row
  per change (see :mod:`subgraphs.store.writes`). The index is extracted with the facility's
  registry (:meth:`ResourceRepository.search_registry`: the official parameters plus the
  facility's active custom SearchParameters); SearchParameter writes are validated and serialized
  per facility first (:mod:`subgraphs.store.search_custom`).
* Reads return :class:`StoredResource` with the stored JSON bytes, served without re-serializing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from . import engine, links, search_custom, writes
from . import statements as sql
from .access import AccessPolicy
from .database import Database, SqlConnection
from .errors import FhirError, bad_request
from .links import PatientLinker
from .records import (
    Change,
    HistoryEntry,
    SearchPage,
    StoredResource,
    check_id,
    check_type,
    document,
    new_id,
)
from .registry import Registry
from .search import SearchQuery, query_params, query_shape

__all__ = [
    "Change",
    "HistoryEntry",
    "ResourceRepository",
    "SearchPage",
    "StoredResource",
    "check_id",
    "check_type",
    "document",
    "new_id",
]

_FULL = AccessPolicy.unrestricted("repository default")


class ResourceRepository:
    def __init__(
        self,
        db: Database,
        conn: SqlConnection,
        facility: str,
        policy: AccessPolicy = _FULL,
        linker: PatientLinker | None = None,
    ) -> None:
        self.db = db
        self.conn = conn
        self.facility = facility
        self.policy = policy
        self.linker = linker
        self.touched: list[tuple[str, str]] = []
        """(type, id) of every resource this repository returned or wrote — for the access audit."""
        self.patients: set[str] = set()
        """Patients of the resources written here (from their outbox events)."""
        self._registry: Registry | None = None

    async def search_registry(self) -> Registry:
        """The search parameters of this facility: the official ones plus its active custom
        SearchParameters (:mod:`.search_custom`), read once per repository (transaction)."""
        if self._registry is None:
            self._registry = await search_custom.facility_registry(self.conn, self.facility)
        return self._registry

    # ------------------------------------------------------------------ policy helpers
    def _policy(self, resource_type: str, letter: str) -> tuple[sql.PolicyShapes, dict[str, Any]]:
        """Shapes and bound values of the caller's grant (403 without one)."""
        queries = self.policy.queries(resource_type, letter)
        if queries is None:
            return None, {}
        params: dict[str, Any] = {}
        for k, q in enumerate(queries):
            params.update(query_params(q, self.facility, sql.policy_prefix(k)))
        return tuple(query_shape(q) for q in queries), params

    async def _visible(self, resource_type: str, ids: Sequence[str], letter: str) -> set[str]:
        """Which of ``ids`` (current, not deleted) the grant for ``letter`` covers."""
        shapes, params = self._policy(resource_type, letter)
        if not ids:
            return set()
        params.update(facility=self.facility, type=resource_type, ids=list(ids))
        return set((await self.conn.execute(sql.visible(shapes), params)).scalars())

    # ------------------------------------------------------------------ reads
    async def read(self, resource_type: str, resource_id: str) -> StoredResource | None:
        """The current version (a tombstone if deleted), or None if absent here or not visible."""
        shapes, _ = self._policy(resource_type, "r")
        params = {"facility": self.facility, "type": resource_type, "id": resource_id}
        row = (await self.conn.execute(sql.read(), params)).first()
        if row is None:
            return None
        if shapes is not None and resource_id not in await self._visible(resource_type, [resource_id], "r"):
            return None
        self.touched.append((resource_type, resource_id))
        return StoredResource.from_row(row)

    async def read_many(self, resource_type: str, ids: Sequence[str]) -> list[StoredResource]:
        """Current, not deleted, visible versions of ``ids`` (others are left out)."""
        if not ids:
            return []
        shapes, _ = self._policy(resource_type, "r")
        visible = set(ids) if shapes is None else await self._visible(resource_type, ids, "r")
        params = {"facility": self.facility, "type": resource_type, "ids": list(visible)}
        found = (
            [StoredResource.from_row(r) for r in await self.conn.execute(sql.read_many(), params)] if visible else []
        )
        self.touched.extend((r.type, r.id) for r in found)
        return found

    async def vread(self, resource_type: str, resource_id: str, version: int) -> StoredResource | None:
        if await self.read(resource_type, resource_id) is None:
            return None  # versions of a resource the caller cannot see do not exist for them
        params = {"facility": self.facility, "type": resource_type, "id": resource_id, "version": version}
        row = (await self.conn.execute(sql.vread(), params)).first()
        return StoredResource.from_row(row) if row else None

    async def history(
        self,
        resource_type: str | None,
        resource_id: str | None,
        *,
        since: datetime | None,
        count: int,
        before: tuple[datetime, str, str, int] | None,
    ) -> list[HistoryEntry]:
        """Versions newest first (by lastUpdated, then type, id, version), ``count`` of them.

        Instance history needs read access to the resource; type and system history need an
        unrestricted search grant on every type involved (history cannot be filtered by scopes)."""
        if resource_id is not None:
            assert resource_type is not None
            if await self.read(resource_type, resource_id) is None:
                return []
        elif not self.policy.everything:
            for t in [resource_type] if resource_type else _types_with_grants(self.policy):
                if self.policy.grant(t, "s").groups is not None:
                    raise FhirError(403, "forbidden", f"history of {t} needs unrestricted search access")
            if resource_type is None and not self.policy.grants:
                raise FhirError(403, "forbidden", "not permitted: history")
        params: dict[str, Any] = {"facility": self.facility, "limit": count}
        if resource_type is not None:
            params["type"] = resource_type
        if resource_id is not None:
            params["id"] = resource_id
        if since is not None:
            params["since"] = since
        if before is not None:
            params.update(b_time=before[0], b_type=before[1], b_id=before[2], b_version=before[3])
        stmt = sql.history(resource_type is not None, resource_id is not None, since is not None, before is not None)
        rows = list(await self.conn.execute(stmt, params))
        if resource_type is None and not self.policy.everything:
            rows = [r for r in rows if self.policy.allows(r.type, "s")]
        return [HistoryEntry(StoredResource.from_row(r), r.method) for r in rows]

    async def search(self, query: SearchQuery, *, after: list[Any] | None = None) -> SearchPage:
        """One page of matches of ``query`` (keyset paging; ``after`` is the last page's position),
        with its ``_include``/``_revinclude`` resources: an :class:`~.engine.SearchResult`."""
        return await engine.search(self, query, after=after)

    async def find_ids(self, query: SearchQuery, limit: int = 2) -> list[str]:
        """Ids of up to ``limit`` current, visible resources matching ``query`` (conditional operations)."""
        return await engine.find_ids(self, query, limit)

    async def latest_per_code(
        self,
        resource_type: str,
        patient_id: str,
        categories: Sequence[str],
        exclude_status: Sequence[str] = ("entered-in-error", "cancelled"),
    ) -> list[StoredResource]:
        """The newest (by ``date``) visible resource of each code in the patient's compartment and categories."""
        policy, params = self._policy(resource_type, "s")
        params.update(
            facility=self.facility,
            type=resource_type,
            patient=patient_id,
            categories=list(categories),
            bad_status=list(exclude_status),
        )
        found = [StoredResource.from_row(r) for r in await self.conn.execute(sql.latest_per_code(policy), params)]
        self.touched.extend((r.type, r.id) for r in found)
        return found

    # ------------------------------------------------------------------ writes
    async def lock(self, key: str) -> None:
        await self.db.lock(self.conn, f"{self.facility}|{key}")

    async def create(self, resource_type: str, body: dict[str, Any], resource_id: str | None = None) -> StoredResource:
        """A new resource with a server-assigned id (``resource_id``: one the server assigned earlier)."""
        stored, _ = (await self.save_many([Change(resource_type, resource_id or new_id(), body)]))[0]
        return stored

    async def update(
        self, resource_type: str, resource_id: str, body: dict[str, Any], *, if_match: int | None = None
    ) -> tuple[StoredResource, bool]:
        """Update, or create with the client's id; returns (stored, created)."""
        return (await self.save_many([Change(resource_type, resource_id, body, if_match)]))[0]

    async def delete(self, resource_type: str, resource_id: str) -> StoredResource | None:
        """Delete the current version; None if there is nothing to delete (absent or already deleted)."""
        self.policy.grant(resource_type, "d")
        current = await self.read(resource_type, resource_id)
        if current is None or current.deleted:
            return None
        return (await self.save_many([Change(resource_type, resource_id, None)]))[0][0]

    async def save_many(
        self, changes: Sequence[Change], *, validated: bool = False
    ) -> list[tuple[StoredResource, bool]]:
        """Apply ``changes`` in this transaction with batched statements; returns (stored, created) each.

        Raises 403 when the policy does not cover a change (before or after), 412 when an
        ``if_match`` does not match, 400 when a body is not valid R5.

        ``validated=True`` skips the R5 model validation (the most expensive step of a write): the
        caller vouches that every body is a valid R5 resource of its type because the server built
        it with code whose output a test validates (the audit sealer on its own outbox's records,
        :mod:`streams.sealer`). Never pass it for anything a client or a broker sent.
        """
        keys = [(c.type, c.id) for c in changes]
        if len(set(keys)) != len(keys):
            raise bad_request("a resource may be changed only once per transaction", code="business-rule")
        definitions = any(c.type == search_custom.KIND for c in changes)
        if definitions:
            await self.lock("SearchParameter definitions")
        for resource_type, resource_id in sorted(keys):
            await self.lock(f"{resource_type}/{resource_id}")
        current = await writes.current_versions(self.conn, self.facility, changes)
        letters = {key: _letter(change, current.get(key)) for key, change in zip(keys, changes, strict=True)}
        if not self.policy.everything:
            await self._check_before(changes, current, letters)
        gone = await writes.previous_patients(self.conn, self.facility, changes, current)
        if definitions:
            registry = await search_custom.apply_definitions(self.conn, self.facility, changes)
            self._registry = None  # the stamp moves with this write: read anew next time
        else:
            registry = await self.search_registry()
        plan = writes.plan(self.facility, changes, current, datetime.now(UTC), gone, registry, validated=validated)
        await writes.apply(self.conn, self.facility, plan, self.db.keyring)
        if plan.events and self.db.dialect == "postgresql":
            await writes.notify_outbox(self.conn)  # relays LISTENing elsewhere publish on commit
        if not self.policy.everything:
            await self._check_after(changes, letters)
        self.touched.extend(keys)
        self.patients.update(p for e in plan.events for p in (e["patient_id"], e["previous_patient_id"]) if p)
        if self.linker is not None:
            for change in changes:
                if change.type == "Patient":
                    await links.relink(self.conn, self.facility, change.id, self.linker.keys_of(change.body))
        return plan.stored

    # ------------------------------------------------------------------ audit
    async def patients_of(self, touched: Sequence[tuple[str, str]]) -> set[str]:
        """The compartment patients of ``touched`` resources (Patients are their own)."""
        patients = {rid for rtype, rid in touched if rtype == "Patient"}
        by_type: dict[str, list[str]] = {}
        for rtype, rid in touched:
            if rtype != "Patient":
                by_type.setdefault(rtype, []).append(rid)
        for rtype, ids in by_type.items():
            for chunk in writes.chunks(sorted(set(ids)), 500):
                params = {"facility": self.facility, "type": rtype, "ids": chunk}
                patients.update((await self.conn.execute(sql.patients_of(), params)).scalars())
        return patients

    async def append_audit(self, event_id: str, payload: bytes, patient: str | None, when: datetime) -> None:
        """One access record on the outbox, in this transaction (see :mod:`gateway.security.audit`)."""
        await writes.append_audit(self.conn, self.facility, event_id, payload, patient, when)

    async def _check_before(
        self, changes: Sequence[Change], current: writes.Versions, letters: dict[tuple[str, str], str]
    ) -> None:
        """Updates and deletes may touch only what the caller can see under that grant."""
        for change in changes:
            letter = letters[(change.type, change.id)]
            grant = self.policy.grant(change.type, letter)
            restricted = letter in ("u", "d") and grant.groups is not None
            if restricted and change.id not in await self._visible(change.type, [change.id], letter):
                raise FhirError(403, "forbidden", f"not permitted: {change.type}/{change.id} is outside your access")

    async def _check_after(self, changes: Sequence[Change], letters: dict[tuple[str, str], str]) -> None:
        """What is written must lie inside the grant that allowed writing it (rolled back otherwise)."""
        for change in changes:
            if change.body is None:
                continue
            letter = letters[(change.type, change.id)]
            if self.policy.grant(change.type, letter).groups is not None and change.id not in await self._visible(
                change.type, [change.id], letter
            ):
                raise FhirError(403, "forbidden", f"not permitted: this {change.type} would be outside your access")


def _letter(change: Change, prev: tuple[int, bool] | None) -> str:
    if change.body is None:
        return "d"
    return "c" if prev is None or prev[1] else "u"


def _types_with_grants(policy: AccessPolicy) -> list[str]:
    return sorted({t for t, letter in policy.grants if letter == "s"})
