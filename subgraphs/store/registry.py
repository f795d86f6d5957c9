"""The FHIR R5 SearchParameter registry: which search parameters each resource type has.

Contract
--------
* :func:`default_registry` returns the process-wide :class:`Registry` built from
  ``search_registry.json`` (generated from the official ``hl7.fhir.r5.core@5.0.0`` definitions by
  ``scripts/generate_search_registry.py``; never edit it by hand). The file is read on the first
  call, never at import time; later calls return the same object.
* :meth:`Registry.params_for` maps a parameter code to its :class:`SearchParam` for one resource
  type: the type's own parameters, the common ``Resource``/``DomainResource`` ones (``_id``,
  ``_lastUpdated``, ``_tag``...), and any custom parameter added with :meth:`Registry.add`. Every
  ``expression`` it hands out is *restricted* to that type (see :func:`restrict_expression`): only
  the union branches rooted at the type (or at ``Resource``/``DomainResource``, re-rooted to it) are
  kept, so ``AllergyIntolerance.patient | CarePlan.subject.where(resolve() is Patient) | ...`` becomes
  ``AllergyIntolerance.patient`` for AllergyIntolerance. A parameter with no expression (``_has``,
  ``_text``, ``Medication-form``...) has ``expression is None``: it is searchable only by special
  handling, never indexed.
* Custom SearchParameter resources (posted at runtime) enter through :meth:`Registry.add` (or
  :func:`param_from_resource` for the raw JSON); they take precedence over a built-in parameter of
  the same code for their base types. Adding is thread-safe; readers see either the old or the new
  mapping, never a partial one. A reindex of stored resources is the caller's job. A facility's
  own parameters live in a :meth:`Registry.derive`-d registry (see :mod:`.search_custom`), never
  in the process-wide one.
* Objects handed out are immutable (frozen dataclasses, tuples); :meth:`Registry.params_for` returns
  a fresh ``dict`` the caller may keep or change.
* :meth:`Registry.compartment` gives the parameters that put a type in the R5 Patient compartment
  (``{def}`` = the Patient itself); :meth:`Registry.elements` the top-level elements of a type (all,
  summary, mandatory; choice elements as ``value[x]``) for ``_summary`` and ``_elements``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from typing import Any, Literal, cast, get_args

ParamType = Literal["number", "date", "string", "token", "reference", "composite", "quantity", "uri", "special"]
PARAM_TYPES: frozenset[str] = frozenset(get_args(ParamType))

#: Modifiers the R5 search page allows per parameter type (search.html, "Modifiers"). The 5.0.0
#: definitions leave ``SearchParameter.modifier`` empty, so the generator fills it from this table.
SPEC_MODIFIERS: dict[str, tuple[str, ...]] = {
    "number": ("missing",),
    "date": ("missing",),
    "string": ("contains", "exact", "missing", "text"),
    "token": ("above", "below", "code-text", "in", "missing", "not", "not-in", "of-type", "text", "text-advanced"),
    "reference": ("above", "below", "code-text", "identifier", "missing", "text", "text-advanced", "type"),
    "composite": ("missing",),
    "quantity": ("missing",),
    "uri": ("above", "below", "contains", "missing"),
    "special": (),
}

#: Roots that stand for "any resource" in an expression (``Resource.id``, ``DomainResource.text``).
GENERIC_ROOTS = ("Resource", "DomainResource")


@dataclass(frozen=True, slots=True)
class Component:
    """One part of a composite parameter: the referenced definition and the expression, relative
    to each item the composite's own expression selects."""

    definition: str
    code: str | None
    type: ParamType | None
    expression: str


@dataclass(frozen=True, slots=True)
class Elements:
    """The top-level elements of a resource type (from its StructureDefinition): every name,
    those marked ``isSummary`` and those with ``min >= 1``; choice elements end in ``[x]``."""

    all: tuple[str, ...] = ()
    summary: tuple[str, ...] = ()
    mandatory: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SearchParam:
    """One search parameter as it applies to a resource type (or, for custom ones, to ``base``).

    ``targets`` lists the resource types a reference may point to (empty: any); ``modifiers`` and
    ``comparators`` what the definition (or the R5 search page) allows; ``components`` is non-empty
    only for composites. ``multiple_or``/``multiple_and`` are ``False`` only where the definition
    says so. ``processing_mode`` is ``normal``, ``phonetic`` or ``other`` (R5 SearchParameter).
    """

    code: str
    type: ParamType
    expression: str | None
    targets: tuple[str, ...] = ()
    modifiers: tuple[str, ...] = ()
    comparators: tuple[str, ...] = ()
    components: tuple[Component, ...] = ()
    url: str = ""
    base: tuple[str, ...] = ()
    multiple_or: bool = True
    multiple_and: bool = True
    processing_mode: str = "normal"


# ---------------------------------------------------------------------------------------------
# Expression restriction (shared with the generator script)


def split_union(expression: str) -> list[str]:
    """The top-level ``|`` branches of ``expression`` (not inside parentheses, brackets or string
    literals), stripped of surrounding whitespace."""
    out: list[str] = []
    depth = 0
    quote: str | None = None
    start = 0
    i = 0
    while i < len(expression):
        ch = expression[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'`\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "|" and depth == 0:
            out.append(expression[start:i].strip())
            start = i + 1
        i += 1
    out.append(expression[start:].strip())
    return [b for b in out if b]


_ROOT = re.compile(r"^\(*\s*([A-Za-z][A-Za-z0-9_]*)(?![A-Za-z0-9_(])")


def branch_root(branch: str) -> str | None:
    """The capitalized identifier a branch starts from (``(Patient.deceased...)`` → ``Patient``),
    or ``None`` for a relative branch (``code``, ``value.ofType(Quantity)``)."""
    m = _ROOT.match(branch)
    if m is None or not m.group(1)[0].isupper():
        return None
    return m.group(1)


def restrict_expression(expression: str | None, resource_type: str, *, keep_relative: bool = True) -> str | None:
    """``expression`` restricted to ``resource_type``: the union branches rooted at it, those rooted
    at ``Resource``/``DomainResource`` re-rooted to it, and relative branches (``id``) only when
    ``keep_relative`` — pass ``False`` for a definition with several bases, where a relative branch
    cannot be attributed (R5 ``clinical-date`` has ``(start | requestedPeriod.start).first()`` for
    Appointment). ``None`` when no branch applies (or there is no expression). Idempotent."""
    if not expression:
        return None
    kept: list[str] = []
    for branch in split_union(expression):
        root = branch_root(branch)
        if (root is None and keep_relative) or root == resource_type:
            kept.append(branch)
        elif root in GENERIC_ROOTS:
            m = _ROOT.match(branch)
            assert m is not None
            kept.append(branch[: m.start(1)] + resource_type + branch[m.end(1) :])
    return " | ".join(kept) if kept else None


# ---------------------------------------------------------------------------------------------
# The registry


class Registry:
    """Search parameters per resource type: built-in ones (from the generated file) plus custom
    ones added at runtime. See the module docstring for the contract."""

    def __init__(
        self,
        by_type: Mapping[str, Mapping[str, SearchParam]],
        common: Mapping[str, SearchParam] | None = None,
        *,
        source: str = "",
        compartments: Mapping[str, Mapping[str, Iterable[str]]] | None = None,
        elements: Mapping[str, Elements] | None = None,
    ) -> None:
        self.source = source
        self._compartments = {
            name: {t: tuple(ps) for t, ps in members.items()} for name, members in (compartments or {}).items()
        }
        self._elements = dict(elements or {})
        self._lock = threading.Lock()
        self._builtin = {t: dict(ps) for t, ps in by_type.items()}
        self._common = dict(common or {})
        self._custom: dict[str, SearchParam] = {}  # url → param
        self._views: dict[str, dict[str, SearchParam]] = {}
        self._generation = 0

    @property
    def generation(self) -> int:
        """Bumped by every :meth:`add`; callers may key caches on it."""
        return self._generation

    def resource_types(self) -> tuple[str, ...]:
        """The resource types with built-in parameters, sorted."""
        return tuple(sorted(self._builtin))

    def params_for(self, resource_type: str) -> dict[str, SearchParam]:
        """Every parameter of ``resource_type`` by code, expressions restricted to the type. Empty
        for a type the registry does not know (neither built in nor named by a custom parameter's
        base): common parameters apply only to known types."""
        view = self._views.get(resource_type)
        if view is None:
            with self._lock:
                view = self._build_view(resource_type)
                self._views[resource_type] = view
        return dict(view)

    def compartment(self, resource_type: str, compartment: str = "Patient") -> tuple[str, ...]:
        """The parameters of ``resource_type`` that link it to ``compartment`` (empty: not in it)."""
        return self._compartments.get(compartment, {}).get(resource_type, ())

    def compartment_types(self, compartment: str = "Patient") -> tuple[str, ...]:
        """The resource types in ``compartment``, sorted."""
        return tuple(sorted(self._compartments.get(compartment, {})))

    def elements(self, resource_type: str) -> Elements:
        """The top-level elements of ``resource_type`` (empty for an unknown type)."""
        return self._elements.get(resource_type, _NO_ELEMENTS)

    def get(self, resource_type: str, code: str) -> SearchParam | None:
        """One parameter of ``resource_type`` by code, or ``None``."""
        view = self._views.get(resource_type)
        if view is None:
            return self.params_for(resource_type).get(code)
        return view.get(code)

    def by_url(self, url: str) -> SearchParam | None:
        """A parameter by canonical url (custom ones first), as defined (not restricted)."""
        if url in self._custom:
            return self._custom[url]
        for param in self._common.values():
            if param.url == url:
                return param
        for params in self._builtin.values():
            for param in params.values():
                if param.url == url:
                    return param
        return None

    def add(self, param: SearchParam) -> None:
        """Register a custom parameter for the types in ``param.base`` (``Resource`` or
        ``DomainResource`` mean every type). Replaces an earlier custom one with the same url, and
        shadows a built-in one with the same code. 400-worthy problems raise ``ValueError``."""
        if param.type not in PARAM_TYPES:
            raise ValueError(f"unknown search parameter type {param.type!r}")
        if not param.base:
            raise ValueError(f"search parameter {param.code} has no base")
        if not param.url:
            raise ValueError(f"search parameter {param.code} has no url")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", param.code):
            raise ValueError(f"invalid search parameter code {param.code!r}")
        if param.type == "composite" and not param.components:
            raise ValueError(f"composite search parameter {param.code} has no components")
        with self._lock:
            self._custom[param.url] = param
            self._views = {}
            self._generation += 1

    def derive(self, params: Iterable[SearchParam]) -> Registry:
        """A new registry with this one's built-in, common and custom parameters (shared, not
        copied) plus ``params`` as custom ones: a facility's view over the global registry. This
        registry is left unchanged; later :meth:`add` calls here do not reach the derived one."""
        derived = Registry.__new__(Registry)
        derived.source = self.source
        derived._compartments = self._compartments
        derived._elements = self._elements
        derived._lock = threading.Lock()
        derived._builtin = self._builtin
        derived._common = self._common
        with self._lock:
            derived._custom = dict(self._custom)
        derived._views = {}
        derived._generation = 0
        for param in params:
            derived.add(param)
        return derived

    def builtin_codes(self, resource_type: str) -> frozenset[str]:
        """The codes of the built-in and common parameters of ``resource_type`` (custom ones aside)."""
        return frozenset(self._builtin.get(resource_type, {})) | frozenset(self._common)

    def _build_view(self, resource_type: str) -> dict[str, SearchParam]:
        view: dict[str, SearchParam] = {}
        if resource_type not in self._builtin and not any(resource_type in p.base for p in self._custom.values()):
            return view
        for code, param in self._common.items():
            view[code] = _restricted(param, resource_type)
        view.update(self._builtin.get(resource_type, {}))
        for param in self._custom.values():
            if resource_type in param.base or any(b in param.base for b in GENERIC_ROOTS):
                restricted = _restricted(param, resource_type)
                if restricted.expression is not None or param.expression is None:
                    view[param.code] = restricted
        return view


_NO_ELEMENTS = Elements()


def _restricted(param: SearchParam, resource_type: str) -> SearchParam:
    expression = restrict_expression(param.expression, resource_type, keep_relative=len(param.base) <= 1)
    return param if expression == param.expression else replace(param, expression=expression)


# ---------------------------------------------------------------------------------------------
# (De)serialization


def _tuple(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value or ())


def param_from_json(code: str, data: Mapping[str, Any]) -> SearchParam:
    """A :class:`SearchParam` from one entry of ``search_registry.json``."""
    ptype = data["type"]
    if ptype not in PARAM_TYPES:
        raise ValueError(f"unknown search parameter type {ptype!r} for {code}")
    components = tuple(
        Component(
            definition=c["definition"],
            code=c.get("code"),
            type=cast(ParamType | None, c.get("type")),
            expression=c["expression"],
        )
        for c in data.get("components", ())
    )
    return SearchParam(
        code=code,
        type=cast(ParamType, ptype),
        expression=data.get("expression"),
        targets=_tuple(data.get("targets")),
        modifiers=_tuple(data.get("modifiers")),
        comparators=_tuple(data.get("comparators")),
        components=components,
        url=data.get("url", ""),
        base=_tuple(data.get("base")),
        multiple_or=bool(data.get("multipleOr", True)),
        multiple_and=bool(data.get("multipleAnd", True)),
        processing_mode=data.get("processingMode", "normal"),
    )


def param_from_resource(resource: Mapping[str, Any], registry: Registry | None = None) -> SearchParam:
    """A :class:`SearchParam` from a SearchParameter resource (as posted by a client). Composite
    components are resolved against ``registry`` (default: :func:`default_registry`) for their code
    and type. Raises ``ValueError`` when the resource is not a usable definition."""
    if resource.get("resourceType") != "SearchParameter":
        raise ValueError("not a SearchParameter resource")
    for key in ("url", "code", "type", "base"):
        if not resource.get(key):
            raise ValueError(f"SearchParameter.{key} is required")
    reg = registry if registry is not None else default_registry()
    components = []
    for comp in resource.get("component", ()):
        definition = reg.by_url(comp.get("definition", ""))
        components.append(
            {
                "definition": comp.get("definition", ""),
                "expression": comp.get("expression", ""),
                "code": definition.code if definition else None,
                "type": definition.type if definition else None,
            }
        )
    entry = {
        "type": resource["type"],
        "expression": resource.get("expression"),
        "targets": resource.get("target", ()),
        "modifiers": resource.get("modifier") or SPEC_MODIFIERS.get(resource["type"], ()),
        "comparators": resource.get("comparator", ()),
        "components": components,
        "url": resource["url"],
        "base": resource["base"],
        "multipleOr": resource.get("multipleOr", True),
        "multipleAnd": resource.get("multipleAnd", True),
        "processingMode": resource.get("processingMode", "normal"),
    }
    return param_from_json(str(resource["code"]), entry)


def registry_from_json(data: Mapping[str, Any]) -> Registry:
    """A :class:`Registry` from the parsed ``search_registry.json`` document."""
    by_type = {t: {code: param_from_json(code, p) for code, p in ps.items()} for t, ps in data["types"].items()}
    common = {code: param_from_json(code, p) for code, p in data.get("common", {}).items()}
    elements = {
        t: Elements(tuple(e.get("all", ())), tuple(e.get("summary", ())), tuple(e.get("mandatory", ())))
        for t, e in data.get("elements", {}).items()
    }
    return Registry(
        by_type,
        common,
        source=str(data.get("source", "")),
        compartments=data.get("compartments", {}),
        elements=elements,
    )


REGISTRY_FILE = "search_registry.json"


def load_registry() -> Registry:
    """A new :class:`Registry` read from the packaged ``search_registry.json`` (does I/O)."""
    text = resources.files(__package__ or "subgraphs.store").joinpath(REGISTRY_FILE).read_text("utf-8")
    return registry_from_json(json.loads(text))


@cache
def default_registry() -> Registry:
    """The process-wide registry (loaded on first use)."""
    return load_registry()


def params_for(resource_type: str) -> dict[str, SearchParam]:
    """Shorthand for ``default_registry().params_for(resource_type)``."""
    return default_registry().params_for(resource_type)


def add_all(registry: Registry, params: Iterable[SearchParam]) -> None:
    """Add several custom parameters (e.g. the stored SearchParameter resources at start-up)."""
    for param in params:
        registry.add(param)
