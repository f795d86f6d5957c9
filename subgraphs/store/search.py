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
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, not_, or_, select, true
from sqlalchemy.sql.elements import BindParameter
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


Shape = tuple[Any, ...]


def _value_shape(kind: str, modifier: str | None, value: Any) -> tuple[Any, ...]:
    """What of a value changes the SQL (never the value itself)."""
    if kind == "token":
        return (value[0] is None, value[0] == "", value[1] is None)
    if kind == "reference":
        return (value[0] is None,)
    if kind == "date":
        return (value[0],)  # the prefix
    return (modifier,)


def _kind(crit: Criterion) -> str:
    if crit.name == "_lastUpdated":
        return "date"
    return crit.param.kind if crit.param is not None else crit.name


def query_shape(query: SearchQuery) -> Shape:
    """The SQL-relevant structure of ``query``: equal shapes compile to the same statement."""
    return tuple(
        (c.name, c.modifier, _kind(c), tuple(_value_shape(_kind(c), c.modifier, v) for v in c.values))
        for c in query.criteria
    )


def _like_escape(value: str) -> str:
    return value.replace("/", "//").replace("%", "/%").replace("_", "/_")


def query_params(query: SearchQuery, facility: str, prefix: str = "c") -> dict[str, Any]:
    """Bound values for :func:`criteria_sql` of this query's shape (names ``{prefix}{i}...``)."""
    out: dict[str, Any] = {"facility": facility, "type": query.type}
    for i, crit in enumerate(query.criteria):
        kind = _kind(crit)
        if crit.name == "_id":
            out[f"{prefix}{i}"] = list(crit.values)
            continue
        if crit.param is not None:
            out[f"{prefix}{i}p"] = crit.param.name
        for j, value in enumerate(crit.values):
            name = f"{prefix}{i}v{j}"
            if kind in ("token", "reference"):
                if value[0]:
                    out[name + "a"] = value[0]
                if value[1] is not None:
                    out[name + "b"] = value[1]
            elif kind == "date":
                out[name + "a"], out[name + "b"] = value[1], value[2]
            elif crit.modifier == "exact":
                out[name + "a"] = normalize_string(value)  # the index holds the normalized form
            else:
                out[name + "a"] = _like_escape(value)
    return out


@lru_cache(maxsize=4096)
def criteria_sql(shape: Shape, prefix: str = "c") -> tuple[ColumnElement[bool], ...]:
    """SQL conditions on ``resources`` for a query shape (AND of parameters, OR within one); every
    index subquery carries ``facility = :facility``. Bind with :func:`query_params`."""
    out: list[ColumnElement[bool]] = []
    for i, (name, modifier, kind, values) in enumerate(shape):
        if name == "_id":
            out.append(resources.c.id.in_(bindparam(f"{prefix}{i}", expanding=True)))
        elif name == "_lastUpdated":
            col = resources.c.last_updated
            out.append(or_(*(_date_condition(col, col, v[0], f"{prefix}{i}v{j}") for j, v in enumerate(values))))
        else:
            ids = _ids_matching(f"{prefix}{i}", kind, modifier, values)
            out.append(not_(resources.c.id.in_(ids)) if modifier == "not" else resources.c.id.in_(ids))
    return tuple(out) or (true(),)


def _ids_matching(name: str, kind: str, modifier: str | None, values: tuple[Any, ...]) -> Any:
    """A subquery of resource ids that match the criterion bound as ``name`` (any of its values)."""
    table = INDEX_TABLES[kind]
    ors: list[ColumnElement[bool]] = []
    for j, vshape in enumerate(values):
        a: BindParameter[Any] = bindparam(f"{name}v{j}a")
        b: BindParameter[Any] = bindparam(f"{name}v{j}b")
        if kind == "token":
            no_system, empty_system, no_code = vshape
            cond: list[ColumnElement[bool]] = [] if no_code else [table.c.code == b]
            if empty_system:
                cond.append(table.c.system.is_(None))
            elif not no_system:
                cond.append(table.c.system == a)
            ors.append(and_(true(), *cond))
        elif kind == "reference":
            (no_type,) = vshape
            ors.append(table.c.target_id == b if no_type else and_(table.c.target_id == b, table.c.target_type == a))
        elif kind == "date":
            ors.append(_date_condition(table.c.low, table.c.high, vshape[0], f"{name}v{j}"))
        elif modifier == "contains":
            ors.append(table.c.value.contains(a, escape="/"))
        elif modifier == "exact":
            ors.append(table.c.value == a)
        else:
            ors.append(table.c.value.startswith(a, escape="/"))
    return select(table.c.id).where(
        table.c.facility == bindparam("facility"),
        table.c.type == bindparam("type"),
        table.c.param == bindparam(f"{name}p"),
        or_(*ors),
    )


def _date_condition(low: Col[Any], high: Col[Any], prefix: str, name: str) -> ColumnElement[bool]:
    """R5 date-search semantics: the resource's range [low, high] against the value's [vlo, vhi]."""
    vlo, vhi = bindparam(name + "a", type_=low.type), bindparam(name + "b", type_=low.type)
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
