"""The resource repository: all SQL over resources, history, index and outbox for one facility.

Contract:
* A :class:`ResourceRepository` is bound to one open transaction (owned by the caller: the request)
  and one facility. Every statement it issues carries ``facility = :facility``; nothing it returns
  belongs to another facility, and the same id in another facility is simply "absent".
* Writes (:meth:`create`, :meth:`update`, :meth:`delete`, :meth:`save_many`) validate the resource
  (R5 model), set ``id`` / ``meta.versionId`` / ``meta.lastUpdated`` (never trusted from the body),
  keep everything else exactly as received, and in the same transaction append the history row,
  replace the search index rows and append one outbox row per change.
* Reads return :class:`StoredResource` with the stored JSON bytes, served without re-serializing.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import and_, bindparam, delete, exists, func, insert, literal, or_, select, tuple_, update
from sqlalchemy.sql.elements import BindParameter

from . import fhirjson
from .database import Database, SqlConnection
from .dates import as_utc, instant
from .errors import FhirError, bad_request, conflict_version
from .params import PATIENT_PARAM, extract
from .schema import INDEX_TABLES, idx_date, idx_reference, idx_token, outbox, resource_history, resources
from .search import SearchQuery, Shape, criteria_sql, query_params, query_shape
from .validation import SUPPORTED_TYPES, validate

ID_MAX = 64
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.")
_COLUMNS = (
    resources.c.type,
    resources.c.id,
    resources.c.version,
    resources.c.last_updated,
    resources.c.deleted,
    resources.c.content,
)


@dataclass(frozen=True, slots=True)
class StoredResource:
    type: str
    id: str
    version: int
    last_updated: datetime
    deleted: bool
    content: bytes | None

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'

    @classmethod
    def from_row(cls, row: Any) -> StoredResource:
        return cls(row.type, row.id, row.version, as_utc(row.last_updated), bool(row.deleted), row.content)

    def json(self) -> dict[str, Any]:
        assert self.content is not None, "a deleted version has no content"
        value: dict[str, Any] = fhirjson.loads(self.content)
        return value


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    resource: StoredResource
    method: str


@dataclass(frozen=True, slots=True)
class Change:
    """One write to make in :meth:`ResourceRepository.save_many`."""

    type: str
    id: str
    body: dict[str, Any] | None  # None = delete
    if_match: int | None = None


@dataclass(frozen=True, slots=True)
class SearchPage:
    resources: list[StoredResource]
    next_position: list[Any] | None
    total: int | None


def check_id(resource_id: str) -> str:
    """400 unless ``resource_id`` is a FHIR id: ``[A-Za-z0-9\\-\\.]{1,64}``."""
    if not 0 < len(resource_id) <= ID_MAX or not _ID_CHARS.issuperset(resource_id):
        raise bad_request(f"'{resource_id[:80]}' is not a valid FHIR id", expression=["id"])
    return resource_id


def check_type(resource_type: str) -> str:
    """404 unless this server stores ``resource_type``."""
    if resource_type not in SUPPORTED_TYPES:
        raise FhirError(404, "not-supported", f"resource type '{resource_type[:80]}' is not supported")
    return resource_type


def new_id() -> str:
    return str(uuid.uuid4())


def document(
    body: dict[str, Any], resource_type: str, resource_id: str, version: int, when: datetime
) -> dict[str, Any]:
    """The stored form: the client's JSON with ``id`` and ``meta.versionId/lastUpdated`` set."""
    meta = {"versionId": str(version), "lastUpdated": instant(when)}
    client_meta = body.get("meta")
    if isinstance(client_meta, dict):
        meta.update({k: v for k, v in client_meta.items() if k not in ("versionId", "lastUpdated")})
    doc: dict[str, Any] = {"resourceType": resource_type, "id": resource_id, "meta": meta}
    doc.update({k: v for k, v in body.items() if k not in ("resourceType", "id", "meta")})
    return doc


class ResourceRepository:
    def __init__(self, db: Database, conn: SqlConnection, facility: str) -> None:
        self.db = db
        self.conn = conn
        self.facility = facility

    # ---------------------------------------------------------------- reads
    def _key(self, resource_type: str, resource_id: str) -> Any:
        return and_(
            resources.c.facility == self.facility, resources.c.type == resource_type, resources.c.id == resource_id
        )

    async def read(self, resource_type: str, resource_id: str) -> StoredResource | None:
        """The current version (a tombstone if deleted), or None if it never existed here."""
        params = {"facility": self.facility, "type": resource_type, "id": resource_id}
        row = (await self.conn.execute(_read_statement(), params)).first()
        return StoredResource.from_row(row) if row else None

    async def read_many(self, resource_type: str, ids: Sequence[str]) -> list[StoredResource]:
        """Current, not deleted versions of ``ids`` (missing ones are left out)."""
        if not ids:
            return []
        stmt = select(*_COLUMNS).where(
            resources.c.facility == self.facility,
            resources.c.type == resource_type,
            resources.c.id.in_(list(ids)),
            resources.c.deleted.is_(False),
        )
        return [StoredResource.from_row(r) for r in await self.conn.execute(stmt)]

    async def vread(self, resource_type: str, resource_id: str, version: int) -> StoredResource | None:
        h = resource_history
        row = (
            await self.conn.execute(
                select(h.c.type, h.c.id, h.c.version, h.c.last_updated, h.c.deleted, h.c.content).where(
                    h.c.facility == self.facility,
                    h.c.type == resource_type,
                    h.c.id == resource_id,
                    h.c.version == version,
                )
            )
        ).first()
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
        """Versions newest first (by lastUpdated, then type, id, version), ``count`` of them."""
        h = resource_history
        stmt = select(h.c.type, h.c.id, h.c.version, h.c.last_updated, h.c.deleted, h.c.content, h.c.method).where(
            h.c.facility == self.facility
        )
        if resource_type is not None:
            stmt = stmt.where(h.c.type == resource_type)
        if resource_id is not None:
            stmt = stmt.where(h.c.id == resource_id)
        if since is not None:
            stmt = stmt.where(h.c.last_updated >= since)
        if before is not None:
            stmt = stmt.where(
                tuple_(h.c.last_updated, h.c.type, h.c.id, h.c.version)
                < tuple_(
                    literal(before[0], h.c.last_updated.type),
                    literal(before[1]),
                    literal(before[2]),
                    literal(before[3]),
                )
            )
        stmt = stmt.order_by(h.c.last_updated.desc(), h.c.type.desc(), h.c.id.desc(), h.c.version.desc())
        rows = await self.conn.execute(stmt.limit(count))
        return [HistoryEntry(StoredResource.from_row(r), r.method) for r in rows]

    async def search(self, query: SearchQuery, *, after: list[Any] | None = None) -> SearchPage:
        """One page of matches of ``query`` (keyset paging; ``after`` is the last page's position)."""
        shape = query_shape(query)
        params = query_params(query, self.facility)
        total = None
        if query.total:
            total = (await self.conn.execute(_count_statement(shape), params)).scalar_one()
        if query.summary_count or query.count == 0:
            return SearchPage([], None, total)
        sort = query.sort[0] if query.sort else ("_id", False)
        params["limit"] = query.count + 1
        if sort[0] not in ("_id", "_lastUpdated"):
            params["sort_param"] = sort[0]
        if after is not None:
            try:
                params["after_id"] = str(after[1])
                params["after_value"] = after[0] if sort[0] == "_id" else datetime.fromisoformat(after[0])
            except (ValueError, IndexError, TypeError):
                raise bad_request("the paging cursor is not valid for this search") from None
        rows = list(await self.conn.execute(_search_statement(shape, sort, after is not None), params))
        page = [StoredResource.from_row(r) for r in rows[: query.count]]
        position = None
        if len(rows) > query.count:
            last = rows[query.count - 1]
            position = [as_utc(last.sk).isoformat() if isinstance(last.sk, datetime) else last.sk, last.id]
        if total is None and after is None and position is None:
            total = len(page)  # the whole result is on this first page: the total is free
        return SearchPage(page, position, total)

    async def find_ids(self, query: SearchQuery, limit: int = 2) -> list[str]:
        """Ids of up to ``limit`` current resources matching ``query`` (conditional operations)."""
        params = {**query_params(query, self.facility), "limit": limit}
        return list((await self.conn.execute(_find_statement(query_shape(query)), params)).scalars())

    async def latest_per_code(
        self,
        resource_type: str,
        patient_id: str,
        categories: Sequence[str],
        exclude_status: Sequence[str] = ("entered-in-error", "cancelled"),
    ) -> list[StoredResource]:
        """The newest (by ``date``) resource of each code in the patient's compartment and categories."""
        params = {
            "facility": self.facility,
            "type": resource_type,
            "patient": patient_id,
            "categories": list(categories),
            "bad_status": list(exclude_status),
        }
        return [StoredResource.from_row(r) for r in await self.conn.execute(_latest_statement(), params)]

    # ---------------------------------------------------------------- writes
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
        current = await self.read(resource_type, resource_id)
        if current is None or current.deleted:
            return None
        return (await self.save_many([Change(resource_type, resource_id, None)]))[0][0]

    async def save_many(self, changes: Sequence[Change]) -> list[tuple[StoredResource, bool]]:
        """Apply ``changes`` in this transaction with batched statements; returns (stored, created) each.

        Raises 412 when an ``if_match`` does not match, 400 when a body is not valid R5.
        """
        keys = [(c.type, c.id) for c in changes]
        if len(set(keys)) != len(keys):
            raise bad_request("a resource may be changed only once per transaction", code="business-rule")
        for resource_type, resource_id in sorted(keys):
            await self.lock(f"{resource_type}/{resource_id}")
        current = await self._current_versions(changes)
        now = datetime.now(UTC)
        out: list[tuple[StoredResource, bool]] = []
        res_insert: list[dict[str, Any]] = []
        res_update: list[dict[str, Any]] = []
        hist: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        index_rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for change in changes:
            key = (change.type, change.id)
            prev = current.get(key)
            prev_version, prev_deleted = prev if prev else (0, True)
            if change.if_match is not None and (prev is None or prev_deleted or change.if_match != prev_version):
                raise conflict_version(f'W/"{change.if_match}"', prev_version)
            version = prev_version + 1
            current[key] = (version, change.body is None)
            if change.body is None:
                content = None
                patient = None
            else:
                doc = document(change.body, change.type, change.id, version, now)
                validate(change.type, doc)
                content = fhirjson.dumps(doc)
                patient = change.id if change.type == "Patient" else None
                for kind, row in extract(change.type, doc):
                    if kind == "reference" and row["param"] == PATIENT_PARAM and patient is None:
                        patient = row["target_id"]
                    index_rows[kind].append({"facility": self.facility, "type": change.type, "id": change.id, **row})
            row = {
                "facility": self.facility,
                "type": change.type,
                "id": change.id,
                "version": version,
                "last_updated": now,
                "deleted": change.body is None,
                "content": content,
            }
            (res_update if prev else res_insert).append(row)
            created = prev is None or prev_deleted
            method = "DELETE" if change.body is None else ("POST" if prev is None else "PUT")
            hist.append({**row, "method": method})
            events.append(
                {
                    "event_id": str(uuid.uuid4()),
                    "facility": self.facility,
                    "type": change.type,
                    "id": change.id,
                    "version": version,
                    "operation": "delete" if change.body is None else ("create" if created else "update"),
                    "patient_id": patient,
                    "occurred_at": now,
                }
            )
            out.append((StoredResource(change.type, change.id, version, now, change.body is None, content), created))
        await self._write_rows(res_insert, res_update, hist, events, index_rows)
        return out

    async def _current_versions(self, changes: Sequence[Change]) -> dict[tuple[str, str], tuple[int, bool]]:
        by_type: dict[str, list[str]] = defaultdict(list)
        for change in changes:
            by_type[change.type].append(change.id)
        found: dict[tuple[str, str], tuple[int, bool]] = {}
        for resource_type, ids in by_type.items():
            for chunk in _chunks(ids, 500):
                rows = await self.conn.execute(
                    select(resources.c.id, resources.c.version, resources.c.deleted).where(
                        resources.c.facility == self.facility,
                        resources.c.type == resource_type,
                        resources.c.id.in_(chunk),
                    )
                )
                found.update({(resource_type, r.id): (r.version, bool(r.deleted)) for r in rows})
        return found

    async def _write_rows(
        self,
        res_insert: list[dict[str, Any]],
        res_update: list[dict[str, Any]],
        hist: list[dict[str, Any]],
        events: list[dict[str, Any]],
        index_rows: dict[str, list[dict[str, Any]]],
    ) -> None:
        conn = self.conn
        if res_insert:
            await conn.execute(insert(resources), res_insert)
        if res_update:
            for r in res_update:
                await conn.execute(
                    update(resources)
                    .where(self._key(r["type"], r["id"]))
                    .values(
                        version=r["version"], last_updated=r["last_updated"], deleted=r["deleted"], content=r["content"]
                    )
                )
        await conn.execute(insert(resource_history), hist)
        if res_update:
            by_type: dict[str, list[str]] = defaultdict(list)
            for r in res_update:
                by_type[r["type"]].append(r["id"])
            for table in INDEX_TABLES.values():
                for resource_type, ids in by_type.items():
                    for chunk in _chunks(ids, 500):
                        await conn.execute(
                            delete(table).where(
                                table.c.facility == self.facility, table.c.type == resource_type, table.c.id.in_(chunk)
                            )
                        )
        for kind, rows in index_rows.items():
            await conn.execute(insert(INDEX_TABLES[kind]), rows)
        await conn.execute(insert(outbox), events)


@lru_cache(maxsize=1)
def _latest_statement() -> Any:
    """Newest row of each code (window over the date index) in one patient's compartment."""
    t, d = idx_token, idx_date
    in_patient = select(idx_reference.c.id).where(
        idx_reference.c.facility == bindparam("facility"),
        idx_reference.c.type == bindparam("type"),
        idx_reference.c.param == PATIENT_PARAM,
        idx_reference.c.target_type == "Patient",
        idx_reference.c.target_id == bindparam("patient"),
    )
    cat, st = t.alias("cat"), t.alias("st")
    in_category = exists().where(
        cat.c.facility == t.c.facility,
        cat.c.type == t.c.type,
        cat.c.id == t.c.id,
        cat.c.param == "category",
        cat.c.code.in_(bindparam("categories", expanding=True)),
    )
    bad_status = exists().where(
        st.c.facility == t.c.facility,
        st.c.type == t.c.type,
        st.c.id == t.c.id,
        st.c.param == "status",
        st.c.code.in_(bindparam("bad_status", expanding=True)),
    )
    ranked = (
        select(
            t.c.id,
            func.row_number()
            .over(partition_by=(t.c.system, t.c.code), order_by=(d.c.low.desc(), t.c.id.desc()))
            .label("rn"),
        )
        .join(d, and_(d.c.facility == t.c.facility, d.c.type == t.c.type, d.c.id == t.c.id, d.c.param == "date"))
        .where(
            t.c.facility == bindparam("facility"),
            t.c.type == bindparam("type"),
            t.c.param == "code",
            t.c.id.in_(in_patient),
            in_category,
            ~bad_status,
        )
        .subquery()
    )
    stmt = (
        select(*_COLUMNS)
        .where(
            resources.c.facility == bindparam("facility"),
            resources.c.type == bindparam("type"),
            resources.c.deleted.is_(False),
            resources.c.id.in_(select(ranked.c.id).where(ranked.c.rn == 1)),
        )
        .order_by(resources.c.id)
    )
    return stmt


@lru_cache(maxsize=1)
def _read_statement() -> Any:
    return select(*_COLUMNS).where(
        resources.c.facility == bindparam("facility"),
        resources.c.type == bindparam("type"),
        resources.c.id == bindparam("id"),
    )


def _matching(shape: Shape) -> list[Any]:
    return [
        resources.c.facility == bindparam("facility"),
        resources.c.type == bindparam("type"),
        resources.c.deleted.is_(False),
        *criteria_sql(shape),
    ]


@lru_cache(maxsize=1024)
def _count_statement(shape: Shape) -> Any:
    return select(func.count()).where(*_matching(shape))


@lru_cache(maxsize=1024)
def _find_statement(shape: Shape) -> Any:
    return select(resources.c.id).where(*_matching(shape)).limit(bindparam("limit"))


def _sort_key(name: str, descending: bool) -> Any:
    """``_id``, ``_lastUpdated``, or a date parameter (its lowest / highest indexed instant)."""
    if name == "_id":
        return resources.c.id
    if name == "_lastUpdated":
        return resources.c.last_updated
    far = datetime(1, 1, 1, tzinfo=UTC) if descending else datetime(9999, 12, 31, tzinfo=UTC)
    agg = func.max(idx_date.c.low) if descending else func.min(idx_date.c.low)
    sub = (
        select(agg)
        .where(
            idx_date.c.facility == resources.c.facility,
            idx_date.c.type == resources.c.type,
            idx_date.c.id == resources.c.id,
            idx_date.c.param == bindparam("sort_param"),
        )
        .scalar_subquery()
    )
    return func.coalesce(sub, literal(far, idx_date.c.low.type))


@lru_cache(maxsize=1024)
def _search_statement(shape: Shape, sort: tuple[str, bool], paged: bool) -> Any:
    """A page of matches ordered by (sort key, id); ``paged`` adds the keyset predicate."""
    name, descending = sort
    key = _sort_key(name, descending)
    stmt = select(*_COLUMNS, key.label("sk")).where(*_matching(shape))
    if paged:
        value = bindparam("after_value", type_=key.type)
        last_id: BindParameter[Any] = bindparam("after_id")
        if descending:
            stmt = stmt.where(or_(key < value, and_(key == value, resources.c.id < last_id)))
        else:
            stmt = stmt.where(or_(key > value, and_(key == value, resources.c.id > last_id)))
    order = (key.desc(), resources.c.id.desc()) if descending else (key.asc(), resources.c.id.asc())
    return stmt.order_by(*order).limit(bindparam("limit"))


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
