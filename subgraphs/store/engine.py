"""Running searches against a repository: pages, totals, includes, ``$everything``, reindexing.

Contract
--------
* Everything here runs inside the repository's transaction, for its facility and under its
  :class:`~.access.AccessPolicy`, with statements from :mod:`.statements` (cached per shape, bound
  values only, ``facility = :facility`` in every statement and subquery).
* :func:`search`: one keyset page of matches (sorted by every ``_sort`` key, then id; the next
  position holds every sort value and the id), the total when asked (``_total=accurate``, or
  ``estimate``: see :func:`estimate_total`; ``_summary=count`` and ``_count=0`` count too) or free
  (everything fits on the first page; never with ``_total=none``), and the ``_include``/``_revinclude``
  resources (``:iterate`` followed up to :data:`MAX_ITERATE` rounds). Matches need the caller's
  search grant (403 without); chained and ``_has`` searches of other types need a search grant on
  those too (403 without) and see only rows inside it. Included resources come from the same
  facility and must pass the caller's grant for their type — ``r`` for ``_include``, ``s`` for
  ``_revinclude``; the ones it does not cover are left out silently. Counts never include them.
* :func:`everything`: the Patient compartment (R5 CompartmentDefinition) page by page in (type, id)
  order, types the caller may not search left out, plus the non-compartment resources (Practitioner,
  Organization, Medication...) the page refers to, under the read grant.
* :func:`reindex` / :func:`reindex_step`: re-extract the index rows of stored resources of the
  repository's facility (after a registry change) with the facility's registry (its active custom
  SearchParameters included), in one transaction or in bounded steps.
* :func:`subset`: the ``_summary``/``_elements`` form of a stored resource, tagged SUBSETTED.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import delete, insert

from . import fhirjson
from . import statements as sql
from .crypto import reveal
from .dates import as_utc
from .errors import FhirError, bad_request
from .extract import index_rows
from .records import SearchPage, StoredResource
from .registry import Registry, default_registry
from .schema import INDEX_TABLES
from .search import (
    Include,
    SearchQuery,
    SortKey,
    SubPolicies,
    grant_params,
    query_params,
    query_shape,
    subpolicy_prefix,
)
from .validation import SUPPORTED_TYPES

if TYPE_CHECKING:
    from .repository import ResourceRepository

MAX_ITERATE = 4  # rounds of _include:iterate / _revinclude:iterate
EXACT_BELOW = 1000  # _total=estimate: below this many planned matches, count them (PostgreSQL)
MAX_INCLUDED = 5000  # included resources per page; beyond that a warning says the list is cut
CHUNK = 500
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "Resource encoded in summary mode",
}


@dataclass(frozen=True, slots=True)
class SearchResult(SearchPage):
    included: tuple[StoredResource, ...] = ()
    warnings: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------- grants


def subpolicies(repo: ResourceRepository, query: SearchQuery) -> tuple[SubPolicies, dict[str, Any]]:
    """The caller's search grant on every other type ``query`` searches (chains, ``_has``), as
    :data:`~.search.SubPolicies` and bound values; 403 when one is missing."""
    types = sorted(query.other_types())
    if not types:
        return (), {}
    out: list[tuple[str, Any]] = []
    params: dict[str, Any] = {}
    for t in types:
        queries = repo.policy.queries(t, "s")
        out.append((t, None if queries is None else tuple(query_shape(q) for q in queries)))
        if queries:
            params.update(grant_params(queries, repo.facility, subpolicy_prefix(t)))
    return tuple(out), params


def _touch(repo: ResourceRepository, found: Iterable[StoredResource]) -> None:
    touched = getattr(repo, "touched", None)  # the access audit's list, when the repository keeps one
    if touched is not None:
        touched.extend((r.type, r.id) for r in found)


def _grant(repo: ResourceRepository, resource_type: str, letter: str) -> tuple[Any, dict[str, Any]] | None:
    """The grant as (policy shapes, values), or None when the caller has none (left out silently)."""
    try:
        return repo._policy(resource_type, letter)
    except FhirError as exc:
        if exc.status == 403:
            return None
        raise


# ------------------------------------------------------------------------------------- search


def _position_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    if isinstance(value, Decimal | float):
        return str(value)
    return value


def _decode_position(keys: Sequence[SortKey], after: list[Any]) -> tuple[tuple[bool, ...], dict[str, Any]]:
    invalid = bad_request("the paging cursor is not valid for this search")
    if not isinstance(after, list) or len(after) != len(keys) + 1 or not isinstance(after[-1], str):
        raise invalid
    params: dict[str, Any] = {"after_id": after[-1]}
    nulls: list[bool] = []
    try:
        for i, (key, value) in enumerate(zip(keys, after, strict=False)):
            nulls.append(value is None)
            if value is None:
                if key.kind in ("_id", "_lastUpdated"):
                    raise invalid
                continue
            if key.kind in ("date", "_lastUpdated"):
                params[f"after_{i}"] = as_utc(datetime.fromisoformat(str(value)))
            elif key.kind in ("number", "quantity"):
                params[f"after_{i}"] = Decimal(str(value))
            else:
                params[f"after_{i}"] = str(value)
    except (ValueError, TypeError, InvalidOperation):
        raise invalid from None
    return tuple(nulls), params


async def search(repo: ResourceRepository, query: SearchQuery, *, after: list[Any] | None = None) -> SearchResult:
    """One page of matches of ``query`` with its includes (see the module docstring)."""
    policy, params = repo._policy(query.type, "s")
    sub, sub_params = subpolicies(repo, query)
    shape = query_shape(query)
    params.update(query_params(query, repo.facility))
    params.update(sub_params)
    mode = total_mode(query)
    total = None
    if mode == "accurate":
        total = (await repo.conn.execute(sql.count(shape, policy, sub), params)).scalar_one()
    elif mode == "estimate":
        total = await estimate_total(repo, shape, policy, sub, params)
    if query.summary_count or query.count == 0:
        return SearchResult([], None, total)
    keys = tuple(query.sort) or (SortKey("_id", "_id", False),)
    paged = None
    if after is not None:
        paged, values = _decode_position(keys, after)
        params.update(values)
    params["limit"] = query.count + 1
    rows = list(await repo.conn.execute(sql.search(shape, policy, keys, paged, sub), params))
    page = [StoredResource.from_row(r) for r in rows[: query.count]]
    position = None
    if len(rows) > query.count:
        last = rows[query.count - 1]
        position = [_position_value(getattr(last, f"sk{i}")) for i in range(len(keys))] + [last.id]
    if total is None and after is None and position is None and mode != "none":
        total = len(page)  # the whole result is on this first page: the total is free
    included, warnings = await includes(repo, query.includes, page, query.registry)
    _touch(repo, page)
    _touch(repo, included)
    return SearchResult(page, position, total, tuple(included), tuple(warnings))


def total_mode(query: SearchQuery) -> str | None:
    """How to count ``query``'s matches: ``accurate``, ``estimate``, ``none`` or None (not asked:
    only the free total of a first page that holds everything). ``_summary=count`` and
    ``_count=0`` ask for the total: accurate unless ``_total=estimate``."""
    if query.summary_count or query.count == 0:
        return "estimate" if query.total_mode == "estimate" else "accurate"
    return query.total_mode


async def estimate_total(
    repo: ResourceRepository, shape: Any, policy: Any, sub: SubPolicies, params: dict[str, Any]
) -> int:
    """``_total=estimate``. PostgreSQL: the planner's row estimate for the match statement
    (``EXPLAIN``, nothing run); when that says at most :data:`EXACT_BELOW` matches, the accurate
    count instead (cheap for few rows, and exact where a guess would show most). SQLite exposes no
    row estimate: there it is the accurate count (the embedded store is sized for small data)."""
    count = sql.count(shape, policy, sub)
    if repo.db.dialect != "postgresql":
        return int((await repo.conn.execute(count, params)).scalar_one())
    plan = (await repo.conn.execute(sql.estimate(shape, policy, sub), params)).scalar_one()
    document = orjson.loads(plan) if isinstance(plan, str | bytes) else plan
    try:
        planned = int(document[0]["Plan"]["Plan Rows"])
    except (KeyError, IndexError, TypeError, ValueError):
        planned = 0
    if planned <= EXACT_BELOW:
        return int((await repo.conn.execute(count, params)).scalar_one())
    return planned


async def find_ids(repo: ResourceRepository, query: SearchQuery, limit: int = 2) -> list[str]:
    """Ids of up to ``limit`` current, visible resources matching ``query`` (conditional operations)."""
    policy, params = repo._policy(query.type, "s")
    sub, sub_params = subpolicies(repo, query)
    params.update(query_params(query, repo.facility), limit=limit)
    params.update(sub_params)
    return list((await repo.conn.execute(sql.find(query_shape(query), policy, sub), params)).scalars())


# ------------------------------------------------------------------------------------- includes


def _chunks(items: Sequence[str], size: int = CHUNK) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


async def includes(
    repo: ResourceRepository,
    wanted: Sequence[Include],
    found: Sequence[StoredResource],
    registry: Registry | None = None,
) -> tuple[list[StoredResource], list[str]]:
    """The resources ``wanted`` adds to ``found`` (not repeating any), and warnings; ``registry``:
    the parameters the query was parsed with (default: the official ones)."""
    if not wanted or not found:
        return [], []
    reg = registry or default_registry()
    seen = {(r.type, r.id) for r in found}
    state = _IncludeState(seen)
    new = await _include_round(repo, reg, wanted, found, state)
    iterating = [i for i in wanted if i.iterate]
    rounds = 1
    while new and iterating and rounds <= MAX_ITERATE and not state.cut:
        new = await _include_round(repo, reg, iterating, new, state)
        rounds += 1
    warnings = [f"included resources were cut at {MAX_INCLUDED} for this page"] if state.cut else []
    return state.included, warnings


class _IncludeState:
    def __init__(self, seen: set[tuple[str, str]]) -> None:
        self.seen = seen
        self.included: list[StoredResource] = []
        self.cut = False

    def add(self, rows: Iterable[Any]) -> list[StoredResource]:
        new = []
        for row in rows:
            if len(self.included) >= MAX_INCLUDED:
                self.cut = True
                break
            if (row.type, row.id) in self.seen:
                continue
            self.seen.add((row.type, row.id))
            stored = StoredResource.from_row(row)
            self.included.append(stored)
            new.append(stored)
        return new


async def _include_round(
    repo: ResourceRepository,
    registry: Registry,
    wanted: Sequence[Include],
    found: Sequence[StoredResource],
    state: _IncludeState,
) -> list[StoredResource]:
    by_type: dict[str, list[str]] = defaultdict(list)
    for r in found:
        by_type[r.type].append(r.id)
    added: list[StoredResource] = []
    for inc in wanted:
        if state.cut:
            break
        if inc.reverse:
            added += await _revinclude(repo, registry, inc, by_type, state)
        elif inc.source in by_type:
            added += await _include(repo, inc, by_type[inc.source], state)
    return added


async def _include(
    repo: ResourceRepository, inc: Include, ids: list[str], state: _IncludeState, exclude: frozenset[str] = frozenset()
) -> list[StoredResource]:
    targets: dict[str, set[str]] = defaultdict(set)
    stmt = sql.include_targets(inc.code is None)
    for chunk in _chunks(ids):
        params: dict[str, Any] = {"facility": repo.facility, "type": inc.source, "ids": chunk}
        if inc.code is not None:
            params["params"] = [inc.code]
        for row in await repo.conn.execute(stmt, params):
            wanted_type = inc.target is None or row.target_type == inc.target
            if wanted_type and row.target_type in SUPPORTED_TYPES and row.target_type not in exclude:
                targets[row.target_type].add(row.target_id)
    added: list[StoredResource] = []
    for target_type in sorted(targets):
        wanted = sorted(i for i in targets[target_type] if (target_type, i) not in state.seen)
        grant = _grant(repo, target_type, "r") if wanted else None
        if grant is None:
            continue
        policy, grant_values = grant
        for chunk in _chunks(wanted):
            params = {**grant_values, "facility": repo.facility, "type": target_type, "ids": chunk}
            added += state.add(await repo.conn.execute(sql.by_ids(policy), params))
    return added


async def _revinclude(
    repo: ResourceRepository,
    registry: Registry,
    inc: Include,
    by_type: dict[str, list[str]],
    state: _IncludeState,
) -> list[StoredResource]:
    param = registry.get(inc.source, inc.code or "")
    if param is None:
        return []
    grant = _grant(repo, inc.source, "s")
    if grant is None:
        return []
    policy, grant_values = grant
    added: list[StoredResource] = []
    for target_type, ids in sorted(by_type.items()):
        if inc.target is not None and target_type != inc.target:
            continue
        if param.targets and target_type not in param.targets:
            continue
        for chunk in _chunks(ids):
            params = {
                **grant_values,
                "facility": repo.facility,
                "type": inc.source,
                "param": inc.code,
                "target_type": target_type,
                "ids": chunk,
                "limit": MAX_INCLUDED - len(state.included) + 1,
            }
            added += state.add(await repo.conn.execute(sql.revinclude(policy), params))
    return added


# ------------------------------------------------------------------------------------- $everything


@dataclass(frozen=True, slots=True)
class EverythingPage:
    resources: list[StoredResource]
    included: list[StoredResource]
    next_position: list[str] | None
    total: int | None


async def everything(
    repo: ResourceRepository,
    patient_id: str,
    *,
    types: Sequence[str] | None,
    since: datetime | None,
    count: int,
    after: list[str] | None,
) -> EverythingPage:
    """A page of ``patient_id``'s compartment (the caller has already read the Patient)."""
    registry = default_registry()
    members = [t for t in registry.compartment_types() if types is None or t in types]
    allowed = [t for t in members if repo.policy.allows(t, "s")]
    if after is not None:
        if len(after) != 2 or not all(isinstance(x, str) for x in after):
            raise bad_request("the paging cursor is not valid for this operation")
        allowed = [t for t in allowed if t >= after[0]]
    rows: list[StoredResource] = []
    for resource_type in allowed:
        policy, params = repo._policy(resource_type, "s")
        cparams = [p for p in registry.compartment(resource_type) if p != "{def}"] or ["-"]
        paged = after is not None and resource_type == after[0]
        params.update(
            facility=repo.facility,
            type=resource_type,
            patient=patient_id,
            cparams=cparams,
            limit=count + 1 - len(rows),
        )
        if since is not None:
            params["since"] = since
        if paged and after is not None:
            params["after_id"] = after[1]
        stmt = sql.compartment(policy, resource_type == "Patient", since is not None, paged)
        rows += [StoredResource.from_row(r) for r in await repo.conn.execute(stmt, params)]
        if len(rows) > count:
            break
    page = rows[:count]
    position = [page[-1].type, page[-1].id] if len(rows) > count else None
    total = len(page) if after is None and position is None else None
    # the resources the page refers to outside the compartment (practitioners, organizations...)
    state = _IncludeState({(r.type, r.id) for r in page})
    exclude = frozenset(registry.compartment_types())
    by_type: dict[str, list[str]] = defaultdict(list)
    for r in page:
        by_type[r.type].append(r.id)
    for source, ids in sorted(by_type.items()):
        await _include(repo, Include(source, None, None, False, False), ids, state, exclude)
    _touch(repo, page)
    _touch(repo, state.included)
    return EverythingPage(page, state.included, position, total)


# ------------------------------------------------------------------------------------- reindex


async def reindex(repo: ResourceRepository, resource_type: str | None = None, *, batch_size: int = 500) -> int:
    """Re-extract the search index of every current resource of ``repo``'s facility (of
    ``resource_type``, or all types) with the registry as it is now (custom SearchParameters
    included), in ``repo``'s transaction (open it with ``write=True``); returns how many resources
    were reindexed. For large facilities, :func:`reindex_step` bounds each transaction."""
    done, position = 0, None
    while True:
        n, position = await reindex_step(repo, resource_type, after=position, limit=batch_size)
        done += n
        if position is None:
            return done


async def reindex_step(
    repo: ResourceRepository,
    resource_type: str | None = None,
    *,
    after: tuple[str, str] | None = None,
    limit: int = 500,
) -> tuple[int, tuple[str, str] | None]:
    """Reindex up to ``limit`` resources after position ``after`` (``(type, id)``, exclusive; None:
    from the start) in ``repo``'s transaction. Returns how many, and the position to resume from in
    the next transaction (None: done)."""
    params: dict[str, Any] = {"facility": repo.facility, "limit": limit}
    if resource_type is not None:
        params["type"] = resource_type
    if after is not None:
        params["after_type"], params["after_id"] = after
    stmt = sql.reindex_batch(resource_type is not None, after is not None)
    rows = list(await repo.conn.execute(stmt, params))
    if rows:
        await _rewrite_index(repo, rows)
    position = (str(rows[-1].type), str(rows[-1].id)) if len(rows) == limit else None
    return len(rows), position


async def _rewrite_index(repo: ResourceRepository, rows: Sequence[Any]) -> None:
    by_type: dict[str, list[str]] = defaultdict(list)
    new: dict[str, list[dict[str, Any]]] = defaultdict(list)
    registry = await repo.search_registry()  # the facility's own SearchParameters included
    for row in rows:
        by_type[row.type].append(row.id)
        doc = fhirjson.loads(reveal(row.type, row.id, row.content))
        for kind, index in index_rows(doc, registry, resource_type=row.type).items():
            new[kind] += [{"facility": repo.facility, "type": row.type, "id": row.id, **r} for r in index]
    for table in INDEX_TABLES.values():
        for resource_type, ids in by_type.items():
            await repo.conn.execute(
                delete(table).where(
                    table.c.facility == repo.facility, table.c.type == resource_type, table.c.id.in_(ids)
                )
            )
    for kind, index in new.items():
        if index:
            await repo.conn.execute(insert(INDEX_TABLES[kind]), index)


# ------------------------------------------------------------------------------------- subsets


def _matches(key: str, names: set[str], choices: set[str]) -> bool:
    if key in names:
        return True
    return any(key.startswith(c) and key[len(c) : len(c) + 1].isupper() for c in choices)


def subset(
    stored: StoredResource, summary: str | None, elements: tuple[str, ...] | None, registry: Registry | None = None
) -> bytes | None:
    """The JSON of ``stored`` reduced per ``_summary`` (``true``/``text``/``data``) or ``_elements``
    (plus ``id``, ``meta`` and the mandatory elements), tagged SUBSETTED; None when neither applies."""
    if stored.content is None or (elements is None and summary not in ("true", "text", "data")):
        return None
    reg = registry or default_registry()
    info = reg.elements(stored.type)
    mandatory = list(info.mandatory)
    if elements is not None:
        wanted = ["id", "meta", *mandatory, *elements]
    elif summary == "true":
        wanted = [*info.summary, *mandatory]
    elif summary == "text":
        wanted = ["id", "meta", "text", *mandatory]
    else:  # data
        wanted = [n for n in info.all if n != "text"]
    names = {n.removesuffix("[x]") for n in wanted}
    choices = {n.removesuffix("[x]") for n in info.all if n.endswith("[x]") and n.removesuffix("[x]") in names}
    doc = fhirjson.loads(stored.content)
    out: dict[str, Any] = {"resourceType": doc.get("resourceType", stored.type)}
    for key, value in doc.items():
        if key == "resourceType":
            continue
        base = key[1:] if key.startswith("_") else key  # primitive extensions follow their element
        if _matches(base, names, choices):
            out[key] = value
    meta = dict(out.get("meta") or {})
    tags = [t for t in meta.get("tag", []) if not (isinstance(t, dict) and t.get("code") == "SUBSETTED")]
    meta["tag"] = [*tags, SUBSETTED]
    out["meta"] = meta
    return fhirjson.dumps(out)


def now() -> datetime:
    return datetime.now(UTC)
