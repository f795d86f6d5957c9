"""A facility's own search parameters: SearchParameter resources posted at runtime.

Contract
--------
* Tenancy: a SearchParameter resource belongs to the facility that stored it (like every
  resource). While its ``status`` is ``active`` it extends *that facility's* registry only: its
  resources are indexed with it on every write, and its searches (also chains, ``_has``,
  ``_sort``, ``_include``) may use it. The official R5 parameters (``search_registry.json``) are
  global and cannot be redefined: a custom code may not clash with a built-in or common one of any
  of its base types. Another facility neither sees the resource nor can use the parameter.
* :func:`facility_registry` gives the registry of one facility inside the caller's transaction:
  the process-wide :func:`~.registry.default_registry` when the facility has no SearchParameter
  resources, else a :meth:`~.registry.Registry.derive`-d one with its active definitions. Every
  call asks the store for the facility's *stamp* (count and sum of versions of its SearchParameter
  rows: every create, update or delete raises the sum), one small indexed query, and rebuilds only
  when the stamp (or the process-wide registry's generation) moved. So separate processes (edge,
  subgraphs, CLI) pick up a change with their next transaction after its commit; no process-local
  state decides anything.
* :func:`apply_definitions` runs in the write path for a batch holding SearchParameter changes,
  under the facility's definitions lock: each ``active`` definition is validated (400 ``invalid``
  or ``not-supported``, nothing stored): url, code, base and type present; base types this server
  stores; type one of number, date, string, token, reference, quantity, uri, or a two-part
  composite whose first part is a token or reference and whose components name known definitions;
  code a plain name that clashes with no built-in parameter of its bases and no other active one of
  the facility; url not an official one nor another active one's; an expression that parses and
  evaluates (FHIRPath, fhirpathpy) and has a branch for each base. Drafts, retired and unknown
  definitions are stored as documents and do nothing. When a definition stops being active, or
  changes, the index rows of its old code are deleted from its base types (stale rows never
  answer a search); a new or changed definition covers resources written from then on, and
  ``unihealth reindex`` (or :func:`~.engine.reindex`) brings older ones in. It returns the
  registry the batch's other resources are indexed with.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, delete, func, literal, select

from . import fhirjson
from .crypto import reveal
from .database import SqlConnection
from .errors import FhirError
from .extract import compile_param
from .records import Change
from .registry import Registry, SearchParam, default_registry, param_from_resource, restrict_expression
from .schema import INDEX_TABLES, resources
from .validation import SUPPORTED_TYPES, validate

log = logging.getLogger(__name__)

KIND = "SearchParameter"
CUSTOM_TYPES = frozenset({"number", "date", "string", "token", "reference", "quantity", "uri", "composite"})
_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9\-]{0,63}$")
CACHE_SIZE = 1024

Stamp = tuple[int, int, int]  # (count, sum of versions, process registry generation)
Definitions = dict[str, SearchParam]  # resource id → active definition


def _invalid(diagnostics: str, element: str, code: str = "invalid") -> FhirError:
    return FhirError(400, code, diagnostics, expression=[f"SearchParameter.{element}"])


# ------------------------------------------------------------------------------------- statements


@lru_cache(maxsize=1)
def _stamp_statement() -> Any:
    return select(func.count(), func.coalesce(func.sum(resources.c.version), 0)).where(
        resources.c.facility == bindparam("facility"), resources.c.type == literal(KIND)
    )


@lru_cache(maxsize=1)
def _definitions_statement() -> Any:
    return select(resources.c.id, resources.c.content).where(
        resources.c.facility == bindparam("facility"),
        resources.c.type == literal(KIND),
        resources.c.deleted.is_(False),
    )


async def _stamp(conn: SqlConnection, facility: str, base: Registry) -> Stamp:
    row: Sequence[Any] = (await conn.execute(_stamp_statement(), {"facility": facility})).one()
    return int(row[0]), int(row[1]), base.generation


async def _load(conn: SqlConnection, facility: str, base: Registry) -> Definitions:
    """The facility's active definitions as stored (each was validated when written)."""
    out: Definitions = {}
    for row in await conn.execute(_definitions_statement(), {"facility": facility}):
        doc = fhirjson.loads(reveal(KIND, row.id, row.content))
        if doc.get("status") != "active":
            continue
        try:
            out[row.id] = param_from_resource(doc, base)
        except ValueError as exc:  # validated at write; a definition the code no longer accepts is skipped
            log.warning("facility %s: SearchParameter/%s is not usable: %s", facility, row.id, exc)
    return out


# ------------------------------------------------------------------------------------- the cache

_cache: OrderedDict[str, tuple[Stamp, Registry]] = OrderedDict()
_cache_lock = threading.Lock()


def _derive(base: Registry, definitions: Iterable[SearchParam]) -> Registry:
    params = list(definitions)
    return base.derive(params) if params else base


async def facility_registry(conn: SqlConnection, facility: str) -> Registry:
    """The registry of ``facility`` as committed (see the module docstring)."""
    base = default_registry()
    stamp = await _stamp(conn, facility, base)
    if stamp[0] == 0:
        return base
    with _cache_lock:
        hit = _cache.get(facility)
        if hit is not None and hit[0] == stamp:
            _cache.move_to_end(facility)
            return hit[1]
    registry = _derive(base, (await _load(conn, facility, base)).values())
    with _cache_lock:
        _cache[facility] = (stamp, registry)
        _cache.move_to_end(facility)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return registry


# ------------------------------------------------------------------------------------- validation


def syntax_error(expression: str) -> str | None:
    """Why ``expression`` is not FHIRPath by the grammar fhirpathpy uses (its own parser recovers
    from syntax errors silently), or None. The whole text must be one expression."""
    antlr: Any = importlib.import_module("antlr4")
    listeners: Any = importlib.import_module("antlr4.error.ErrorListener")
    lexer_mod: Any = importlib.import_module("fhirpathpy.parser.generated.FHIRPathLexer")
    parser_mod: Any = importlib.import_module("fhirpathpy.parser.generated.FHIRPathParser")
    problems: list[str] = []

    class Collect(listeners.ErrorListener):  # type: ignore[misc]
        def syntaxError(self, recognizer: Any, offending: Any, line: int, column: int, msg: str, e: Any) -> None:
            problems.append(f"column {column + 1}: {msg}")

    lexer = lexer_mod.FHIRPathLexer(antlr.InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(Collect())
    tokens = antlr.CommonTokenStream(lexer)
    parser = parser_mod.FHIRPathParser(tokens)
    parser.removeErrorListeners()
    parser.addErrorListener(Collect())
    try:
        parser.expression()
    except Exception as exc:  # the generated parser may also raise on input it cannot recover from
        problems.append(str(exc)[:200] or type(exc).__name__)
    if not problems and tokens.LA(1) != antlr.Token.EOF:
        problems.append(f"unexpected text after the expression: {tokens.LT(1).text!s:.40}")
    return problems[0] if problems else None


def _check_expression(param: SearchParam, registry: Registry, resource_type: str, element: str) -> None:
    """400 unless the (restricted) expression compiles and evaluates on an empty ``resource_type``
    with fhirpathpy and with the fast path."""
    restricted = registry.get(resource_type, param.code)
    if restricted is None or restricted.expression is None:
        raise _invalid(f"the expression of {param.code} selects nothing from {resource_type}", element)
    stub = {"resourceType": resource_type, "id": "x"}
    try:
        for fast in (True, False):
            compile_param(restricted, fast).values(stub)
    except Exception as exc:  # fhirpathpy reports bad expressions with assorted exception types
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise _invalid(f"the expression of {param.code} is not valid FHIRPath: {reason}", element) from None


def _check_composite(resource: Mapping[str, Any], param: SearchParam) -> None:
    comps = param.components
    declared = resource.get("component") or ()
    if len(comps) != 2 or len(declared) != 2:
        raise _invalid(f"composite {param.code} must have exactly two components", "component", "not-supported")
    for i, comp in enumerate(comps):
        if comp.type is None:
            raise _invalid(f"component {i + 1} of {param.code} names an unknown definition", f"component[{i}]")
        if not comp.expression:
            raise _invalid(f"component {i + 1} of {param.code} has no expression", f"component[{i}]")
        if comp.type in ("composite", "special"):
            raise _invalid(f"component {i + 1} of {param.code} is {comp.type}", f"component[{i}]", "not-supported")
    if comps[0].type not in ("token", "reference"):
        raise _invalid(
            f"the first component of {param.code} must be a token or reference", "component[0]", "not-supported"
        )


def validate_definition(resource: Mapping[str, Any], others: Definitions, base: Registry) -> SearchParam:
    """The :class:`SearchParam` of an ``active`` SearchParameter resource, or 400 (see the module
    docstring). ``others``: the facility's other active definitions (by resource id)."""
    for element in ("url", "code", "base", "type"):
        if not resource.get(element):
            raise _invalid(f"an active SearchParameter needs {element}", element)
    ptype = resource.get("type")
    if ptype not in CUSTOM_TYPES:
        raise _invalid(f"search parameters of type {ptype!s:.40} are not supported", "type", "not-supported")
    code = str(resource["code"])
    if not _CODE.match(code):
        raise _invalid(f"'{code[:64]}' is not a usable code (a letter, then letters, digits or -)", "code")
    bases = [str(b) for b in resource["base"]]
    unknown = [b for b in bases if b not in SUPPORTED_TYPES]
    if unknown:
        raise _invalid(f"base types not stored by this server: {', '.join(unknown)[:200]}", "base", "not-supported")
    if resource.get("processingMode", "normal") not in ("normal", "phonetic"):
        raise _invalid("only processingMode normal or phonetic is supported", "processingMode", "not-supported")
    if not resource.get("expression"):
        raise _invalid(f"{code} has no expression to index", "expression")
    clash = [b for b in bases if code in base.builtin_codes(b)]
    if clash:
        raise _invalid(f"{code} is a built-in search parameter of {', '.join(clash)}", "code")
    url = str(resource["url"])
    official = base.by_url(url)
    if official is not None:
        raise _invalid(f"{url[:200]} is the url of the built-in parameter {official.code}", "url")
    for other in others.values():
        if other.url == url:
            raise _invalid(f"another active SearchParameter of this facility has the url {url[:200]}", "url")
        if other.code == code and set(other.base) & set(bases):
            raise _invalid(f"another active SearchParameter of this facility has the code {code}", "code")
    for text in [resource["expression"], *(c.get("expression", "") for c in resource.get("component") or ())]:
        problem = syntax_error(str(text)) if text else None
        if problem is not None:
            raise _invalid(f"'{str(text)[:100]}' is not valid FHIRPath: {problem}", "expression")
    extended = _derive(base, others.values())
    try:
        param = param_from_resource(resource, extended)
        registry = extended.derive([param])
    except ValueError as exc:
        raise _invalid(str(exc)[:300], "code") from None
    if param.type == "composite":
        _check_composite(resource, param)
    for b in bases:
        if restrict_expression(param.expression, b, keep_relative=len(bases) <= 1) is None:
            raise _invalid(f"the expression of {code} has no branch for base {b}", "expression")
        _check_expression(param, registry, b, "expression")
    return param


# ------------------------------------------------------------------------------------- the write hook


async def forget(conn: SqlConnection, facility: str, param: SearchParam) -> None:
    """Delete the index rows of ``param``'s code from its base types in ``facility``."""
    for table in INDEX_TABLES.values():
        await conn.execute(
            delete(table).where(
                table.c.facility == facility,
                table.c.type.in_(list(param.base)),
                table.c.param == param.code,
            )
        )


async def apply_definitions(conn: SqlConnection, facility: str, changes: Sequence[Change]) -> Registry:
    """Validate the SearchParameter changes of a batch against the facility's stored definitions
    (the caller holds the facility's definitions lock), drop the index rows of definitions that stop
    being active or change, and return the registry the batch is indexed with."""
    base = default_registry()
    definitions = await _load(conn, facility, base)
    for change in changes:
        if change.type != KIND:
            continue
        old = definitions.pop(change.id, None)
        new = None
        if change.body is not None and change.body.get("status") == "active":
            validate(KIND, change.body)  # R5 shape first: the checks below read typed elements
            new = validate_definition(change.body, definitions, base)
            definitions[change.id] = new
        if old is not None and old != new:
            await forget(conn, facility, old)
    return _derive(base, definitions.values())
