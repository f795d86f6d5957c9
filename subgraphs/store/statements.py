"""SQL statements of the repository, built once per shape and cached.

Contract: every builder returns a SQLAlchemy statement with named bind parameters only — always
``:facility`` (and ``:type``), the search criteria bound by
:func:`subgraphs.store.search.query_params` (prefix ``c``), and each access-policy group ``k``
bound with prefix ``g{k}_``. ``policy`` arguments are ``None`` (no row restriction) or a tuple of
search shapes, any of which a row must match. Builders are pure functions of their (hashable)
arguments, so their results are cached and only values change per request.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, exists, func, literal, or_, select, tuple_
from sqlalchemy.sql.elements import BindParameter

from .params import PATIENT_PARAM
from .schema import idx_date, idx_reference, idx_token, resource_history, resources
from .search import Shape, criteria_sql

PolicyShapes = tuple[Shape, ...] | None

COLUMNS = (
    resources.c.type,
    resources.c.id,
    resources.c.version,
    resources.c.last_updated,
    resources.c.deleted,
    resources.c.content,
)


def policy_prefix(k: int) -> str:
    return f"g{k}_"


def _policy(policy: PolicyShapes) -> list[ColumnElement[bool]]:
    if policy is None:
        return []
    return [or_(*(and_(*criteria_sql(shape, policy_prefix(k))) for k, shape in enumerate(policy)))]


def _current(shape: Shape, policy: PolicyShapes) -> list[ColumnElement[bool]]:
    return [
        resources.c.facility == bindparam("facility"),
        resources.c.type == bindparam("type"),
        resources.c.deleted.is_(False),
        *criteria_sql(shape),
        *_policy(policy),
    ]


@lru_cache(maxsize=1)
def read() -> Any:
    return select(*COLUMNS).where(
        resources.c.facility == bindparam("facility"),
        resources.c.type == bindparam("type"),
        resources.c.id == bindparam("id"),
    )


@lru_cache(maxsize=1)
def read_many() -> Any:
    return select(*COLUMNS).where(
        resources.c.facility == bindparam("facility"),
        resources.c.type == bindparam("type"),
        resources.c.id.in_(bindparam("ids", expanding=True)),
        resources.c.deleted.is_(False),
    )


@lru_cache(maxsize=1)
def vread() -> Any:
    h = resource_history
    return select(h.c.type, h.c.id, h.c.version, h.c.last_updated, h.c.deleted, h.c.content).where(
        h.c.facility == bindparam("facility"),
        h.c.type == bindparam("type"),
        h.c.id == bindparam("id"),
        h.c.version == bindparam("version"),
    )


@lru_cache(maxsize=64)
def visible(policy: PolicyShapes) -> Any:
    """Which of ``:ids`` (current, not deleted) the policy lets the caller see."""
    return select(resources.c.id).where(
        resources.c.facility == bindparam("facility"),
        resources.c.type == bindparam("type"),
        resources.c.id.in_(bindparam("ids", expanding=True)),
        resources.c.deleted.is_(False),
        *_policy(policy),
    )


@lru_cache(maxsize=32)
def history(by_type: bool, by_id: bool, since: bool, paged: bool) -> Any:
    """Versions newest first by (lastUpdated, type, id, version)."""
    h = resource_history
    stmt = select(h.c.type, h.c.id, h.c.version, h.c.last_updated, h.c.deleted, h.c.content, h.c.method).where(
        h.c.facility == bindparam("facility")
    )
    if by_type:
        stmt = stmt.where(h.c.type == bindparam("type"))
    if by_id:
        stmt = stmt.where(h.c.id == bindparam("id"))
    if since:
        stmt = stmt.where(h.c.last_updated >= bindparam("since", type_=h.c.last_updated.type))
    if paged:
        stmt = stmt.where(
            tuple_(h.c.last_updated, h.c.type, h.c.id, h.c.version)
            < tuple_(
                bindparam("b_time", type_=h.c.last_updated.type),
                bindparam("b_type"),
                bindparam("b_id"),
                bindparam("b_version"),
            )
        )
    order = (h.c.last_updated.desc(), h.c.type.desc(), h.c.id.desc(), h.c.version.desc())
    return stmt.order_by(*order).limit(bindparam("limit"))


@lru_cache(maxsize=1024)
def count(shape: Shape, policy: PolicyShapes) -> Any:
    return select(func.count()).where(*_current(shape, policy))


@lru_cache(maxsize=1024)
def find(shape: Shape, policy: PolicyShapes) -> Any:
    return select(resources.c.id).where(*_current(shape, policy)).limit(bindparam("limit"))


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
def search(shape: Shape, policy: PolicyShapes, sort: tuple[str, bool], paged: bool) -> Any:
    """A page of matches ordered by (sort key, id); ``paged`` adds the keyset predicate."""
    name, descending = sort
    key = _sort_key(name, descending)
    stmt = select(*COLUMNS, key.label("sk")).where(*_current(shape, policy))
    if paged:
        value = bindparam("after_value", type_=key.type)
        last_id: BindParameter[Any] = bindparam("after_id")
        if descending:
            stmt = stmt.where(or_(key < value, and_(key == value, resources.c.id < last_id)))
        else:
            stmt = stmt.where(or_(key > value, and_(key == value, resources.c.id > last_id)))
    order = (key.desc(), resources.c.id.desc()) if descending else (key.asc(), resources.c.id.asc())
    return stmt.order_by(*order).limit(bindparam("limit"))


@lru_cache(maxsize=64)
def latest_per_code(policy: PolicyShapes) -> Any:
    """Newest row of each code (window over the date index) in one patient's compartment, among
    the rows the policy lets the caller see."""
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
    conditions = [
        t.c.facility == bindparam("facility"),
        t.c.type == bindparam("type"),
        t.c.param == "code",
        t.c.id.in_(in_patient),
        in_category,
        ~bad_status,
    ]
    if policy is not None:
        allowed = select(resources.c.id).where(*_current((), policy))
        conditions.append(t.c.id.in_(allowed))
    ranked = (
        select(
            t.c.id,
            func.row_number()
            .over(partition_by=(t.c.system, t.c.code), order_by=(d.c.low.desc(), t.c.id.desc()))
            .label("rn"),
        )
        .join(d, and_(d.c.facility == t.c.facility, d.c.type == t.c.type, d.c.id == t.c.id, d.c.param == "date"))
        .where(*conditions)
        .subquery()
    )
    return (
        select(*COLUMNS)
        .where(
            resources.c.facility == bindparam("facility"),
            resources.c.type == bindparam("type"),
            resources.c.deleted.is_(False),
            resources.c.id.in_(select(ranked.c.id).where(ranked.c.rn == 1)),
        )
        .order_by(resources.c.id)
    )


@lru_cache(maxsize=1)
def patients_of() -> Any:
    """The compartment patients (``patient`` reference index) of ``:ids`` of one type — for the audit."""
    return (
        select(idx_reference.c.target_id)
        .where(
            idx_reference.c.facility == bindparam("facility"),
            idx_reference.c.type == bindparam("type"),
            idx_reference.c.id.in_(bindparam("ids", expanding=True)),
            idx_reference.c.param == PATIENT_PARAM,
            idx_reference.c.target_type == "Patient",
        )
        .distinct()
    )
