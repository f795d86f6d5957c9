"""Basic FHIR search: parse query parameters into a :class:`SearchQuery`, and that into SQL.

Contract: :func:`parse_search` turns ``(name, value)`` pairs into a validated query or raises 400
with the offending parameter in ``expression``; malformed values never reach SQL, and every value
reaches SQL only as a bound parameter. Unknown parameters are collected in ``SearchQuery.ignored``
(lenient handling) or rejected (strict). :func:`where_clauses` compiles the criteria to SQL over
the ``idx_*`` tables; the caller adds the facility predicate for ``resources`` and every subquery
already carries it. Comma-separated values are OR-ed, repeated parameters AND-ed.

Supported here (the foundation's subset; the search-engine issue extends it): token
(``system|code``, ``code``, ``|code``, ``system|``; ``:not``), reference (``Type/id``, ``id``),
date (prefixes ``eq ne gt lt ge le sa eb``), string (``:exact``, ``:contains``), ``_id``,
``_lastUpdated``, ``_count``, ``_sort`` (``_id``, ``_lastUpdated``, date params, with ``-``),
``_total`` and ``_summary=count``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, not_, or_, select, true
from sqlalchemy.sql.elements import ColumnElement as Col

from .dates import date_range
from .errors import bad_request
from .params import PARAM_BY_NAME, Param, normalize_string, split_reference
from .schema import INDEX_TABLES, resources

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
CONTROL = {"_count", "_sort", "_total", "_summary", "_page", "_format", "_pretty"}


@dataclass(frozen=True, slots=True)
class Criterion:
    name: str
    modifier: str | None
    values: tuple[Any, ...]
    param: Param | None = None  # None for _id / _lastUpdated


@dataclass(slots=True)
class SearchQuery:
    type: str
    criteria: list[Criterion] = field(default_factory=list)
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (param, descending)
    count: int = 50
    total: bool = False
    summary_count: bool = False
    page: str | None = None
    ignored: list[str] = field(default_factory=list)
    canonical: str = ""

    def scope(self) -> str:
        """What a paging cursor is bound to besides the facility: type + criteria + sort."""
        return f"{self.type}?{self.canonical}"


def _date_value(name: str, raw: str) -> tuple[str, datetime, datetime]:
    prefix = raw[:2] if raw[:2] in PREFIXES else "eq"
    text = raw[2:] if raw[:2] in PREFIXES else raw
    rng = date_range(text)
    if rng is None:
        raise bad_request(f"'{raw}' is not a valid date for parameter {name}", expression=[name])
    return prefix, rng[0], rng[1]


def _token_value(raw: str) -> tuple[str | None, str | None]:
    if "|" in raw:
        system, code = raw.split("|", 1)
        return system, code or None  # "|code" → system "" (none); "system|" → any code
    return None, raw


def _reference_value(param: Param, raw: str) -> tuple[str | None, str]:
    ref = split_reference(raw)
    if ref is not None:
        if param.targets and ref[0] not in param.targets:
            raise bad_request(f"{param.name} cannot refer to {ref[0]}", expression=[param.name])
        return ref
    if "/" in raw or not raw:
        raise bad_request(f"'{raw}' is not a valid reference for {param.name}", expression=[param.name])
    return (param.targets[0] if len(param.targets) == 1 else None), raw


def _parse_values(param: Param | None, name: str, modifier: str | None, raw: str) -> tuple[Any, ...]:
    parts = [p for p in raw.split(",")]
    if any(p == "" for p in parts):
        raise bad_request(f"parameter {name} has an empty value", expression=[name])
    if name == "_id":
        return tuple(parts)
    if name == "_lastUpdated" or (param is not None and param.kind == "date"):
        return tuple(_date_value(name, p) for p in parts)
    assert param is not None
    if param.kind == "token":
        return tuple(_token_value(p) for p in parts)
    if param.kind == "reference":
        return tuple(_reference_value(param, p) for p in parts)
    return tuple(p if modifier == "exact" else normalize_string(p) for p in parts)


_MODIFIERS = {"token": {"not"}, "string": {"exact", "contains"}, "reference": set(), "date": set()}


def parse_search(
    resource_type: str,
    pairs: list[tuple[str, str]],
    *,
    default_count: int = 50,
    max_count: int = 1000,
    strict: bool = False,
) -> SearchQuery:
    """Parse search parameters for ``resource_type``; 400 on malformed values (see module doc)."""
    query = SearchQuery(type=resource_type, count=default_count)
    known = PARAM_BY_NAME.get(resource_type, {})
    canonical: list[str] = []
    for name_mod, raw in pairs:
        name, _, modifier = name_mod.partition(":")
        if name in CONTROL:
            _control(query, name, raw, known, max_count)
            if name in ("_sort",):
                canonical.append(f"{name}={raw}")
            continue
        param = known.get(name)
        if name not in ("_id", "_lastUpdated") and param is None:
            if strict:
                raise bad_request(
                    f"unknown search parameter {name_mod} for {resource_type}",
                    code="not-supported",
                    expression=[name_mod],
                )
            query.ignored.append(name_mod)
            continue
        kind = "special" if param is None else param.kind
        if modifier and modifier not in _MODIFIERS.get(kind, set()):
            if strict:
                raise bad_request(
                    f"modifier :{modifier} is not supported on {name}", code="not-supported", expression=[name_mod]
                )
            query.ignored.append(name_mod)
            continue
        query.criteria.append(Criterion(name, modifier or None, _parse_values(param, name, modifier, raw), param))
        canonical.append(f"{name_mod}={raw}")
    query.canonical = "&".join(sorted(canonical))
    return query


def _control(query: SearchQuery, name: str, raw: str, known: dict[str, Param], max_count: int) -> None:
    if name == "_count":
        if not raw.isdigit() or not 0 <= int(raw) <= max_count:
            raise bad_request(f"_count must be an integer from 0 to {max_count}", expression=["_count"])
        query.count = int(raw)
        if query.count == 0:  # "_count=0": the client wants only the total
            query.total = True
    elif name == "_sort":
        for key in raw.split(","):
            desc = key.startswith("-")
            pname = key[1:] if desc else key
            if pname not in ("_id", "_lastUpdated") and (pname not in known or known[pname].kind != "date"):
                raise bad_request(f"cannot sort {query.type} by '{pname}'", expression=["_sort"])
            query.sort.append((pname, desc))
    elif name == "_total":
        if raw not in ("none", "estimate", "accurate"):
            raise bad_request("_total must be none, estimate or accurate", expression=["_total"])
        query.total = raw != "none"
    elif name == "_summary":
        if raw == "count":
            query.summary_count = True
            query.total = True
        elif raw != "false":
            query.ignored.append(f"_summary={raw}")
    elif name == "_page":
        query.page = raw


def _ids_matching(resource_type: str, facility: str, crit: Criterion) -> Any:
    """A subquery of resource ids that match ``crit`` (any of its values)."""
    assert crit.param is not None
    table = INDEX_TABLES[crit.param.kind]
    ors: list[ColumnElement[bool]] = []
    for value in crit.values:
        if crit.param.kind == "token":
            system, code = value
            cond: list[ColumnElement[bool]] = []
            if code is not None:
                cond.append(table.c.code == code)
            if system == "":
                cond.append(table.c.system.is_(None))
            elif system is not None:
                cond.append(table.c.system == system)
            ors.append(and_(true(), *cond))
        elif crit.param.kind == "reference":
            target_type, target_id = value
            cond = [table.c.target_id == target_id]
            if target_type is not None:
                cond.append(table.c.target_type == target_type)
            ors.append(and_(*cond))
        elif crit.param.kind == "date":
            ors.append(_date_condition(table.c.low, table.c.high, value))
        else:  # string
            if crit.modifier == "contains":
                ors.append(table.c.value.contains(value, autoescape=True))
            elif crit.modifier == "exact":
                ors.append(table.c.value == normalize_string(value))  # index holds the normalized form
            else:
                ors.append(table.c.value.startswith(value, autoescape=True))
    return select(table.c.id).where(
        table.c.facility == facility,
        table.c.type == resource_type,
        table.c.param == crit.param.name,
        or_(*ors),
    )


def _date_condition(low: Col[Any], high: Col[Any], value: tuple[str, datetime, datetime]) -> ColumnElement[bool]:
    """R5 date-search semantics: the resource's range [low, high] against the value's [vlo, vhi]."""
    prefix, vlo, vhi = value
    if prefix == "eq":
        return and_(low >= vlo, high <= vhi)
    if prefix == "ne":
        return or_(low < vlo, high > vhi)
    if prefix in ("gt", "sa"):
        return high > vhi if prefix == "gt" else low > vhi
    if prefix in ("lt", "eb"):
        return low < vlo if prefix == "lt" else high < vlo
    within = and_(low >= vlo, high <= vhi)
    if prefix == "ge":
        return or_(high > vhi, within)
    return or_(low < vlo, within)  # le


def where_clauses(query: SearchQuery, facility: str) -> list[ColumnElement[bool]]:
    """SQL conditions on ``resources`` for every criterion (AND of parameters, OR within one)."""
    out: list[ColumnElement[bool]] = []
    for crit in query.criteria:
        if crit.name == "_id":
            out.append(resources.c.id.in_(list(crit.values)))
        elif crit.name == "_lastUpdated":
            out.append(
                or_(*(_date_condition(resources.c.last_updated, resources.c.last_updated, v) for v in crit.values))
            )
        elif crit.modifier == "not":
            positive = Criterion(crit.name, None, crit.values, crit.param)
            out.append(not_(resources.c.id.in_(_ids_matching(query.type, facility, positive))))
        else:
            out.append(resources.c.id.in_(_ids_matching(query.type, facility, crit)))
    if not out:
        out.append(true())
    return out
