"""Batched reads for the subgraphs' DataLoaders: ONE SQL statement for N keys.

Contract: every function takes an open :class:`~subgraphs.store.repository.ResourceRepository`
(one facility, one caller policy, one transaction) and runs exactly one statement, whatever the
number of keys. Statements follow :mod:`subgraphs.store.statements`: named bind parameters only
(``:facility``, ``:type``, search criteria with prefix ``c``, access-policy groups with prefix
``g{k}_``), built once per shape and cached. Every statement carries ``facility = :facility`` and
the caller's grant (roles ∩ scopes) for the interaction (``r`` for reads by id, ``s`` for
compartment lists), compiled into its WHERE exactly as the repository does it, so GraphQL sees
what REST sees: rows outside the grant are absent, and a missing grant is 403. What a function
returns is added to ``repo.touched``, so the request's access record lists it.

The only non-public store APIs used are ``ResourceRepository._policy`` and
``statements._policy`` (in :func:`_grant` and :func:`_policy_sql`): the grant and its SQL exactly
as the repository compiles them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, func, literal, select

from subgraphs.store import statements
from subgraphs.store.params import PATIENT_PARAM
from subgraphs.store.records import StoredResource
from subgraphs.store.repository import ResourceRepository
from subgraphs.store.schema import idx_date, idx_reference, idx_token, resources
from subgraphs.store.search import SearchQuery, criteria_sql, query_params, query_shape
from subgraphs.store.statements import COLUMNS, PolicyShapes, summary_filters, visible

EXCLUDED_STATUS = ("entered-in-error", "cancelled")
_FAR_PAST = datetime(1, 1, 1, tzinfo=UTC)


def _grant(repo: ResourceRepository, resource_type: str, letter: str) -> tuple[PolicyShapes, dict[str, Any]]:
    """The caller's grant for ``letter`` on ``resource_type`` as (policy shapes, bound values); 403
    without one. (Proposed public name: ``ResourceRepository.grant_sql``.)"""
    return repo._policy(resource_type, letter)


def _policy_sql(policy: PolicyShapes) -> list[ColumnElement[bool]]:
    """``(group1 OR group2 ...)`` on ``resources``: the predicate the repository adds. (Proposed
    public name: ``statements.policy_sql``.)"""
    conditions: list[ColumnElement[bool]] = statements._policy(policy)
    return conditions


def _current(policy: PolicyShapes) -> list[ColumnElement[bool]]:
    return [
        resources.c.facility == bindparam("facility"),
        resources.c.type == bindparam("type"),
        resources.c.deleted.is_(False),
        *_policy_sql(policy),
    ]


# ---------------------------------------------------------------------------------- by id
@lru_cache(maxsize=64)
def _by_ids(policy: PolicyShapes) -> Any:
    return select(*COLUMNS).where(*_current(policy), resources.c.id.in_(bindparam("ids", expanding=True)))


async def resources_by_ids(
    repo: ResourceRepository, resource_type: str, ids: Sequence[str], letter: str = "r"
) -> dict[str, StoredResource]:
    """The current, not deleted versions of ``ids`` the caller may ``letter``; others are absent."""
    policy, params = _grant(repo, resource_type, letter)
    if not ids:
        return {}
    params.update(facility=repo.facility, type=resource_type, ids=sorted(set(ids)))
    found = {r.id: StoredResource.from_row(r) for r in await repo.conn.execute(_by_ids(policy), params)}
    repo.touched.extend((resource_type, i) for i in found)
    return found


async def visible_ids(repo: ResourceRepository, resource_type: str, ids: Sequence[str], letter: str = "r") -> set[str]:
    """Which of ``ids`` exist here (current, not deleted) inside the caller's grant for ``letter``."""
    policy, params = _grant(repo, resource_type, letter)
    if not ids:
        return set()
    params.update(facility=repo.facility, type=resource_type, ids=sorted(set(ids)))
    seen = set((await repo.conn.execute(visible(policy), params)).scalars())
    repo.touched.extend((resource_type, i) for i in sorted(seen))
    return seen


# ---------------------------------------------------------------------------------- compartments
def _in_patients(ref: Any, owner: Any) -> ColumnElement[bool]:
    """``ref`` (an ``idx_reference`` alias) links ``owner``'s row to one of ``:patients``."""
    return and_(
        ref.c.facility == owner.c.facility,
        ref.c.type == owner.c.type,
        ref.c.id == owner.c.id,
        ref.c.param == PATIENT_PARAM,
        ref.c.target_type == "Patient",
        ref.c.target_id.in_(bindparam("patients", expanding=True)),
    )


def _newest_first_key() -> Any:
    """The newest instant indexed for ``:sort_param`` (never-dated rows last), like ``_sort=-param``."""
    newest = (
        select(func.max(idx_date.c.low))
        .where(
            idx_date.c.facility == resources.c.facility,
            idx_date.c.type == resources.c.type,
            idx_date.c.id == resources.c.id,
            idx_date.c.param == bindparam("sort_param"),
        )
        .scalar_subquery()
    )
    return func.coalesce(newest, literal(_FAR_PAST, idx_date.c.low.type))


@lru_cache(maxsize=1024)
def _compartment(shape: Any, policy: PolicyShapes) -> Any:
    """Rows of ``:type`` in the compartments of ``:patients`` matching ``shape``, the first
    ``:limit`` of each patient newest first (row_number over partition by patient)."""
    ref = idx_reference.alias("pat")
    key = _newest_first_key()
    ranked = (
        select(
            *COLUMNS,
            ref.c.target_id.label("patient"),
            func.row_number()
            .over(partition_by=ref.c.target_id, order_by=(key.desc(), resources.c.id.desc()))
            .label("rn"),
        )
        .select_from(resources.join(ref, _in_patients(ref, resources)))
        .where(*_current(policy), *criteria_sql(shape))
        .subquery("ranked")
    )
    return (
        select(*(ranked.c[c.name] for c in COLUMNS), ranked.c.patient)
        .where(ranked.c.rn <= bindparam("limit"))
        .order_by(ranked.c.patient, ranked.c.rn)
    )


async def compartments(
    repo: ResourceRepository,
    query: SearchQuery,
    patient_ids: Sequence[str],
    *,
    sort_param: str,
    limit: int,
) -> dict[str, list[StoredResource]]:
    """For each patient, up to ``limit`` resources of ``query.type`` in its compartment matching
    ``query``'s criteria (``_count`` and ``_sort`` are ignored), newest ``sort_param`` first, among
    the rows the caller may search. One statement for all patients."""
    policy, params = _grant(repo, query.type, "s")
    out: dict[str, list[StoredResource]] = defaultdict(list)
    if not patient_ids:
        return out
    params.update(query_params(query, repo.facility))
    params.update(patients=sorted(set(patient_ids)), limit=limit, sort_param=sort_param)
    for row in await repo.conn.execute(_compartment(query_shape(query), policy), params):
        out[row.patient].append(StoredResource.from_row(row))
        repo.touched.append((row.type, row.id))
    return out


# ---------------------------------------------------------------------------------- latest per code
@lru_cache(maxsize=64)
def _latest_per_code(policy: PolicyShapes) -> Any:
    """For each patient of ``:patients``, the newest (by ``date``) row of each code in
    ``:categories`` without a ``:bad_status`` — as :func:`subgraphs.store.statements.latest_per_code`,
    partitioned by patient as well."""
    t, d = idx_token, idx_date
    ref = idx_reference.alias("pat")
    conditions = [t.c.facility == bindparam("facility"), t.c.type == bindparam("type"), t.c.param == "code"]
    conditions += summary_filters(t)
    if policy is not None:
        conditions.append(t.c.id.in_(select(resources.c.id).where(*_current(policy))))
    ranked = (
        select(
            t.c.id,
            ref.c.target_id.label("patient"),
            func.row_number()
            .over(partition_by=(ref.c.target_id, t.c.system, t.c.code), order_by=(d.c.low.desc(), t.c.id.desc()))
            .label("rn"),
        )
        .select_from(
            t.join(ref, _in_patients(ref, t)).join(
                d, and_(d.c.facility == t.c.facility, d.c.type == t.c.type, d.c.id == t.c.id, d.c.param == "date")
            )
        )
        .where(*conditions)
        .subquery("ranked")
    )
    latest = select(ranked.c.patient, ranked.c.id).where(ranked.c.rn == 1).distinct().subquery("latest")
    return (
        select(*COLUMNS, latest.c.patient)
        .select_from(resources.join(latest, resources.c.id == latest.c.id))
        .where(
            resources.c.facility == bindparam("facility"),
            resources.c.type == bindparam("type"),
            resources.c.deleted.is_(False),
        )
        .order_by(latest.c.patient, resources.c.id)
    )


async def latest_per_code(
    repo: ResourceRepository,
    resource_type: str,
    patient_ids: Sequence[str],
    categories: Sequence[str],
    exclude_status: Sequence[str] = EXCLUDED_STATUS,
) -> dict[str, list[StoredResource]]:
    """For each patient, what :meth:`ResourceRepository.latest_per_code` returns for it (ordered
    by id) — for all patients in one statement."""
    policy, params = _grant(repo, resource_type, "s")
    out: dict[str, list[StoredResource]] = defaultdict(list)
    if not patient_ids:
        return out
    params.update(
        facility=repo.facility,
        type=resource_type,
        patients=sorted(set(patient_ids)),
        categories=list(categories),
        bad_status=list(exclude_status),
    )
    for row in await repo.conn.execute(_latest_per_code(policy), params):
        out[row.patient].append(StoredResource.from_row(row))
        repo.touched.append((row.type, row.id))
    return out
