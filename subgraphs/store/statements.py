"""SQL statements of the repository, built once per shape and cached.

Contract: every builder returns a SQLAlchemy statement with named bind parameters only — always
``:facility`` (and ``:type``), the search criteria bound by
:func:`subgraphs.store.search.query_params` (prefix ``c``), and each access-policy group ``k``
bound with prefix ``g{k}_``. ``policy`` arguments are ``None`` (no row restriction) or a tuple of
search shapes, any of which a row must match; ``sub`` (:data:`~.search.SubPolicies`) the grants
for the other types a query searches inside (chains, ``_has``), bound with prefix ``s{Type}{k}_``.
Builders are pure functions of their (hashable) arguments, so their results are cached and only
values change per request. Sort keys order missing values last in both directions; paging is keyset
on (sort keys..., id) with the position bound as ``after_{i}`` / ``after_id``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, exists, func, literal, or_, select, tuple_
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ClauseElement

from .extract import UCUM_CANONICAL
from .params import PATIENT_PARAM
from .schema import (
    NUMBER,
    idx_date,
    idx_number,
    idx_quantity,
    idx_reference,
    idx_string,
    idx_token,
    idx_uri,
    resource_history,
    resources,
)
from .search import DATE, Ctx, Shape, SortKey, SubPolicies, policy_on, pool

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
    """The caller's grant on ``resources`` as per-row probes (the statement's own condition leads;
    the grant's criteria are server-side: chains in a scope query are not restricted further)."""
    return policy_on(policy, "g", Ctx(resources, bindparam("type"), None))


def _current(shape: Shape, policy: PolicyShapes, sub: SubPolicies = ()) -> list[ColumnElement[bool]]:
    """Current rows of ``:type`` matching the criteria and the grant. A grant of one group (one
    scope, e.g. a patient's compartment) joins the criteria, so it may lead the search; several
    groups are an OR of probes."""
    items = [(s, f"c{i}_", Ctx(resources, bindparam("type"), sub)) for i, s in enumerate(shape)]
    rest: list[ColumnElement[bool]] = []
    if policy is not None and len(policy) == 1:
        granted = Ctx(resources, bindparam("type"), None)
        items += [(s, f"{policy_prefix(0)}{i}_", granted) for i, s in enumerate(policy[0])]
    else:
        rest = _policy(policy)
    return [
        resources.c.facility == bindparam("facility"),
        resources.c.type == bindparam("type"),
        resources.c.deleted.is_(False),
        *pool(items),
        *rest,
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
def count(shape: Shape, policy: PolicyShapes, sub: SubPolicies = ()) -> Any:
    return select(func.count()).where(*_current(shape, policy, sub))


class Explain(Executable, ClauseElement):
    """``EXPLAIN (FORMAT JSON) <statement>`` (PostgreSQL): the planner's estimate, nothing run.
    The statement keeps its bound parameters."""

    inherit_cache = False

    def __init__(self, statement: Any) -> None:
        self.statement = statement


@compiles(Explain, "postgresql")
def _compile_explain(element: Explain, compiler: Any, **kw: Any) -> str:
    return "EXPLAIN (FORMAT JSON) " + str(compiler.process(element.statement, **kw))


@lru_cache(maxsize=1024)
def estimate(shape: Shape, policy: PolicyShapes, sub: SubPolicies = ()) -> Any:
    """The plan (PostgreSQL) of the matches' id list, whose top ``Plan Rows`` is the estimate."""
    return Explain(select(resources.c.id).where(*_current(shape, policy, sub)))


@lru_cache(maxsize=1024)
def find(shape: Shape, policy: PolicyShapes, sub: SubPolicies = ()) -> Any:
    return select(resources.c.id).where(*_current(shape, policy, sub)).limit(bindparam("limit"))


_SORT_COLUMNS: dict[str, tuple[Any, str, str]] = {
    # kind: (table, column for ascending, column for descending)
    "date": (idx_date, "low", "low"),
    "string": (idx_string, "value", "value"),
    "token": (idx_token, "code", "code"),
    "number": (idx_number, "low", "high"),
    "quantity": (idx_quantity, "low", "high"),
    "uri": (idx_uri, "value", "value"),
}


def sort_expression(key: SortKey) -> Any:
    """The value a resource sorts by: ``_id``, ``_lastUpdated``, or the lowest (ascending) /
    highest (descending) indexed value of the parameter (NULL when it has none)."""
    if key.kind == "_id":
        return resources.c.id
    if key.kind == "_lastUpdated":
        return resources.c.last_updated
    table, asc_col, desc_col = _SORT_COLUMNS[key.kind]
    column = table.c[desc_col if key.descending else asc_col]
    conditions = [
        table.c.facility == resources.c.facility,
        table.c.type == resources.c.type,
        table.c.id == resources.c.id,
        table.c.param == literal(key.code),
    ]
    if key.kind == "quantity":  # not the rows in canonical units
        conditions.append(or_(table.c.system.is_(None), table.c.system != literal(UCUM_CANONICAL)))
    agg = func.max(column) if key.descending else func.min(column)
    return select(agg).where(*conditions).scalar_subquery()


def sort_type(key: SortKey) -> Any:
    """The SQL type of a sort key's bound position value."""
    if key.kind in ("date", "_lastUpdated"):
        return DATE
    if key.kind in ("number", "quantity"):
        return NUMBER
    return None


def _nullable(key: SortKey) -> bool:
    return key.kind not in ("_id", "_lastUpdated")


def _after(keys: tuple[SortKey, ...], exprs: list[Any], nulls: tuple[bool, ...], i: int) -> ColumnElement[bool]:
    """Rows after the position ``after_0.., after_id`` in (keys..., id) order, NULLs last."""
    if i == len(keys):
        last_id: Any = bindparam("after_id")
        done: ColumnElement[bool] = resources.c.id < last_id if keys[0].descending else resources.c.id > last_id
        return done
    key, expr = keys[i], exprs[i]
    rest = _after(keys, exprs, nulls, i + 1)
    if nulls[i]:
        return and_(expr.is_(None), rest)
    value = bindparam(f"after_{i}", type_=sort_type(key))
    beyond = expr < value if key.descending else expr > value
    if _nullable(key):
        return or_(beyond, expr.is_(None), and_(expr == value, rest))
    return or_(beyond, and_(expr == value, rest))


@lru_cache(maxsize=1024)
def search(
    shape: Shape,
    policy: PolicyShapes,
    sort: tuple[SortKey, ...],
    paged: tuple[bool, ...] | None,
    sub: SubPolicies = (),
) -> Any:
    """A page of matches ordered by ``sort`` (then id, in the first key's direction), columns
    :data:`COLUMNS` plus ``sk0..`` (the sort values, for the next cursor). ``paged``: which of the
    position's sort values are NULL, or None for the first page."""
    keys = sort or (SortKey("_id", "_id", False),)
    exprs = [sort_expression(k) for k in keys]
    stmt = select(*COLUMNS, *(e.label(f"sk{i}") for i, e in enumerate(exprs))).where(*_current(shape, policy, sub))
    if paged is not None:
        stmt = stmt.where(_after(keys, exprs, paged, 0))
    order: list[Any] = []
    for key, expr in zip(keys, exprs, strict=True):
        column = expr.desc() if key.descending else expr.asc()
        order.append(column.nulls_last() if _nullable(key) else column)
    order.append(resources.c.id.desc() if keys[0].descending else resources.c.id.asc())
    return stmt.order_by(*order).limit(bindparam("limit"))


# ---------------------------------------------------------------------------------- includes


@lru_cache(maxsize=256)
def by_ids(policy: PolicyShapes) -> Any:
    """Current rows of ``:type`` among ``:ids`` that the policy lets the caller see."""
    return select(*COLUMNS).where(
        resources.c.facility == bindparam("facility"),
        resources.c.type == bindparam("type"),
        resources.c.id.in_(bindparam("ids", expanding=True)),
        resources.c.deleted.is_(False),
        *_policy(policy),
    )


@lru_cache(maxsize=4)
def include_targets(every_param: bool) -> Any:
    """The (target type, target id) of the references of ``:type`` resources ``:ids`` in
    ``:params`` (``every_param``: in any reference parameter)."""
    r = idx_reference
    conditions = [
        r.c.facility == bindparam("facility"),
        r.c.type == bindparam("type"),
        r.c.id.in_(bindparam("ids", expanding=True)),
        r.c.target_type.is_not(None),
        r.c.target_id.is_not(None),
    ]
    if not every_param:
        conditions.append(r.c.param.in_(bindparam("params", expanding=True)))
    return select(r.c.target_type, r.c.target_id).where(*conditions).distinct()


@lru_cache(maxsize=256)
def revinclude(policy: PolicyShapes) -> Any:
    """Current ``:type`` resources whose ``:param`` refers to ``:target_type`` resources ``:ids``,
    among those the policy lets the caller see; at most ``:limit``, by id."""
    r = idx_reference
    referring = select(r.c.id).where(
        r.c.facility == bindparam("facility"),
        r.c.type == bindparam("type"),
        r.c.param == bindparam("param"),
        r.c.target_type == bindparam("target_type"),
        r.c.target_id.in_(bindparam("ids", expanding=True)),
    )
    return (
        select(*COLUMNS)
        .where(
            resources.c.facility == bindparam("facility"),
            resources.c.type == bindparam("type"),
            resources.c.deleted.is_(False),
            resources.c.id.in_(referring),
            *_policy(policy),
        )
        .order_by(resources.c.id)
        .limit(bindparam("limit"))
    )


# ---------------------------------------------------------------------------------- compartments


def _in_compartment(is_patient: bool) -> ColumnElement[bool]:
    r = idx_reference
    linked = resources.c.id.in_(
        select(r.c.id).where(
            r.c.facility == bindparam("facility"),
            r.c.type == bindparam("type"),
            r.c.param.in_(bindparam("cparams", expanding=True)),
            r.c.target_type == literal("Patient"),
            r.c.target_id == bindparam("patient"),
        )
    )
    return or_(resources.c.id == bindparam("patient"), linked) if is_patient else linked


@lru_cache(maxsize=256)
def compartment(policy: PolicyShapes, is_patient: bool, since: bool, paged: bool) -> Any:
    """Current ``:type`` resources in ``:patient``'s compartment (reference parameters
    ``:cparams``; for Patient also itself), visible under the policy, by id after ``:after_id``."""
    stmt = select(*COLUMNS).where(
        resources.c.facility == bindparam("facility"),
        resources.c.type == bindparam("type"),
        resources.c.deleted.is_(False),
        _in_compartment(is_patient),
        *_policy(policy),
    )
    if since:
        stmt = stmt.where(resources.c.last_updated >= bindparam("since", type_=DATE))
    if paged:
        stmt = stmt.where(resources.c.id > bindparam("after_id"))
    return stmt.order_by(resources.c.id).limit(bindparam("limit"))


@lru_cache(maxsize=256)
def compartment_count(policy: PolicyShapes, is_patient: bool, since: bool) -> Any:
    stmt = select(func.count()).where(
        resources.c.facility == bindparam("facility"),
        resources.c.type == bindparam("type"),
        resources.c.deleted.is_(False),
        _in_compartment(is_patient),
        *_policy(policy),
    )
    if since:
        stmt = stmt.where(resources.c.last_updated >= bindparam("since", type_=DATE))
    return stmt


# ---------------------------------------------------------------------------------- reindex


@lru_cache(maxsize=4)
def reindex_batch(by_type: bool, paged: bool) -> Any:
    """Current resources of the facility (of ``:type``), by (type, id) after the position."""
    stmt = select(resources.c.type, resources.c.id, resources.c.content).where(
        resources.c.facility == bindparam("facility"), resources.c.deleted.is_(False)
    )
    if by_type:
        stmt = stmt.where(resources.c.type == bindparam("type"))
    if paged:
        stmt = stmt.where(
            tuple_(resources.c.type, resources.c.id) > tuple_(bindparam("after_type"), bindparam("after_id"))
        )
    return stmt.order_by(resources.c.type, resources.c.id).limit(bindparam("limit"))


def summary_filters(t: Any) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """For token-index rows ``t``: the resource has a category in ``:categories``, and no status in
    ``:bad_status`` — the row filters of "latest per code" (REST summary and GraphQL alike)."""
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
    return in_category, ~bad_status


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
    in_category, ok_status = summary_filters(t)
    conditions = [
        t.c.facility == bindparam("facility"),
        t.c.type == bindparam("type"),
        t.c.param == "code",
        t.c.code.is_not(None),  # text-only codes (CodeableConcept.text) are no group of their own
        t.c.id.in_(in_patient),
        in_category,
        ok_status,
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
