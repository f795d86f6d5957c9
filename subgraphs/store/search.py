"""FHIR R5 search: query parameters → an AST (:class:`SearchQuery`) → SQL conditions.

Contract
--------
* :func:`parse_search` turns ``(name, value)`` pairs into a validated :class:`SearchQuery` for one
  resource type, using the search parameters of the registry (:mod:`.registry`, generated from the
  official R5 definitions). Malformed values (bad dates, numbers, quantities, prefixes, references,
  ``_count`` out of range, ``_sort`` on an unknown parameter, chains or ``_has`` deeper than
  :data:`MAX_DEPTH`) raise 400 with the parameter in ``expression``. Unknown or unsupported
  parameters, modifiers and ``_include`` targets are collected in ``SearchQuery.ignored`` (lenient,
  the default) or raise 400 ``not-supported`` (``strict``).
* Supported: every parameter type (number, date, string, token, reference, composite, quantity,
  uri); modifiers ``:missing`` (all), ``:exact``/``:contains``/``:text`` (string), ``:not``/``:text``/
  ``:of-type``/``:code-text`` (token), ``:identifier`` and ``:[Type]`` (reference), ``:above``/
  ``:below``/``:contains`` (uri); prefixes ``eq ne gt lt ge le sa eb ap`` with partial dates as
  ranges and number/quantity precision (``5.4`` means ``[5.35, 5.45)``; UCUM units compare in
  canonical form where :func:`.extract.ucum_canonical` knows them); comma = OR, repeated = AND,
  ``\\,`` ``\\|`` ``\\$`` ``\\\\`` escapes; chains (``subject:Patient.name=x``, up to
  :data:`MAX_DEPTH` links) and ``_has`` (nestable); ``_id``, ``_lastUpdated``, ``_tag``,
  ``_profile``, ``_security``, ``_source``, ``_language``; ``_text`` and ``_content`` (word
  prefixes, :mod:`.search_text`); ``_sort`` (several keys, ``-`` descending,
  on ``_id``, ``_lastUpdated`` and any string/token/date/number/quantity/uri parameter), ``_count``,
  ``_total``, ``_summary``, ``_elements``, ``_include``/``_revinclude`` (with ``:iterate``).
* SQL: :func:`criteria_sql` compiles a query *shape* (:func:`query_shape`: parameters, modifiers,
  prefixes, value forms — never values) into conditions on ``resources``, cached per shape;
  :func:`query_params` gives the bound values for it. Values reach SQL only as bound parameters;
  parameter codes and type names come from the registry and are bound too. Every index subquery,
  chain and ``_has`` subquery carries ``facility = :facility``. Chained and ``_has`` subqueries over
  another type apply the caller's grant for searching that type (``subpolicies``); a type without
  a grant matches nothing there (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    DateTime,
    String,
    and_,
    bindparam,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.sql.elements import BindParameter

from .dates import date_range
from .errors import FhirError, bad_request
from .extract import UCUM, UCUM_CANONICAL, normalize, parse_reference, precision_range, ucum_canonical
from .registry import Registry, SearchParam, default_registry
from .schema import (
    NUMBER,
    idx_composite,
    idx_date,
    idx_number,
    idx_quantity,
    idx_reference,
    idx_string,
    idx_text,
    idx_token,
    idx_uri,
    resources,
)
from .search_text import TEXT_PARAMS, like_patterns, query_words
from .validation import SUPPORTED_TYPES

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
CONTROL = frozenset(
    {"_count", "_sort", "_total", "_summary", "_elements", "_include", "_revinclude", "_page", "_format", "_pretty"}
)
MAX_DEPTH = 3  # links in a chain, or nested _has
SORTABLE = frozenset({"string", "token", "date", "number", "quantity", "uri"})
SUMMARY_MODES = ("true", "text", "data", "count", "false")
_SPECIAL = frozenset({"_id", "_lastUpdated"})
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]{1,63}$")

#: What this engine implements per parameter type (the registry lists what the spec allows).
SUPPORTED_MODIFIERS: dict[str, frozenset[str]] = {
    "number": frozenset({"missing"}),
    "date": frozenset({"missing"}),
    "string": frozenset({"missing", "exact", "contains", "text"}),
    "token": frozenset({"missing", "not", "text", "of-type", "code-text"}),
    "reference": frozenset({"missing", "identifier"}),  # and :[Type]
    "composite": frozenset({"missing"}),
    "quantity": frozenset({"missing"}),
    "uri": frozenset({"missing", "above", "below", "contains"}),
}

Shape = tuple[Any, ...]
Leaf = tuple[tuple[Any, ...], tuple[Any, ...]]  # (SQL-relevant form, bound values in compile order)
SubPolicies = tuple[tuple[str, tuple[Shape, ...] | None], ...] | None
"""Grants for searching other types inside a statement (chains, ``_has``): ``(type, shapes or None
= unrestricted)`` pairs; a type not listed matches nothing. ``None``: no restriction at all (used
for the server-side criteria of the policy itself)."""


class Unsupported(Exception):
    """A parameter, modifier or include this server does not support (lenient: ignored)."""


# =============================================================================================
# The AST


@dataclass(frozen=True, slots=True)
class Criterion:
    """One search parameter occurrence: its values are OR-ed (``leaves``); occurrences are AND-ed.

    ``kind`` is the parameter type, or ``_id``, ``_lastUpdated``, ``missing``, ``chain``, ``has``.
    ``links`` holds, for a chain, ``(target type, criterion on it)`` for each candidate target type,
    and for ``_has`` the single ``(source type, criterion on it)``; ``ref`` is the reference
    parameter of a ``_has`` (on the source type)."""

    name: str
    code: str
    kind: str
    modifier: str | None = None
    leaves: tuple[Leaf, ...] = ()
    param: SearchParam | None = None
    links: tuple[tuple[str, Criterion], ...] = ()
    ref: str = ""
    target: str | None = None  # reference :[Type] modifier

    @property
    def values(self) -> tuple[Any, ...]:
        """The bound values of every leaf (for callers that only look)."""
        return tuple(v for _, binds in self.leaves for v in binds)

    @property
    def shape(self) -> Shape:
        return (
            self.kind,
            self.code,
            self.modifier,
            self.target,
            self.ref,
            tuple(form for form, _ in self.leaves),
            tuple((t, c.shape) for t, c in self.links),
        )

    def bind(self, prefix: str, out: dict[str, Any]) -> None:
        for j, (_, binds) in enumerate(self.leaves):
            for k, value in enumerate(binds):
                out[f"{prefix}{j}_{k}"] = value
        for t, (_, inner) in enumerate(self.links):
            inner.bind(f"{prefix}t{t}_", out)

    def types(self) -> Iterable[str]:
        """Every other type this criterion searches (chain targets, ``_has`` sources), nested."""
        for t, inner in self.links:
            yield t
            yield from inner.types()


@dataclass(frozen=True, slots=True)
class SortKey:
    code: str
    kind: str  # parameter type, or _id / _lastUpdated
    descending: bool


@dataclass(frozen=True, slots=True)
class Include:
    """``_include`` (``reverse`` False: follow ``source``'s ``code`` references of the results) or
    ``_revinclude`` (True: ``source`` resources whose ``code`` references a result). ``code`` None:
    every reference parameter (``Source:*``, ``_include`` only). ``target`` narrows the type."""

    source: str
    code: str | None
    target: str | None
    iterate: bool
    reverse: bool


@dataclass(slots=True)
class SearchQuery:
    type: str
    criteria: list[Criterion] = field(default_factory=list)
    sort: list[SortKey] = field(default_factory=list)
    count: int = 50
    total: bool = False
    total_mode: str | None = None  # none | estimate | accurate (None: not asked)
    summary: str | None = None  # true | text | data | count | false
    summary_count: bool = False
    elements: tuple[str, ...] | None = None
    includes: list[Include] = field(default_factory=list)
    page: str | None = None
    ignored: list[str] = field(default_factory=list)
    canonical: str = ""
    registry: Registry | None = None  # the parameters it was parsed with (None: the default)

    def scope(self) -> str:
        """What a paging cursor is bound to besides the facility: type + criteria + sort."""
        return f"{self.type}?{self.canonical}"

    def other_types(self) -> set[str]:
        """The types searched inside this query's criteria (chain targets, ``_has`` sources)."""
        return {t for c in self.criteria for t in c.types()}


# =============================================================================================
# Parsing


def split_escaped(text: str, sep: str) -> list[str]:
    """``text`` split on ``sep`` where it is not escaped by a backslash (escapes are kept)."""
    out: list[str] = []
    start = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == sep:
            out.append(text[start:i])
            start = i + 1
        i += 1
    out.append(text[start:])
    return out


def unescape(text: str) -> str:
    """FHIR search escapes (``\\,`` ``\\|`` ``\\$`` ``\\\\``) removed."""
    if "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _prefix(raw: str) -> tuple[str, str]:
    if raw[:2] in PREFIXES and len(raw) > 2:
        return raw[:2], raw[2:]
    return "eq", raw


def _decimal(name: str, text: str) -> Decimal:
    try:
        value = Decimal(text)
    except (InvalidOperation, ValueError):
        raise bad_request(f"'{text[:80]}' is not a number for parameter {name}", expression=[name]) from None
    well_formed = re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text.strip())
    if not value.is_finite() or not well_formed or not -300 < value.adjusted() < 300:
        raise bad_request(f"'{text[:80]}' is not a number for parameter {name}", expression=[name])
    return value


def _ap_range(low: Decimal, high: Decimal, value: Decimal) -> tuple[Decimal, Decimal]:
    margin = abs(value) / 10
    return min(low, value - margin), max(high, value + margin)


def _number_binds(name: str, prefix: str, text: str) -> tuple[Decimal, ...]:
    value = _decimal(name, text)
    low, high = precision_range(value)
    if prefix in ("eq", "ne"):
        return low, high
    if prefix == "ap":
        return _ap_range(low, high, value)
    return (value,)


def _date_leaf(name: str, raw: str) -> Leaf:
    prefix, text = _prefix(raw)
    rng = date_range(text)
    if rng is None:
        raise bad_request(f"'{raw[:80]}' is not a valid date for parameter {name}", expression=[name])
    low, high = rng
    if prefix == "ap":  # R5: about 10% of the distance from now, at least the value's own precision
        gap = abs(datetime.now(UTC) - low)
        delta = gap / 10
        low = max(low - delta, datetime(1, 1, 1, tzinfo=UTC))
        high = min(high + delta, datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))
    return (prefix,), (low, high)


def _token_leaf(name: str, raw: str, modifier: str | None) -> Leaf:
    if modifier == "text":
        text = normalize(unescape(raw))
        escaped = _like_escape(text)
        return ("text",), (escaped + "%", "% " + escaped + "%")
    if modifier == "code-text":
        return ("code-text",), (_like_escape(unescape(raw).lower()) + "%",)
    parts = split_escaped(raw, "|")
    if modifier == "of-type":
        if len(parts) != 3 or not all(parts):
            raise bad_request(f"{name}:of-type needs system|code|value", expression=[name])
        return ("of-type",), tuple(unescape(p) for p in parts)
    if len(parts) == 1:
        return ("code",), (unescape(parts[0]),)
    if len(parts) != 2:
        raise bad_request(f"'{raw[:80]}' is not a valid token for parameter {name}", expression=[name])
    system, code = unescape(parts[0]), unescape(parts[1])
    if not system and not code:
        raise bad_request(f"'{raw[:80]}' is not a valid token for parameter {name}", expression=[name])
    if not system:
        return ("nosys_code",), (code,)
    if not code:
        return ("sys",), (system,)
    return ("sys_code",), (system, code)


def _reference_leaf(
    name: str, param: SearchParam, raw: str, modifier: str | None, target: str | None, base: str | None
) -> Leaf:
    if modifier == "identifier":
        return _token_leaf(name, raw, None)
    value = unescape(raw)
    if base and value.startswith(base.rstrip("/") + "/"):
        value = value[len(base.rstrip("/")) + 1 :]  # an absolute reference to this server is local
    if "://" in value or value.startswith("urn:"):
        url, _, version = value.partition("|")
        if not url:
            raise bad_request(f"'{raw[:80]}' is not a valid reference for {name}", expression=[name])
        return (("url_version",), (url, version)) if version else (("url",), (url,))
    parts = value.split("/")
    if len(parts) == 1:
        if not _ID.match(value):
            raise bad_request(f"'{raw[:80]}' is not a valid reference for {name}", expression=[name])
        return ("id",), (value,)
    ref = parse_reference(value)
    if ref is None or ref.type is None or ref.id is None or len(parts) not in (2, 4):
        raise bad_request(f"'{raw[:80]}' is not a valid reference for {name}", expression=[name])
    if target is not None and ref.type != target:
        raise bad_request(f"{name} names {target} but the value refers to {ref.type}", expression=[name])
    if param.targets and ref.type not in param.targets:
        raise bad_request(f"{param.code} cannot refer to {ref.type}", expression=[name])
    if ref.version:
        return ("type_id_version",), (ref.type, ref.id, ref.version)
    return ("type_id",), (ref.type, ref.id)


def _string_leaf(raw: str, modifier: str | None) -> Leaf:
    text = unescape(raw)
    norm = normalize(text)[:255]
    if modifier == "exact":
        return ("exact",), (norm, text[:255])
    escaped = _like_escape(norm)
    if modifier == "contains":
        return ("contains",), ("%" + escaped + "%",)
    if modifier == "text":
        return ("text",), (escaped + "%", "% " + escaped + "%")
    upper = _next_prefix(norm)
    if upper is None:
        return ("like",), (escaped + "%",)
    return ("start",), (norm, upper)


def _next_prefix(text: str) -> str | None:
    """The smallest string above every string starting with ``text`` (code-point order), or None."""
    last = ord(text[-1])
    if last >= 0x10FFFF or 0xD7FF <= last <= 0xDFFF:
        return None
    return text[:-1] + chr(last + 1)


def _uri_leaf(raw: str, modifier: str | None) -> Leaf:
    text = unescape(raw)
    if modifier == "below":
        upper = _next_prefix(text)
        return (("below",), (text, upper)) if upper else (("like",), (_like_escape(text) + "%",))
    if modifier == "above":
        return ("above",), (text,)
    if modifier == "contains":
        return ("contains",), ("%" + _like_escape(text) + "%",)
    return ("eq",), (text,)


def _quantity_leaf(name: str, raw: str, canonical: bool = True) -> Leaf:
    prefix, rest = _prefix(raw)
    parts = split_escaped(rest, "|")
    if len(parts) not in (1, 3):
        raise bad_request(f"'{raw[:80]}' is not a quantity (number|system|code) for {name}", expression=[name])
    system = unescape(parts[1]) if len(parts) == 3 else ""
    code = unescape(parts[2]) if len(parts) == 3 else ""
    if canonical and system == UCUM and code:
        found = ucum_canonical(code)
        if found is not None:  # compare in canonical units (the index has a row in them)
            factor, unit = found
            return (prefix, "canonical"), (*(v * factor for v in _number_binds(name, prefix, parts[0])), unit)
    binds = _number_binds(name, prefix, parts[0])
    if system and code:
        return (prefix, "sys_code"), (*binds, system, code)
    if code:
        return (prefix, "code"), (*binds, code)
    if system:
        return (prefix, "sys"), (*binds, system)
    return (prefix, "any"), binds


def _number_leaf(name: str, raw: str) -> Leaf:
    prefix, text = _prefix(raw)
    return (prefix,), _number_binds(name, prefix, text)


def _component_leaf(name: str, ptype: str | None, raw: str, base: str | None) -> Leaf:
    if ptype == "token":
        return _token_leaf(name, raw, None)
    if ptype == "reference":
        return _reference_leaf(name, SearchParam(name, "reference", None), raw, None, None, base)
    if ptype == "date":
        return _date_leaf(name, raw)
    if ptype == "quantity":
        return _quantity_leaf(name, raw, canonical=False)  # composites index the value as written
    if ptype == "number":
        return _number_leaf(name, raw)
    if ptype == "string":
        return _string_leaf(raw, None)
    if ptype == "uri":
        return _uri_leaf(raw, None)
    raise Unsupported(f"composite component type {ptype}")


def _composite_leaf(name: str, param: SearchParam, raw: str, base: str | None) -> Leaf:
    comps = param.components
    if len(comps) != 2 or comps[0].type not in ("token", "reference"):
        raise Unsupported(f"composite parameter {param.code} (only two-part composites are searchable)")
    parts = split_escaped(raw, "$")
    if len(parts) != 2 or not all(parts):
        raise bad_request(f"{name} needs two values joined by $", expression=[name])
    a_form, a_binds = _component_leaf(name, comps[0].type, parts[0], base)
    b_form, b_binds = _component_leaf(name, comps[1].type, parts[1], base)
    if a_form[0] not in ("code", "sys_code", "nosys_code", "sys", "id", "type_id"):
        raise bad_request(f"'{parts[0][:80]}' is not usable as the first part of {name}", expression=[name])
    return (a_form, comps[1].type, b_form), (*a_binds, *b_binds)


def _leaves(
    name: str, param: SearchParam, raw: str, modifier: str | None, target: str | None, base: str | None
) -> tuple[Leaf, ...]:
    parts = split_escaped(raw, ",")
    if any(p == "" for p in parts):
        raise bad_request(f"parameter {name} has an empty value", expression=[name])
    if len(parts) > 1 and not param.multiple_or:
        raise bad_request(f"parameter {name} does not allow several values (comma)", expression=[name])
    ptype = param.type
    if ptype == "token":
        return tuple(_token_leaf(name, p, modifier) for p in parts)
    if ptype == "reference":
        return tuple(_reference_leaf(name, param, p, modifier, target, base) for p in parts)
    if ptype == "date":
        return tuple(_date_leaf(name, p) for p in parts)
    if ptype == "string":
        return tuple(_string_leaf(p, modifier) for p in parts)
    if ptype == "quantity":
        return tuple(_quantity_leaf(name, p) for p in parts)
    if ptype == "number":
        return tuple(_number_leaf(name, p) for p in parts)
    if ptype == "uri":
        return tuple(_uri_leaf(p, modifier) for p in parts)
    if ptype == "composite":
        return tuple(_composite_leaf(name, param, p, base) for p in parts)
    raise Unsupported(f"parameter {name} of type {ptype}")


def _searchable(param: SearchParam) -> bool:
    if param.code in _SPECIAL or param.code in TEXT_PARAMS:
        return True
    if not param.expression or param.type == "special" or param.processing_mode == "other":
        return False
    if param.type == "composite":
        comps = param.components
        return len(comps) == 2 and comps[0].type in ("token", "reference") and all(c.expression for c in comps)
    return param.type in SUPPORTED_MODIFIERS


def supported_params(resource_type: str, registry: Registry | None = None) -> list[SearchParam]:
    """The parameters of ``resource_type`` this engine searches, by code (the CapabilityStatement)."""
    params = (registry or default_registry()).params_for(resource_type)
    return [p for code, p in sorted(params.items()) if _searchable(p)]


class _Parser:
    def __init__(self, registry: Registry, base: str | None) -> None:
        self.registry = registry
        self.base = base

    def param(self, resource_type: str, code: str) -> SearchParam | None:
        param = self.registry.get(resource_type, code)
        return param if param is not None and _searchable(param) else None

    def criterion(self, resource_type: str, name: str, raw: str, depth: int = 0) -> Criterion:
        if depth > MAX_DEPTH:
            raise bad_request(f"{name}: chains and _has nest at most {MAX_DEPTH} levels", expression=[name])
        if name.startswith("_has:") or name == "_has":
            return self.has(resource_type, name, raw, depth)
        head, dot, rest = name.partition(".")
        code, _, modifier = head.partition(":")
        if dot:
            return self.chain(resource_type, name, code, modifier or None, rest, raw, depth)
        return self.simple(resource_type, name, code, modifier or None, raw)

    def simple(self, resource_type: str, name: str, code: str, modifier: str | None, raw: str) -> Criterion:
        if code in _SPECIAL:
            return self.special(name, code, modifier, raw)
        if code in TEXT_PARAMS and self.param(resource_type, code) is not None:
            return self.text(name, code, modifier, raw)
        param = self.param(resource_type, code)
        if param is None:
            raise Unsupported(f"unknown search parameter {name} for {resource_type}")
        if modifier == "missing":
            if raw not in ("true", "false"):
                raise bad_request(f"{name} must be true or false", expression=[name])
            return Criterion(name, code, "missing", modifier, ((("missing", param.type, raw == "true"), ()),), param)
        target = None
        if modifier and param.type == "reference" and modifier not in SUPPORTED_MODIFIERS["reference"]:
            target = self.type_modifier(name, param, modifier)
            modifier = None
        elif modifier and modifier not in SUPPORTED_MODIFIERS.get(param.type, frozenset()):
            raise Unsupported(f"modifier :{modifier} on {code}")
        leaves = _leaves(name, param, raw, modifier, target, self.base)
        return Criterion(name, code, param.type, modifier, leaves, param, target=target)

    def special(self, name: str, code: str, modifier: str | None, raw: str) -> Criterion:
        if code == "_id":
            if modifier not in (None, "not"):
                raise Unsupported(f"modifier :{modifier} on _id")
            ids = [unescape(p) for p in split_escaped(raw, ",")]
            if not all(ids):
                raise bad_request(f"parameter {name} has an empty value", expression=[name])
            return Criterion(name, code, "_id", modifier, ((("in",), (ids,)),))
        if modifier is not None:
            raise Unsupported(f"modifier :{modifier} on {code}")
        parts = split_escaped(raw, ",")
        if any(p == "" for p in parts):
            raise bad_request(f"parameter {name} has an empty value", expression=[name])
        return Criterion(name, code, "_lastUpdated", None, tuple(_date_leaf(name, p) for p in parts))

    def text(self, name: str, code: str, modifier: str | None, raw: str) -> Criterion:
        """``_text`` / ``_content``: every word of a value must begin a word of the text."""
        if modifier is not None:
            raise Unsupported(f"modifier :{modifier} on {code}")
        leaves: list[Leaf] = []
        for part in split_escaped(raw, ","):
            found = query_words(unescape(part))
            if not found:
                raise bad_request(f"{name} needs at least one word (letters or digits)", expression=[name])
            leaves.append((("words", len(found)), tuple(like_patterns(found))))
        return Criterion(name, code, "text", None, tuple(leaves))

    def type_modifier(self, name: str, param: SearchParam, modifier: str) -> str:
        if not _TYPE_NAME.match(modifier):
            raise Unsupported(f"modifier :{modifier} on {param.code}")
        if param.targets and modifier not in param.targets:
            raise bad_request(f"{param.code} cannot refer to {modifier}", expression=[name])
        return modifier

    def chain(
        self, resource_type: str, name: str, code: str, modifier: str | None, rest: str, raw: str, depth: int
    ) -> Criterion:
        param = self.param(resource_type, code)
        if param is None or param.type != "reference":
            raise Unsupported(f"{name}: {code} is not a reference parameter of {resource_type}")
        if modifier is not None:
            target = self.type_modifier(name, param, modifier)
            candidates: tuple[str, ...] = (target,)
        else:
            candidates = param.targets or SUPPORTED_TYPES
        inner_code = rest.partition(".")[0].partition(":")[0]
        links: list[tuple[str, Criterion]] = []
        for target_type in sorted(set(candidates)):
            if target_type not in SUPPORTED_TYPES:
                continue
            if (
                inner_code not in _SPECIAL
                and not inner_code.startswith("_has")
                and (self.param(target_type, inner_code) is None)
            ):
                continue
            links.append((target_type, self.criterion(target_type, rest, raw, depth + 1)))
        if not links:
            raise Unsupported(f"{name}: no type {code} may refer to has a parameter {inner_code}")
        return Criterion(name, code, "chain", modifier, (), param, tuple(links), target=modifier)

    def has(self, resource_type: str, name: str, raw: str, depth: int) -> Criterion:
        parts = name.split(":", 3)
        if len(parts) != 4 or not all(parts):
            raise bad_request(f"{name} is not of the form _has:Type:reference:parameter", expression=[name])
        _, source, ref_code, rest = parts
        if source not in SUPPORTED_TYPES:
            raise Unsupported(f"{name}: type {source} is not supported")
        ref = self.param(source, ref_code)
        if ref is None or ref.type != "reference":
            raise Unsupported(f"{name}: {ref_code} is not a reference parameter of {source}")
        if ref.targets and resource_type not in ref.targets:
            raise bad_request(f"{name}: {source}.{ref_code} cannot refer to {resource_type}", expression=[name])
        inner = self.criterion(source, rest, raw, depth + 1)
        return Criterion(name, "_has", "has", None, (), None, ((source, inner),), ref=ref_code)

    def include(self, resource_type: str, name: str, raw: str) -> Include:
        _, _, modifier = name.partition(":")
        reverse = name.startswith("_revinclude")
        if modifier not in ("", "iterate", "recurse"):
            raise Unsupported(f"{name}")
        parts = raw.split(":")
        if raw == "*" and not reverse:
            return Include(resource_type, None, None, bool(modifier), False)
        if len(parts) not in (2, 3) or not all(parts):
            raise bad_request(f"{name}={raw[:80]} is not of the form Type:parameter[:targetType]", expression=[name])
        source, code = parts[0], parts[1]
        target = parts[2] if len(parts) == 3 else None
        if source not in SUPPORTED_TYPES:
            raise Unsupported(f"{name}={raw}: type {source} is not supported")
        if target is not None and target not in SUPPORTED_TYPES:
            raise Unsupported(f"{name}={raw}: type {target} is not supported")
        if code == "*" and not reverse:
            return Include(source, None, target, bool(modifier), False)
        param = self.param(source, code)
        if param is None or param.type != "reference":
            raise Unsupported(f"{name}={raw}: {code} is not a reference parameter of {source}")
        if target is not None and param.targets and target not in param.targets:
            raise bad_request(f"{name}={raw}: {source}.{code} cannot refer to {target}", expression=[name])
        return Include(source, code, target, bool(modifier), reverse)


def parse_search(
    resource_type: str,
    pairs: list[tuple[str, str]],
    *,
    default_count: int = 50,
    max_count: int = 1000,
    strict: bool = False,
    base: str | None = None,
    registry: Registry | None = None,
) -> SearchQuery:
    """Parse search parameters for ``resource_type``; 400 on malformed values (see module doc).
    ``base``: this server's FHIR base URL (absolute references to it count as local)."""
    parser = _Parser(registry or default_registry(), base)
    query = SearchQuery(type=resource_type, count=default_count, registry=registry)
    canonical: list[str] = []

    def unsupported(name: str, exc: Unsupported) -> None:
        if strict:
            raise FhirError(400, "not-supported", str(exc), expression=[name]) from None
        query.ignored.append(name)

    for name, raw in pairs:
        base_name = name.partition(":")[0]
        if base_name in CONTROL:
            try:
                _control(parser, query, name, raw, max_count, strict)
            except Unsupported as exc:
                unsupported(name, exc)
                continue
            if base_name == "_sort":
                canonical.append(f"{name}={raw}")
            continue
        try:
            query.criteria.append(parser.criterion(resource_type, name, raw))
        except Unsupported as exc:
            unsupported(name, exc)
            continue
        canonical.append(f"{name}={raw}")
    if query.summary_count or query.count == 0:
        query.total = True
    query.canonical = "&".join(sorted(canonical))
    return query


def _control(parser: _Parser, query: SearchQuery, name: str, raw: str, max_count: int, strict: bool) -> None:
    base_name, _, modifier = name.partition(":")
    if modifier and base_name not in ("_include", "_revinclude"):
        raise Unsupported(f"{name}")
    if base_name == "_count":
        if not raw.isdigit() or not 0 <= int(raw) <= max_count:
            raise bad_request(f"_count must be an integer from 0 to {max_count}", expression=["_count"])
        query.count = int(raw)
    elif base_name == "_sort":
        query.sort = []
        for key in raw.split(","):
            desc = key.startswith("-")
            code = key[1:] if desc else key
            if code in _SPECIAL:
                query.sort.append(SortKey(code, code, desc))
                continue
            param = parser.param(query.type, code)
            if param is None or param.type not in SORTABLE:
                raise bad_request(f"cannot sort {query.type} by '{code[:64]}'", expression=["_sort"])
            query.sort.append(SortKey(code, param.type, desc))
    elif base_name == "_total":
        if raw not in ("none", "estimate", "accurate"):
            raise bad_request("_total must be none, estimate or accurate", expression=["_total"])
        query.total_mode = raw
        query.total = raw != "none"
    elif base_name == "_summary":
        if raw not in SUMMARY_MODES:
            raise bad_request(f"_summary must be one of {', '.join(SUMMARY_MODES)}", expression=["_summary"])
        query.summary = None if raw == "false" else raw
        query.summary_count = raw == "count"
    elif base_name == "_elements":
        names = [n.strip() for n in raw.split(",") if n.strip()]
        if not names:
            raise bad_request("_elements needs at least one element name", expression=["_elements"])
        known = _element_names(parser.registry, query.type)
        unknown = [n for n in names if n not in known]
        if unknown and strict:
            raise Unsupported(f"_elements names unknown elements of {query.type}: {', '.join(unknown)[:200]}")
        if unknown:
            query.ignored.append("_elements=" + ",".join(unknown))
        query.elements = tuple(n for n in names if n in known)
    elif base_name in ("_include", "_revinclude"):
        query.includes.append(parser.include(query.type, name, raw))
    elif base_name == "_page":
        query.page = raw


def _element_names(registry: Registry, resource_type: str) -> set[str]:
    return {n.removesuffix("[x]") for n in registry.elements(resource_type).all}


# =============================================================================================
# Shapes and bound values


def query_shape(query: SearchQuery) -> Shape:
    """The SQL-relevant structure of ``query``'s criteria: equal shapes compile to the same SQL."""
    return tuple(c.shape for c in query.criteria)


def query_params(query: SearchQuery, facility: str, prefix: str = "c") -> dict[str, Any]:
    """Bound values for :func:`criteria_sql` of this query's shape (names ``{prefix}{i}_...``)."""
    out: dict[str, Any] = {"facility": facility, "type": query.type}
    for i, crit in enumerate(query.criteria):
        crit.bind(f"{prefix}{i}_", out)
    return out


def _like_escape(value: str) -> str:
    return value.replace("/", "//").replace("%", "/%").replace("_", "/_")


# =============================================================================================
# SQL


@dataclass(frozen=True)
class Ctx:
    """Where criteria apply: ``res`` (``resources`` or an alias), the bind holding its type, and
    the grants for the other types searched inside (see :data:`SubPolicies`)."""

    res: Any
    type_: ColumnElement[Any]
    subpolicies: SubPolicies
    ids: Any = None  # the column holding the row's id, when not ``res.c.id`` (index rows' targets)

    @property
    def id(self) -> Any:
        return self.res.c.id if self.ids is None else self.ids


DATE = DateTime(timezone=True)
_STR = String()


def type_value(name: str) -> BindParameter[str]:
    """A type name (from the registry, never from raw input) as a bound value."""
    return literal(name, _STR)


@lru_cache(maxsize=4096)
def criteria_sql(shape: Shape, prefix: str = "c", subpolicies: SubPolicies = ()) -> tuple[ColumnElement[bool], ...]:
    """SQL conditions on ``resources`` (typed by ``:type``) for a query shape: AND of criteria, OR
    within one; every subquery carries ``facility = :facility``. Bind with :func:`query_params`.
    ``subpolicies`` restricts chained/``_has`` searches of other types (default: none granted)."""
    ctx = Ctx(resources, bindparam("type"), subpolicies)
    return tuple(criteria_on(shape, prefix, ctx)) or (true(),)


def criteria_on(shape: Shape, prefix: str, ctx: Ctx, *, drive: bool = True) -> list[ColumnElement[bool]]:
    """Like :func:`criteria_sql` for any :class:`Ctx` (an alias of ``resources`` of a fixed type);
    ``drive=False``: no criterion leads (all are per-row probes, for a filter under an OR)."""
    return pool([(s, f"{prefix}{i}_", ctx) for i, s in enumerate(shape)], drive=drive)


def pool(items: list[tuple[Shape, str, Ctx]], *, drive: bool = True) -> list[ColumnElement[bool]]:
    """AND-ed criteria ``(shape, bind prefix, ctx)``: the one likely to match fewest rows (see
    :func:`drive_rank`) becomes an ``id IN (subquery)`` the database can start from; the others are
    correlated ``EXISTS`` probes of the index per candidate row. (An uncorrelated ``IN`` for every
    criterion made SQLite build the full id list of each — all Observations with a code — per
    query; PostgreSQL plans both forms as semi-joins and reorders them by its estimates.)"""
    ranks = [drive_rank(shape) for shape, _, _ in items]
    lead = None
    if drive:
        candidates = [(r, i) for i, r in enumerate(ranks) if r is not None]
        lead = min(candidates)[1] if candidates else None
    return [_criterion(shape, prefix, ctx, drive=i == lead) for i, (shape, prefix, ctx) in enumerate(items)]


def drive_rank(shape: Shape) -> int | None:
    """How selective a criterion usually is (lower: fewer rows); None for one that never leads
    (negations, ``:missing``, plain column filters)."""
    kind, code, modifier, _target, _ref, leaves, links = shape
    if modifier == "not" or kind in ("missing", "_lastUpdated"):
        return None
    if kind == "_id":
        return 0
    if kind == "reference":
        return 1 if all(f[0] in ("id", "type_id", "type_id_version") for f in leaves) else 4
    if kind == "token":
        return 2 if code == "identifier" or code.endswith("-identifier") else 6
    if kind == "chain":
        inner = [r for _, s in links if (r := drive_rank(s)) is not None]
        return max(inner) + 1 if inner else 8
    if kind == "string":
        return 3 if all(f[0] == "exact" for f in leaves) else 4
    if kind in ("uri", "composite", "text"):
        return 5
    if kind == "has":
        return 8
    return 7  # date, number, quantity


def policy_on(shapes: tuple[Shape, ...] | None, prefix: str, ctx: Ctx) -> list[ColumnElement[bool]]:
    """A grant's groups (``None``: unrestricted) as one condition on ``ctx``; group ``k`` is bound
    with prefix ``{prefix}{k}_`` (values: :func:`query_params` of the group's query)."""
    if shapes is None:
        return []
    inner = Ctx(ctx.res, ctx.type_, None)  # the policy's own criteria are the server's, unrestricted
    groups = [and_(true(), *criteria_on(s, f"{prefix}{k}_", inner, drive=False)) for k, s in enumerate(shapes)]
    return [or_(*groups)]


def subpolicy_prefix(resource_type: str) -> str:
    return f"s{resource_type}"


def _sub_policy(resource_type: str, ctx: Ctx) -> list[ColumnElement[bool]]:
    if ctx.subpolicies is None:
        return []
    for t, shapes in ctx.subpolicies:
        if t == resource_type:
            return policy_on(shapes, subpolicy_prefix(t), ctx)
    return [false()]  # no grant for searching that type: nothing there matches


class _Binds:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, leaf: int, k: int, type_: Any = None) -> BindParameter[Any]:
        return bindparam(f"{self.prefix}{leaf}_{k}", type_=type_)


def _idx(table: Any, code: str, ctx: Ctx, cond: ColumnElement[bool]) -> Any:
    """Ids of ``ctx``'s type whose ``code`` index rows in ``table`` satisfy ``cond``."""
    return (
        select(table.c.id)
        .where(
            table.c.facility == bindparam("facility"),
            table.c.type == ctx.type_,
            table.c.param == literal(code, _STR),
            cond,
        )
        .correlate(None)
    )


_TABLES = {
    "token": idx_token,
    "reference": idx_reference,
    "date": idx_date,
    "string": idx_string,
    "quantity": idx_quantity,
    "number": idx_number,
    "uri": idx_uri,
    "composite": idx_composite,
    "text": idx_text,
}


def _criterion(shape: Shape, prefix: str, ctx: Ctx, *, drive: bool = True) -> ColumnElement[bool]:
    """One criterion on ``ctx.res``: ``drive`` as ``id IN (ids that match)``, else as a correlated
    ``EXISTS`` probe of the index for the row at hand (same meaning)."""
    kind, code, modifier, target, ref, leaves, links = shape
    res = ctx.res
    b = _Binds(prefix)
    cond: ColumnElement[bool]
    if kind == "_id":
        cond = res.c.id.in_(bindparam(f"{prefix}0_0", expanding=True))
        return not_(cond) if modifier == "not" else cond
    if kind == "_lastUpdated":
        col = res.c.last_updated
        return or_(*(_date_cond(col, col, form[0], b, j) for j, form in enumerate(leaves)))
    if kind == "missing":
        (_, ptype, missing) = leaves[0]
        cond = _probe(_TABLES[ptype], code, prefix, ctx, lambda t: true())
        return not_(cond) if missing else cond
    if kind == "chain":
        cond = res.c.id.in_(_chain_ids(code, prefix, links, ctx)) if drive else _chain_probe(code, prefix, links, ctx)
        return cond
    if kind == "has":
        cond = res.c.id.in_(_has_ids(ref, prefix, links, ctx)) if drive else _has_probe(ref, prefix, links, ctx)
        return cond
    table = _TABLES[kind]

    def values(t: Any) -> ColumnElement[bool]:
        return or_(*(_leaf(kind, t, form, b, j, target) for j, form in enumerate(leaves)))

    if drive and modifier != "not":
        cond = res.c.id.in_(_idx(table, code, ctx, values(table)))
        return cond
    cond = _probe(table, code, prefix, ctx, values)
    return not_(cond) if modifier == "not" else cond


def _probe(table: Any, code: str, prefix: str, ctx: Ctx, values: Callable[[Any], ColumnElement[bool]]) -> Any:
    """``EXISTS`` an index row of ``ctx.res``'s row for ``code`` whose values satisfy ``values``."""
    t = table.alias(f"x_{prefix.rstrip('_')}")  # aliased: never correlated with an outer use
    return (
        select(literal(1))
        .where(
            t.c.facility == bindparam("facility"),
            t.c.type == ctx.type_,
            t.c.id == ctx.id,
            t.c.param == literal(code, _STR),
            values(t),
        )
        .correlate(ctx.res)
        .exists()
    )


def _chain_probe(code: str, prefix: str, links: tuple[tuple[str, Shape], ...], ctx: Ctx) -> Any:
    """``EXISTS`` a ``code`` reference of ``ctx.res``'s row to a current resource matching the
    chained criterion (visible under the caller's search grant of its type)."""
    name = prefix.rstrip("_")
    ref = idx_reference.alias(f"cx_{name}")
    per_type = []
    for n, (t, inner) in enumerate(links):
        if _index_only(t, inner, ctx):  # probe the target's index rows, no need to visit it
            probe = _criterion(
                inner, f"{prefix}t{n}_", Ctx(ref, type_value(t), ctx.subpolicies, ref.c.target_id), drive=False
            )
            per_type.append(and_(ref.c.target_type == type_value(t), probe))
            continue
        alias = resources.alias(f"rx_{name}t{n}")
        sub = Ctx(alias, type_value(t), ctx.subpolicies)
        target = (
            select(literal(1))
            .where(
                alias.c.facility == bindparam("facility"),
                alias.c.type == sub.type_,
                alias.c.id == ref.c.target_id,
                alias.c.deleted.is_(False),
                _criterion(inner, f"{prefix}t{n}_", sub, drive=False),
                *_sub_policy(t, sub),
            )
            .correlate(ref)
            .exists()
        )
        per_type.append(and_(ref.c.target_type == type_value(t), target))
    return (
        select(literal(1))
        .where(
            ref.c.facility == bindparam("facility"),
            ref.c.type == ctx.type_,
            ref.c.id == ctx.res.c.id,
            ref.c.param == literal(code, _STR),
            or_(*per_type),
        )
        .correlate(ctx.res)
        .exists()
    )


def _index_only(resource_type: str, inner: Shape, ctx: Ctx) -> bool:
    """Whether ``inner`` on ``resource_type`` can be decided from index rows alone: a positive
    index criterion, and no row restriction of the caller's grant on that type."""
    if inner[0] not in _TABLES or inner[2] == "not":
        return False
    if ctx.subpolicies is None:
        return True
    return any(t == resource_type and shapes is None for t, shapes in ctx.subpolicies)


def _has_probe(ref_code: str, prefix: str, links: tuple[tuple[str, Shape], ...], ctx: Ctx) -> Any:
    """``EXISTS`` a current ``source`` resource (visible under the caller's search grant) matching
    the inner criterion whose ``ref_code`` refers to ``ctx.res``'s row."""
    ((source, inner),) = links
    name = prefix.rstrip("_")
    hs = idx_reference.alias(f"hx_{name}")
    if _index_only(source, inner, ctx):  # the source's index rows are its current version's
        return (
            select(literal(1))
            .where(
                hs.c.facility == bindparam("facility"),
                hs.c.type == type_value(source),
                hs.c.param == literal(ref_code, _STR),
                hs.c.target_type == ctx.type_,
                hs.c.target_id == ctx.res.c.id,
                _criterion(inner, f"{prefix}t0_", Ctx(hs, type_value(source), ctx.subpolicies), drive=False),
            )
            .correlate(ctx.res)
            .exists()
        )
    alias = resources.alias(f"rx_{name}t0")
    sub = Ctx(alias, type_value(source), ctx.subpolicies)
    joined = hs.join(alias, and_(alias.c.facility == hs.c.facility, alias.c.type == hs.c.type, alias.c.id == hs.c.id))
    return (
        select(literal(1))
        .select_from(joined)
        .where(
            hs.c.facility == bindparam("facility"),
            hs.c.type == sub.type_,
            hs.c.param == literal(ref_code, _STR),
            hs.c.target_type == ctx.type_,
            hs.c.target_id == ctx.res.c.id,
            alias.c.deleted.is_(False),
            _criterion(inner, f"{prefix}t0_", sub, drive=False),
            *_sub_policy(source, sub),
        )
        .correlate(ctx.res)
        .exists()
    )


def _target_ids(resource_type: str, inner: Shape, prefix: str, ctx: Ctx) -> Any:
    """Ids of current ``resource_type`` resources matching ``inner`` that the caller may search."""
    alias = resources.alias(f"r_{prefix.rstrip('_')}")
    sub = Ctx(alias, type_value(resource_type), ctx.subpolicies)
    policy = _sub_policy(resource_type, sub)
    kind = inner[0]
    if not policy and kind in _TABLES and inner[2] != "not":
        # a positive index criterion without a row restriction: its index rows name exactly the
        # current resources that match (deleted ones have none), no need to visit resources
        return _direct_ids(inner, prefix, sub)
    return (
        select(alias.c.id)
        .where(
            alias.c.facility == bindparam("facility"),
            alias.c.type == sub.type_,
            alias.c.deleted.is_(False),
            _criterion(inner, prefix, sub),
            *policy,
        )
        .correlate(None)
    )


def _direct_ids(shape: Shape, prefix: str, ctx: Ctx) -> Any:
    kind, code, _modifier, target, _ref, leaves, _links = shape
    table = _TABLES[kind]
    b = _Binds(prefix)
    return _idx(table, code, ctx, or_(*(_leaf(kind, table, form, b, j, target) for j, form in enumerate(leaves))))


def _chain_ids(code: str, prefix: str, links: tuple[tuple[str, Shape], ...], ctx: Ctx) -> Any:
    ref = idx_reference.alias(f"ch_{prefix.rstrip('_')}")
    per_type = [
        and_(ref.c.target_type == type_value(t), ref.c.target_id.in_(_target_ids(t, inner, f"{prefix}t{n}_", ctx)))
        for n, (t, inner) in enumerate(links)
    ]
    return (
        select(ref.c.id)
        .where(
            ref.c.facility == bindparam("facility"),
            ref.c.type == ctx.type_,
            ref.c.param == literal(code, _STR),
            or_(*per_type),
        )
        .correlate(None)
    )


def _has_ids(ref_code: str, prefix: str, links: tuple[tuple[str, Shape], ...], ctx: Ctx) -> Any:
    ((source, inner),) = links
    ref = idx_reference.alias(f"hs_{prefix.rstrip('_')}")
    return (
        select(ref.c.target_id)
        .where(
            ref.c.facility == bindparam("facility"),
            ref.c.type == type_value(source),
            ref.c.param == literal(ref_code, _STR),
            ref.c.target_type == ctx.type_,
            ref.c.id.in_(_target_ids(source, inner, f"{prefix}t0_", ctx)),
        )
        .correlate(None)
    )


def _token_cond(system: Any, code: Any, form: tuple[Any, ...], b: Callable[[int], Any]) -> ColumnElement[bool]:
    """A token value form (``code``, ``sys_code``, ``nosys_code``, ``sys``) on two columns; binds
    from ``b(0)``."""
    f = form[0]
    if f == "code":
        return code == b(0)  # type: ignore[no-any-return]
    if f == "sys_code":
        return and_(code == b(1), system == b(0))
    if f == "nosys_code":
        return and_(code == b(0), system.is_(None))
    return system == b(0)  # type: ignore[no-any-return]


def _ref_cond(t: Any, form: tuple[Any, ...], b: Callable[[int], Any], target: str | None) -> ColumnElement[bool]:
    f = form[0]
    if f == "id":
        cond: ColumnElement[bool] = t.c.target_id == b(0)
        return and_(cond, t.c.target_type == type_value(target)) if target else cond
    if f == "type_id":
        return and_(t.c.target_id == b(1), t.c.target_type == b(0))
    if f == "type_id_version":
        return and_(t.c.target_id == b(1), t.c.target_type == b(0), t.c.version == b(2))
    if f == "url":
        return t.c.url == b(0)  # type: ignore[no-any-return]
    if f == "url_version":
        return and_(t.c.url == b(0), t.c.version == b(1))
    return _token_cond(t.c.identifier_system, t.c.identifier_value, form, b)  # :identifier


def _string_cond(col: Any, exact: Any, form: tuple[Any, ...], b: Callable[[int], Any]) -> ColumnElement[bool]:
    f = form[0]
    if f == "start":
        return and_(col >= b(0), col < b(1))
    if f == "exact":
        cond: ColumnElement[bool] = col == b(0)
        return and_(cond, exact == b(1)) if exact is not None else cond
    if f == "text":
        return or_(col.like(b(0), escape="/"), col.like(b(1), escape="/"))
    return col.like(b(0), escape="/")  # type: ignore[no-any-return]  # like / contains


def _number_cond(low: Any, high: Any, prefix: str, b: Callable[[int], Any]) -> ColumnElement[bool]:
    """R5 number/quantity prefixes against a stored ``[low, high]`` (NULL = open end); the search
    value's precision range is ``[b(0), b(1))`` for eq/ne/ap, the value itself ``b(0)`` otherwise."""
    if prefix == "eq":
        return and_(low >= b(0), high < b(1))
    if prefix == "ne":
        return or_(low < b(0), high >= b(1), low.is_(None), high.is_(None))
    if prefix == "ap":
        return and_(or_(low <= b(1), low.is_(None)), or_(high >= b(0), high.is_(None)))
    v = b(0)
    if prefix == "gt":
        return or_(high > v, high.is_(None))
    if prefix == "ge":
        return or_(high >= v, high.is_(None))
    if prefix == "lt":
        return or_(low < v, low.is_(None))
    if prefix == "le":
        return or_(low <= v, low.is_(None))
    if prefix == "sa":
        return low > v  # type: ignore[no-any-return]
    return high < v  # type: ignore[no-any-return]  # eb


def _date_cond(low: Any, high: Any, prefix: str, b: _Binds, j: int) -> ColumnElement[bool]:
    """R5 date semantics: the resource's range [low, high] against the value's [vlo, vhi]."""
    vlo, vhi = b(j, 0, DATE), b(j, 1, DATE)
    if prefix == "eq":
        return and_(low >= vlo, high <= vhi)
    if prefix == "ne":
        return or_(low < vlo, high > vhi)
    if prefix == "gt":
        return high > vhi  # type: ignore[no-any-return]
    if prefix == "sa":
        return low > vhi  # type: ignore[no-any-return]
    if prefix == "lt":
        return low < vlo  # type: ignore[no-any-return]
    if prefix == "eb":
        return high < vlo  # type: ignore[no-any-return]
    if prefix == "ap":
        return and_(low <= vhi, high >= vlo)
    within = and_(low >= vlo, high <= vhi)
    if prefix == "ge":
        return or_(high > vhi, within)
    return or_(low < vlo, within)  # le


def _offset(b: _Binds, j: int, start: int, type_: Any = None) -> Callable[[int], Any]:
    return lambda k: b(j, start + k, type_)


_UNIT_BINDS = {"sys_code": 2, "code": 1, "sys": 1, "any": 0, "canonical": 1}


def _number_binds_count(prefix: str) -> int:
    return 2 if prefix in ("eq", "ne", "ap") else 1


def _quantity_cond(
    system: Any, code: Any, unit: Any, low: Any, high: Any, form: tuple[Any, ...], b: _Binds, j: int, start: int = 0
) -> ColumnElement[bool]:
    prefix, unit_form = form
    n = _number_binds_count(prefix)
    cond = _number_cond(low, high, prefix, _offset(b, j, start, NUMBER))
    u = _offset(b, j, start + n)
    if unit_form == "canonical":  # only the rows in canonical UCUM units
        return and_(cond, code == u(0), system == literal(UCUM_CANONICAL, _STR))
    if unit is not None:  # idx_quantity: leave its canonical-unit rows to canonical searches
        cond = and_(cond, or_(system.is_(None), system != literal(UCUM_CANONICAL, _STR)))
    if unit_form == "sys_code":
        return and_(cond, code == u(1), system == u(0))
    if unit_form == "code":
        return and_(cond, or_(code == u(0), unit == u(0)) if unit is not None else code == u(0))
    if unit_form == "sys":
        return and_(cond, system == u(0))
    return cond


def _form_binds(ptype: str, form: tuple[Any, ...]) -> int:
    """How many bound values a composite component's form takes."""
    if ptype == "quantity":
        return _number_binds_count(form[0]) + _UNIT_BINDS[form[1]]
    if ptype == "number":
        return _number_binds_count(form[0])
    if ptype == "date":
        return 2
    return {"sys_code": 2, "type_id": 2, "type_id_version": 3, "url_version": 2, "of-type": 3}.get(form[0], 1) + (
        1 if form[0] in ("start", "exact", "text") else 0
    )


def _composite_cond(t: Any, form: tuple[Any, ...], b: _Binds, j: int) -> ColumnElement[bool]:
    a_form, b_type, b_form = form
    if a_form[0] in ("id", "type_id"):
        a_cond = t.c.a_code == b(j, 0) if a_form[0] == "id" else and_(t.c.a_system == b(j, 0), t.c.a_code == b(j, 1))
    else:
        a_cond = _token_cond(t.c.a_system, t.c.a_code, a_form, _offset(b, j, 0))
    start = _form_binds("token", a_form)
    bb = _offset(b, j, start)
    second: ColumnElement[bool]
    if b_type in ("token", "reference"):
        if b_form[0] in ("id", "type_id"):
            second = t.c.b_code == bb(0) if b_form[0] == "id" else and_(t.c.b_system == bb(0), t.c.b_code == bb(1))
        else:
            second = _token_cond(t.c.b_system, t.c.b_code, b_form, bb)
    elif b_type == "quantity":
        second = _quantity_cond(t.c.b_system, t.c.b_code, None, t.c.b_low, t.c.b_high, b_form, b, j, start)
    elif b_type == "number":
        second = _number_cond(t.c.b_low, t.c.b_high, b_form[0], _offset(b, j, start, NUMBER))
    elif b_type == "date":
        second = _date_cond(t.c.b_low_date, t.c.b_high_date, b_form[0], _Shifted(b, start), j)
    elif b_type == "string":
        second = _string_cond(t.c.b_text, None, b_form, bb)
    else:  # uri
        second = t.c.b_code == bb(0)
    return and_(a_cond, second)


class _Shifted(_Binds):
    def __init__(self, b: _Binds, start: int) -> None:
        super().__init__(b.prefix)
        self.start = start

    def __call__(self, leaf: int, k: int, type_: Any = None) -> BindParameter[Any]:
        return super().__call__(leaf, self.start + k, type_)


def _leaf(kind: str, t: Any, form: tuple[Any, ...], b: _Binds, j: int, target: str | None) -> ColumnElement[bool]:
    """One value of a criterion on index table ``t``; its binds are ``b(j, 0)``, ``b(j, 1)``..."""
    bj = _offset(b, j, 0)
    if kind == "token":
        f = form[0]
        if f == "text":
            return or_(t.c.text.like(bj(0), escape="/"), t.c.text.like(bj(1), escape="/"))
        if f == "code-text":
            return func.lower(t.c.code).like(bj(0), escape="/")
        if f == "of-type":
            return and_(t.c.code == bj(2), t.c.type_system == bj(0), t.c.type_code == bj(1))
        return _token_cond(t.c.system, t.c.code, form, bj)
    if kind == "reference":
        return _ref_cond(t, form, bj, target)
    if kind == "date":
        return _date_cond(t.c.low, t.c.high, form[0], b, j)
    if kind == "string":
        return _string_cond(t.c.value, t.c.exact, form, bj)
    if kind == "quantity":
        return _quantity_cond(t.c.system, t.c.code, t.c.unit, t.c.low, t.c.high, form, b, j)
    if kind == "number":
        return _number_cond(t.c.low, t.c.high, form[0], _offset(b, j, 0, NUMBER))
    if kind == "text":
        return and_(*(t.c.value.like(bj(k), escape="/") for k in range(form[1])))
    if kind == "uri":
        f = form[0]
        if f == "eq":
            return t.c.value == bj(0)  # type: ignore[no-any-return]
        if f == "below":
            return and_(t.c.value >= bj(0), t.c.value < bj(1))
        if f == "above":
            probe = b(j, 0, _STR)
            return func.substr(probe, 1, func.length(t.c.value)) == t.c.value  # type: ignore[no-any-return]
        return t.c.value.like(bj(0), escape="/")  # type: ignore[no-any-return]
    return _composite_cond(t, form, b, j)


# =============================================================================================
# Helpers for other modules


def grant_params(queries: Iterable[SearchQuery], facility: str, prefix: str) -> dict[str, Any]:
    """Bound values of a grant's groups for :func:`policy_on` with ``prefix`` (``{prefix}{k}_``),
    without the ``facility``/``type`` keys of :func:`query_params`."""
    out: dict[str, Any] = {}
    for k, q in enumerate(queries):
        for key, value in query_params(q, facility, f"{prefix}{k}_").items():
            if key not in ("facility", "type"):
                out[key] = value
    return out


def describe(query: SearchQuery) -> Mapping[str, Any]:
    """A JSON-friendly summary of a parsed query (debugging, tests)."""
    return {
        "type": query.type,
        "criteria": [c.name for c in query.criteria],
        "sort": [(s.code, s.descending) for s in query.sort],
        "includes": [(i.source, i.code, i.target, i.iterate, i.reverse) for i in query.includes],
        "ignored": list(query.ignored),
    }


ONE_DAY = timedelta(days=1)
