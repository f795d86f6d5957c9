"""Search index extraction: the typed index values of a resource, driven by each parameter's FHIRPath.

Contract
--------
:func:`extract` evaluates the expression of every indexable parameter of the resource's type (from a
:class:`~subgraphs.store.registry.Registry`, default :func:`~subgraphs.store.registry.default_registry`)
and returns ``{code: (value, ...)}`` for the parameters that have values (an absent code means
"missing", for ``:missing``). Values are immutable and hashable, deduplicated, in document order:

``StringValue``     ``exact`` text and ``normalized`` (NFKD, combining marks dropped, casefolded)
                    for every string, and for every part of a HumanName (text, family, given, prefix,
                    suffix) or Address (text, line, city, district, state, postalCode, country).
``TokenValue``      ``system``/``code`` of a Coding, each coding of a CodeableConcept, an Identifier
                    (``value`` as code; its type codings in ``type_codings`` for ``:of-type``), a
                    ContactPoint (system left empty, as in the R5 token table), and ``code``/``id``/
                    ``uri``/``string``/``boolean`` primitives (``true``/``false``). ``text`` carries
                    Coding.display, Identifier.type.text, and CodeableConcept.text (as a value
                    with neither system nor code) for ``:text``.
``ReferenceValue``  ``target_type``/``target_id`` of a literal reference (relative, absolute or
                    canonical; ``version`` from ``_history/n`` or ``|version``; ``url`` for absolute and
                    ``urn:`` references and canonicals), and the logical ``identifier_*`` for
                    ``:identifier``. Contained references (``#id``) are not indexed.
``DateValue``       the UTC range ``[low, high]`` (closed, microsecond precision) of a date, dateTime or
                    instant (partial ones cover their whole period, see :mod:`.dates`), a Period (an
                    open end is the minimum/maximum instant) or a Timing (its outer limits: events and
                    ``repeat.boundsPeriod``).
``QuantityValue``   ``value`` (Decimal) and the range ``[low, high)`` it stands for given its precision
                    (``5.4`` → ``[5.35, 5.45)``; a comparator ``<``/``>`` opens one side: ``None``),
                    ``system``, ``code``, ``unit``; a Range gives ``low``/``high`` only. Money uses the
                    ISO 4217 system and the currency as code.
``NumberValue``     ``value`` and its precision range, like a quantity.
``UriValue``        the uri/url/canonical text as is.
``CompositeValue``  one tuple per item the composite expression selects: the combination (cartesian
                    product) of the values of each component evaluated on that item (text-only
                    tokens take no part: composites match codes).

:func:`index_rows` turns these values into the rows of the typed index tables of
:mod:`.schema` (``idx_token`` ... ``idx_composite``; UCUM quantities also get a row in canonical
units, :func:`ucum_canonical`); the write path stores them with the resource. :func:`basic_rows`
is the earlier adapter to the foundation's four tables (kept for comparison tests).

Evaluation
----------
Expressions are evaluated with ``fhirpathpy`` and the R5 model, never with hand-written FHIRPath,
except for the *fast path*: union branches that are plain element paths (``Observation.subject``,
choice elements with ``.ofType(T)``, ``.where(resolve() is T)``, ``.where(field = 'text')``) are
compiled to dict walks that reproduce fhirpathpy's own navigation rules (the same model tables for
choice types and type tests); ``tests/test_search_registry.py`` checks both agree on every official
example. Anything else falls back to fhirpathpy for that branch. Each (type, parameter) compiles once;
per type, the fast-path branches of all parameters form one prefix tree walked once per resource.
Top-level ``|`` branches are evaluated separately and their values concatenated, then deduplicated:
fhirpathpy's union drops the element types of its operands, which a composite's components need.
Extraction never changes the resource and is safe to call from several threads.

``resolve()`` is provided to fhirpathpy as a function (``userInvocationTable``): it returns, for a
Reference (or a reference/canonical string), a stub resource whose type is read from the reference
text (``Patient/1``, ``http://x/fhir/Patient/1``, ``Patient/1/_history/2``), or from
``Reference.type`` when the text has none. It never fetches anything, so ``resolve() is Patient``
tests the reference's type and nothing else; contained (``#id``) references resolve to nothing.

Parameters not indexed here: those without an expression (``_has``, ``_type``, ``_list``,
``_query``, ``_filter``, Medication ``form``; ``_text`` and ``_content`` get their words from
:mod:`.search_text` instead), ``special`` ones (Location ``near`` and
``contains``) and ``processingMode = other`` (``_in``). SampledData values are skipped for quantity
parameters. Phonetic parameters are indexed as plain strings (the phonetic key is the search
layer's). No import-time I/O: fhirpathpy and its model load on first use.
"""

from __future__ import annotations

import importlib
import itertools
import re
import threading
import unicodedata
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import cache, lru_cache
from typing import Any, ClassVar, Literal

from .dates import date_range
from .registry import Registry, SearchParam, default_registry, split_union

# ---------------------------------------------------------------------------------------------
# Index values


@dataclass(frozen=True, slots=True)
class StringValue:
    kind: ClassVar[Literal["string"]] = "string"
    exact: str
    normalized: str


@dataclass(frozen=True, slots=True)
class TokenValue:
    kind: ClassVar[Literal["token"]] = "token"
    system: str | None
    code: str | None
    text: str | None = None
    type_codings: tuple[tuple[str | None, str | None], ...] = ()


@dataclass(frozen=True, slots=True)
class ReferenceValue:
    kind: ClassVar[Literal["reference"]] = "reference"
    target_type: str | None
    target_id: str | None
    version: str | None = None
    url: str | None = None
    identifier_system: str | None = None
    identifier_value: str | None = None


@dataclass(frozen=True, slots=True)
class DateValue:
    kind: ClassVar[Literal["date"]] = "date"
    low: datetime
    high: datetime


@dataclass(frozen=True, slots=True)
class QuantityValue:
    kind: ClassVar[Literal["quantity"]] = "quantity"
    value: Decimal | None
    low: Decimal | None
    high: Decimal | None
    system: str | None = None
    code: str | None = None
    unit: str | None = None


@dataclass(frozen=True, slots=True)
class NumberValue:
    kind: ClassVar[Literal["number"]] = "number"
    value: Decimal
    low: Decimal
    high: Decimal


@dataclass(frozen=True, slots=True)
class UriValue:
    kind: ClassVar[Literal["uri"]] = "uri"
    value: str


@dataclass(frozen=True, slots=True)
class CompositeValue:
    kind: ClassVar[Literal["composite"]] = "composite"
    components: tuple[IndexValue, ...]


IndexValue = (
    StringValue | TokenValue | ReferenceValue | DateValue | QuantityValue | NumberValue | UriValue | CompositeValue
)

MIN_INSTANT = datetime(1, 1, 1, tzinfo=UTC)
MAX_INSTANT = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)

# ---------------------------------------------------------------------------------------------
# fhirpathpy, behind one typed facade (the library is untyped; everything from it is ``Any`` here)

Node = tuple[Any, str | None]  # (JSON data, fhirpathpy model path / type name)
Selector = Callable[[Sequence[Node]], list[Node]]


class _FhirPath:
    """The R5 model tables and compiled-expression factory (created once, on first use)."""

    def __init__(self) -> None:
        self.fp: Any = importlib.import_module("fhirpathpy")
        self.nodes: Any = importlib.import_module("fhirpathpy.engine.nodes")
        self.model: dict[str, Any] = importlib.import_module("fhirpathpy.models").models["r5"]
        self.type2parent: dict[str, str] = self.model["type2Parent"]
        self.path2type: dict[str, str] = self.model["path2Type"]
        self.choices: dict[str, list[str]] = self.model["choiceTypePaths"]
        self.elsewhere: dict[str, str] = self.model["pathsDefinedElsewhere"]
        abstract = {"Resource", "DomainResource"}
        self.resource_types = frozenset(t for t in self.type2parent if self.is_type(t, "Resource")) - abstract
        self.options = {"userInvocationTable": {"resolve": {"fn": self._resolve}}}
        self.raw_options = {**self.options, "returnRawData": True}

    def is_type(self, name: str | None, super_type: str) -> bool:
        """fhirpathpy's ``TypeInfo.is_type`` over the R5 model (walks type2Parent/path2Type)."""
        seen = 0
        while name and seen < 64:
            if name == super_type:
                return True
            name = self.type2parent.get(name) or self.path2type.get(name)
            seen += 1
        return False

    def _resolve(self, inputs: list[Any]) -> list[Any]:
        out = []
        for item in inputs:
            rtype = reference_type(item)
            if rtype is not None:
                out.append(self.nodes.ResourceNode.create_node({"resourceType": rtype}, rtype))
        return out

    def compile(self, expression: str) -> Callable[[Any], list[Any]]:
        """A compiled fhirpathpy evaluator returning raw nodes (data + type path)."""
        fn = self.fp.compile(expression, self.model, self.raw_options)

        def run(root: Any) -> list[Any]:
            # fhirpathpy keeps the model of ``is``/``ofType`` in a class attribute that any call
            # may reset; pin it to R5 so type tests are deterministic.
            self.nodes.TypeInfo.model = self.model
            return list(fn(root))

        return run

    def node(self, data: Any, path: str | None) -> Any:
        return self.nodes.ResourceNode.create_node(data, path)

    def unwrap(self, item: Any) -> Node:
        if isinstance(item, self.nodes.ResourceNode):
            return item.data, item.path
        return item, None


@cache
def _fhirpath() -> _FhirPath:
    return _FhirPath()


def fhirpath(resource: Any, expression: str) -> list[Any]:
    """Evaluate ``expression`` on ``resource`` directly with fhirpathpy (R5 model, the ``resolve()``
    hook), returning plain data as ``fhirpathpy.evaluate`` does: the reference the fast path is
    checked against (tests, debugging). The whole expression goes to fhirpathpy, unions included."""
    fp = _fhirpath()
    fp.nodes.TypeInfo.model = fp.model
    return list(_plain(expression)(resource))


@lru_cache(maxsize=1024)
def _plain(expression: str) -> Callable[[Any], list[Any]]:
    fp = _fhirpath()
    fn: Callable[[Any], list[Any]] = fp.fp.compile(expression, fp.model, fp.options)
    return fn


def fhirpath_nodes(root: Any, expression: str) -> list[Node]:
    """Like :func:`fhirpath`, but ``(data, type path)`` pairs; ``root`` may be such a pair (for
    expressions relative to an element, as composite components are)."""
    fp = _fhirpath()
    start = fp.node(root[0], root[1]) if isinstance(root, tuple) else root
    return [fp.unwrap(x) for x in fp.compile(expression)(start)]


# ---------------------------------------------------------------------------------------------
# References

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


@dataclass(frozen=True, slots=True)
class _Ref:
    type: str | None
    id: str | None
    version: str | None
    url: str | None


def parse_reference(text: str) -> _Ref | None:
    """The parts of a reference or canonical string; ``None`` for ``#contained`` or empty text.
    ``Type/id``, ``Type/id/_history/v``, ``http://base/Type/id``, ``url|version`` and ``urn:...``."""
    if not text or text.startswith("#"):
        return None
    ref, version = text, None
    if "|" in ref:
        ref, version = ref.split("|", 1)
    absolute = "://" in ref or ref.startswith("urn:")
    url = ref if absolute else None
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        version = parts[-1]
        parts = parts[:-2]
        url = "/".join(parts) if absolute else None
    rtype = rid = None
    if len(parts) >= 2 and parts[-2] in _fhirpath().resource_types and _ID.fullmatch(parts[-1]):
        rtype, rid = parts[-2], parts[-1]
    if rtype is None and url is None:
        return None
    return _Ref(rtype, rid, version or None, url)


def _type_from_uri(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    name = value.rsplit("/", 1)[-1]
    return name if name in _fhirpath().resource_types else None


def reference_type(value: Any) -> str | None:
    """The resource type a Reference (or reference string) points to, as ``resolve()`` sees it: from
    the reference text, else ``Reference.type``; ``None`` when unknown or contained."""
    if isinstance(value, str):
        ref = parse_reference(value)
        return ref.type if ref else None
    if isinstance(value, Mapping):
        text = value.get("reference")
        if isinstance(text, str):
            if text.startswith("#"):
                return None
            ref = parse_reference(text)
            if ref is not None and ref.type is not None:
                return ref.type
        return _type_from_uri(value.get("type"))
    return None


# ---------------------------------------------------------------------------------------------
# Conversions (by parameter type; shape-based, so plain fhirpathpy output converts the same way)


def normalize(text: str) -> str:
    """The case- and accent-insensitive form of ``text`` used by string search."""
    if text.isascii():
        # NFKD leaves ASCII unchanged and it has no combining marks: the same result, without the
        # per-character walk (the write path normalizes every string of every resource)
        return text.casefold()
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


_STRING_PARTS = (
    *("text", "family", "given", "prefix", "suffix"),  # HumanName
    *("line", "city", "district", "state", "postalCode", "country"),  # Address
)
_CONTACT_SYSTEMS = frozenset({"phone", "fax", "email", "pager", "url", "sms", "other"})


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _strings(value: Any) -> Iterator[StringValue]:
    if isinstance(value, str):
        if value:
            yield StringValue(value, normalize(value))
    elif isinstance(value, Mapping):
        for key in _STRING_PARTS:
            part = value.get(key)
            for text in part if isinstance(part, list) else (part,):
                if isinstance(text, str) and text:
                    yield StringValue(text, normalize(text))


def _codings(cc: Any) -> tuple[tuple[str | None, str | None], ...]:
    if not isinstance(cc, Mapping) or not isinstance(cc.get("coding"), list):
        return ()
    return tuple(
        (_str(c.get("system")), _str(c.get("code")))
        for c in cc["coding"]
        if isinstance(c, Mapping) and (_str(c.get("system")) or _str(c.get("code")))
    )


def _tokens(value: Any) -> Iterator[TokenValue]:
    if isinstance(value, bool):
        yield TokenValue(None, "true" if value else "false")
    elif isinstance(value, str):
        if value:
            yield TokenValue(None, value)
    elif isinstance(value, Mapping):
        if "value" in value and "code" not in value:  # Identifier or ContactPoint
            yield from _identifier_or_contact(value)
        elif "coding" in value or ("text" in value and "code" not in value and "display" not in value):
            for coding in value.get("coding") or ():  # CodeableConcept
                if isinstance(coding, Mapping):
                    yield from _tokens(coding)
            if _str(value.get("text")):
                yield TokenValue(None, None, value["text"])
        elif "code" in value or "system" in value or "display" in value:  # Coding
            system, code, display = _str(value.get("system")), _str(value.get("code")), _str(value.get("display"))
            if system or code or display:
                yield TokenValue(system, code, display)
        elif isinstance(value.get("concept"), Mapping):  # CodeableReference
            yield from _tokens(value["concept"])


def _identifier_or_contact(value: Mapping[str, Any]) -> Iterator[TokenValue]:
    text = _str(value.get("value"))
    system = _str(value.get("system"))
    contact = "type" not in value and "assigner" not in value and (system in _CONTACT_SYSTEMS or "rank" in value)
    if contact:  # ContactPoint: its system (phone, email...) is not a token system
        if text:
            yield TokenValue(None, text)
        return
    type_ = value.get("type")
    type_text = _str(type_.get("text")) if isinstance(type_, Mapping) else None
    if text or system:
        yield TokenValue(system, text, type_text, _codings(type_))


def _references(value: Any) -> Iterator[ReferenceValue]:
    if isinstance(value, str):
        ref = parse_reference(value)
        if ref is not None:
            yield ReferenceValue(ref.type, ref.id, ref.version, ref.url)
    elif isinstance(value, Mapping):
        if isinstance(value.get("reference"), Mapping):  # CodeableReference
            yield from _references(value["reference"])
            return
        text = value.get("reference")
        ref = parse_reference(text) if isinstance(text, str) else None
        ident = value.get("identifier")
        id_system = _str(ident.get("system")) if isinstance(ident, Mapping) else None
        id_value = _str(ident.get("value")) if isinstance(ident, Mapping) else None
        if ref is None and id_system is None and id_value is None:
            return
        rtype = ref.type if ref is not None and ref.type else _type_from_uri(value.get("type"))
        yield ReferenceValue(
            rtype,
            ref.id if ref else None,
            ref.version if ref else None,
            ref.url if ref else None,
            id_system,
            id_value,
        )


def _period(value: Mapping[str, Any]) -> DateValue | None:
    start = date_range(value["start"]) if isinstance(value.get("start"), str) else None
    end = date_range(value["end"]) if isinstance(value.get("end"), str) else None
    if start is None and end is None:
        return None
    return DateValue(start[0] if start else MIN_INSTANT, end[1] if end else MAX_INSTANT)


def _dates(value: Any) -> Iterator[DateValue]:
    if isinstance(value, str):
        rng = date_range(value)
        if rng is not None:
            yield DateValue(*rng)
    elif isinstance(value, Mapping):
        if "start" in value or "end" in value:
            period = _period(value)
            if period is not None:
                yield period
        elif "event" in value or "repeat" in value:  # Timing: its outer limits
            ranges = [DateValue(*r) for e in value.get("event") or () if isinstance(e, str) if (r := date_range(e))]
            repeat = value.get("repeat")
            bounds = repeat.get("boundsPeriod") if isinstance(repeat, Mapping) else None
            if isinstance(bounds, Mapping) and (period := _period(bounds)) is not None:
                ranges.append(period)
            if ranges:
                yield DateValue(min(r.low for r in ranges), max(r.high for r in ranges))


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(str(value))  # as fhirpathpy does
    if isinstance(value, str):  # integer64 is a JSON string
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


def precision_range(value: Decimal) -> tuple[Decimal, Decimal]:
    """``[low, high)`` implied by the significant digits of ``value`` (R5 search, number):
    ``5.4`` → ``(5.35, 5.45)``, ``100`` → ``(99.5, 100.5)``, ``1e2`` → ``(50, 150)``."""
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    half = Decimal(5).scaleb(exponent - 1)
    return value - half, value + half


def _quantities(value: Any) -> Iterator[QuantityValue]:
    if not isinstance(value, Mapping):
        return
    if "low" in value or "high" in value:  # Range
        low, high = value.get("low"), value.get("high")
        low = low if isinstance(low, Mapping) else {}
        high = high if isinstance(high, Mapping) else {}
        lo, hi = _decimal(low.get("value")), _decimal(high.get("value"))
        if lo is None and hi is None:
            return
        unit_of = low if lo is not None else high
        yield QuantityValue(
            None, lo, hi, _str(unit_of.get("system")), _str(unit_of.get("code")), _str(unit_of.get("unit"))
        )
        return
    number = _decimal(value.get("value"))
    if number is None or "origin" in value:  # SampledData is not a searchable quantity
        return
    low, high = precision_range(number)
    comparator = value.get("comparator")
    if comparator in ("<", "<="):
        low, high = None, number
    elif comparator in (">", ">="):
        low, high = number, None
    if "currency" in value:  # Money
        yield QuantityValue(number, low, high, "urn:iso:std:iso:4217", _str(value.get("currency")), None)
        return
    yield QuantityValue(number, low, high, _str(value.get("system")), _str(value.get("code")), _str(value.get("unit")))


def _numbers(value: Any) -> Iterator[NumberValue]:
    number = _decimal(value)
    if number is not None:
        yield NumberValue(number, *precision_range(number))


def _uris(value: Any) -> Iterator[UriValue]:
    if isinstance(value, str) and value:
        yield UriValue(value)


_CONVERTERS: dict[str, Callable[[Any], Iterator[IndexValue]]] = {
    "string": _strings,
    "token": _tokens,
    "reference": _references,
    "date": _dates,
    "quantity": _quantities,
    "number": _numbers,
    "uri": _uris,
}


def convert(param_type: str, items: Iterable[Any]) -> list[IndexValue]:
    """The index values of ``param_type`` for FHIRPath results ``items`` (plain data, or
    ``(data, path)`` nodes), deduplicated in order. Unknown types and unusable items give nothing."""
    converter = _CONVERTERS.get(param_type)
    if converter is None:
        return []
    return _convert(converter, [item[0] if isinstance(item, tuple) else item for item in items])


def _convert(converter: Callable[[Any], Iterator[IndexValue]], data: Iterable[Any]) -> list[IndexValue]:
    seen: dict[IndexValue, None] = {}
    for item in data:
        for value in converter(item):
            seen[value] = None
    return list(seen)


def combine(parts: Sequence[Sequence[IndexValue]]) -> list[CompositeValue]:
    """The composite values of one item: every combination of its components' values. Text-only
    tokens (a CodeableConcept.text) take no part: a composite matches codes, not text."""
    usable = [[v for v in p if not (isinstance(v, TokenValue) and v.code is None)] for p in parts]
    if not usable or any(not p for p in usable):
        return []
    return [CompositeValue(tuple(combo)) for combo in itertools.product(*usable)]


# ---------------------------------------------------------------------------------------------
# The fast path: plain element paths as dict walks, following fhirpathpy's navigation exactly

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_STEP = re.compile(
    rf"""\.(?:
        (?P<member>[a-z_][A-Za-z0-9_]*)(?![A-Za-z0-9_(])
      | ofType\(\s*(?P<oftype>{_IDENT})\s*\)
      | where\(\s*resolve\(\)\s+is\s+(?P<resolve>{_IDENT})\s*\)
      | where\(\s*(?P<field>[a-z][A-Za-z0-9]*)\s*=\s*'(?P<literal>[^'\\]*)'\s*\)
    )""",
    re.VERBOSE,
)
_HEAD = re.compile(rf"(?P<ident>{_IDENT})(?![A-Za-z0-9_(])")

Step = tuple[str, str, str]  # (kind, name, literal)
_KEYWORDS = frozenset({"true", "false", "and", "or", "xor", "implies", "is", "as", "in", "contains", "div", "mod"})


def strip_parens(branch: str) -> str:
    """``branch`` without parentheses that enclose all of it: ``((A.b))`` → ``A.b``."""
    text = branch.strip()
    while text.startswith("(") and text.endswith(")"):
        depth = 0
        for i, ch in enumerate(text):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(text) - 1:
                return text
        text = text[1:-1].strip()
    return text


def parse_simple_path(branch: str) -> tuple[str | None, tuple[Step, ...]] | None:
    """``(root type or None, steps)`` when ``branch`` is a plain element path the fast path can
    walk; ``None`` otherwise (fhirpathpy then evaluates it)."""
    text = strip_parens(branch)
    head = _HEAD.match(text)
    if head is None or head["ident"] in _KEYWORDS:
        return None
    root: str | None = None
    steps: list[Step] = []
    if head["ident"][0].isupper():
        root = head["ident"]
    else:
        steps.append(("member", head["ident"], ""))
    pos = head.end()
    while pos < len(text):
        m = _STEP.match(text, pos)
        if m is None:
            return None
        if m["member"]:
            steps.append(("member", m["member"], ""))
        elif m["oftype"]:
            steps.append(("oftype", m["oftype"], ""))
        elif m["resolve"]:
            steps.append(("resolve", m["resolve"], ""))
        else:
            steps.append(("field", m["field"], m["literal"]))
        pos = m.end()
    return root, tuple(steps)


class _Navigator:
    """The steps of the fast path over ``(data, path)`` nodes, reproducing fhirpathpy: member
    navigation follows its ``member_invocation`` (the model's pathsDefinedElsewhere, choiceTypePaths
    and path2Type tables; a resource, even a contained one, is typed by its ``resourceType``), and
    ``ofType``/``is`` its ``TypeInfo.is_`` with the R5 model. Data are plain ``dict``s/``list``s as
    parsed from JSON. Caches are keyed by model path and shared by all expressions."""

    def __init__(self, fp: _FhirPath) -> None:
        self.fp = fp
        self._members: dict[tuple[str | None, str], tuple[tuple[tuple[str, str], ...] | None, str]] = {}
        self._types: dict[tuple[str | None, str], bool] = {}

    def start(self, start: Sequence[Node], root: str | None) -> list[Node]:
        """The nodes a path starts from: resources typed by their resourceType; with a ``root``,
        only resources of that type (``Patient.name`` on a Patient)."""
        items: list[Node] = []
        for data, path in start:
            if type(data) is dict and "resourceType" in data:
                if root is not None and data["resourceType"] != root:
                    continue
                path = data["resourceType"]
            elif root is not None:
                continue
            items.append((data, path))
        return items

    def apply(self, step: Step, items: list[Node]) -> list[Node]:
        kind, name, literal = step
        if kind == "member":
            return self._member(items, name)
        if kind == "oftype":
            return [n for n in items if self._is(n[1], name)]
        if kind == "resolve":
            return [n for n in items if self.fp.is_type(reference_type(n[0]), name)]
        return [n for n in items if type(n[0]) is dict and n[0].get(name) == literal]

    def _member_info(self, path: str | None, key: str) -> tuple[tuple[tuple[str, str], ...] | None, str]:
        fp = self.fp
        child = f"{path}.{key}" if path else f"_.{key}"
        child = fp.elsewhere.get(child, child)
        types = fp.choices.get(child)
        if types:
            info: tuple[tuple[tuple[str, str], ...] | None, str] = (
                tuple((key + t, fp.path2type.get(child + t, child + t)) for t in types),
                "",
            )
        else:
            info = (None, fp.path2type.get(child, child))
        self._members[(path, key)] = info
        return info

    def _member(self, items: list[Node], key: str) -> list[Node]:
        out: list[Node] = []
        members = self._members
        for data, path in items:
            if type(data) is not dict:
                continue
            choices, child = members.get((path, key)) or self._member_info(path, key)
            if choices is None:
                value = data.get(key)
            else:
                value = None
                for json_key, typed in choices:
                    value = data.get(json_key)
                    if value is not None or data.get("_" + json_key) is not None:
                        child = typed
                        break
            if value is None:
                continue
            if type(value) is list:
                for x in value:
                    if type(x) is dict and "resourceType" in x:
                        out.append((x, str(x["resourceType"])))
                    else:
                        out.append((x, child))
            elif type(value) is dict and "resourceType" in value:
                out.append((value, str(value["resourceType"])))
            else:
                out.append((value, child))
        return out

    def _is(self, path: str | None, type_name: str) -> bool:
        known = self._types.get((path, type_name))
        if known is None:
            if path is None:
                known = False
            elif path.startswith("System."):
                known = path[7:] == type_name
            elif "." in path:
                known = self.fp.is_type("BackboneElement", type_name)
            else:
                known = self.fp.is_type(path, type_name)
            self._types[(path, type_name)] = known
        return known


@cache
def _navigator() -> _Navigator:
    return _Navigator(_fhirpath())


class _Walker:
    """One plain path (see :func:`parse_simple_path`) as a selector."""

    __slots__ = ("nav", "root", "steps")

    def __init__(self, root: str | None, steps: tuple[Step, ...]) -> None:
        self.nav = _navigator()
        self.root = root
        self.steps = steps

    def __call__(self, start: Sequence[Node]) -> list[Node]:
        items = self.nav.start(start, self.root)
        for step in self.steps:
            if not items:
                break
            items = self.nav.apply(step, items)
        return items


class _Trie:
    """The fast-path branches of all parameters of one type, as a prefix tree walked once per
    resource: shared prefixes (``Observation.value``, ``Observation.component``) are navigated once
    and an empty node prunes every branch below it."""

    __slots__ = ("children", "leaves")

    def __init__(self) -> None:
        self.children: dict[Step, _Trie] = {}
        self.leaves: list[int] = []

    def add(self, steps: tuple[Step, ...], leaf: int) -> None:
        node = self
        for step in steps:
            node = node.children.setdefault(step, _Trie())
        node.leaves.append(leaf)

    def run(self, nav: _Navigator, start: list[Node], results: list[list[Node]]) -> None:
        stack: list[tuple[_Trie, list[Node]]] = [(self, start)]
        while stack:
            node, items = stack.pop()
            for leaf in node.leaves:
                results[leaf] = items
            for step, child in node.children.items():
                found = nav.apply(step, items)
                if found:
                    stack.append((child, found))


def _fhirpath_selector(fp: _FhirPath, expression: str) -> Selector:
    run = fp.compile(expression)

    def select(start: Sequence[Node]) -> list[Node]:
        out: list[Node] = []
        for data, path in start:
            root = data if path is None or (isinstance(data, Mapping) and "resourceType" in data) else None
            out.extend(fp.unwrap(x) for x in run(root if root is not None else fp.node(data, path)))
        return out

    return select


def _branches(expression: str, fast: bool) -> list[tuple[str | None, tuple[Step, ...]] | Selector]:
    """Each union branch as a parsed plain path (fast path) or a fhirpathpy selector."""
    fp = _fhirpath()
    out: list[tuple[str | None, tuple[Step, ...]] | Selector] = []
    for branch in split_union(expression):
        parsed = parse_simple_path(branch) if fast else None
        out.append(parsed if parsed is not None else _fhirpath_selector(fp, branch))
    return out


@lru_cache(maxsize=4096)
def _selector(expression: str, fast: bool) -> tuple[Selector, bool]:
    """A selector for ``expression`` (its union branches concatenated; duplicates are removed after
    conversion) and whether every branch took the fast path."""
    parts: list[Selector] = []
    all_fast = True
    for branch in _branches(expression, fast):
        if isinstance(branch, tuple):
            parts.append(_Walker(*branch))
        else:
            all_fast = False
            parts.append(branch)
    if len(parts) == 1:
        return parts[0], all_fast

    def select(start: Sequence[Node]) -> list[Node]:
        out: list[Node] = []
        for part in parts:
            out.extend(part(start))
        return out

    return select, all_fast


# ---------------------------------------------------------------------------------------------
# Compiled parameters and extraction


def indexable(param: SearchParam) -> bool:
    """Whether :func:`extract` produces values for ``param`` (see the module docstring)."""
    if not param.expression or param.type == "special" or param.processing_mode == "other":
        return False
    if param.type == "composite":
        return bool(param.components) and all(c.type in _CONVERTERS and c.expression for c in param.components)
    return param.type in _CONVERTERS


# (id of the item's data, its path, component type, selector) → (the data, kept alive so its id
# cannot be reused during the call, and the component's values)
_Memo = dict[tuple[int, str | None, str, Selector], tuple[Any, list[IndexValue]]]


def _values(
    param_type: str, components: Sequence[tuple[str, Selector]], items: list[Node], memo: _Memo | None = None
) -> list[IndexValue]:
    """Converted values of ``items``; for a composite, the combinations of its components on each
    item. ``memo`` (valid while the resource is alive and unchanged) shares component values
    between composites (``code`` is a component of six Observation composites)."""
    if not components:
        return _convert(_CONVERTERS[param_type], [data for data, _ in items])
    seen: dict[IndexValue, None] = {}
    for item in items:
        parts = []
        for ctype, select in components:
            key = (id(item[0]), item[1], ctype, select)
            hit = memo.get(key) if memo is not None else None
            if hit is not None:
                part = hit[1]
            else:
                part = convert(ctype, select([item]))
                if memo is not None:
                    memo[key] = (item[0], part)
            if not part:
                break
            parts.append(part)
        else:
            for value in combine(parts):
                seen[value] = None
    return list(seen)


@dataclass(frozen=True, slots=True)
class CompiledParam:
    """One parameter ready to extract: the selector of its expression and, for composites, of each
    component (relative to every selected item). ``fast`` when no part needs fhirpathpy."""

    param: SearchParam
    select: Selector
    components: tuple[tuple[str, Selector], ...]
    fast: bool

    def values(self, resource: Mapping[str, Any]) -> list[IndexValue]:
        """The index values of this parameter for ``resource``."""
        items = self.select([(resource, None)])
        return _values(self.param.type, self.components, items) if items else []


@lru_cache(maxsize=4096)
def compile_param(param: SearchParam, fast: bool = True) -> CompiledParam:
    """``param`` (its expression already restricted to one type) compiled once; cached on the
    parameter's value, so a redefined custom parameter compiles anew. ``ValueError`` if it is not
    :func:`indexable`."""
    if not indexable(param) or param.expression is None:
        raise ValueError(f"search parameter {param.code} is not indexable")
    select, all_fast = _selector(param.expression, fast)
    components: list[tuple[str, Selector]] = []
    for comp in param.components:
        assert comp.type is not None
        comp_select, comp_fast = _selector(comp.expression, fast)
        components.append((comp.type, comp_select))
        all_fast = all_fast and comp_fast
    return CompiledParam(param, select, tuple(components), all_fast)


@dataclass(frozen=True, slots=True)
class _PlannedParam:
    code: str
    type: str
    leaves: tuple[int, ...]
    fallbacks: tuple[Selector, ...]
    components: tuple[tuple[str, Selector], ...]


class TypePlan:
    """Every indexable parameter of one resource type, compiled: fast-path branches in one
    :class:`_Trie`, the others as fhirpathpy selectors. Immutable once built; thread-safe."""

    def __init__(self, resource_type: str, params: Iterable[SearchParam], fast: bool) -> None:
        self.resource_type = resource_type
        self.fast = fast
        self._nav = _navigator()
        self._trie = _Trie()
        self._leaf_count = 0
        planned: list[_PlannedParam] = []
        for param in params:
            if not indexable(param) or param.expression is None:
                continue
            leaves: list[int] = []
            fallbacks: list[Selector] = []
            for branch in _branches(param.expression, fast):
                if not isinstance(branch, tuple):
                    fallbacks.append(branch)
                elif branch[0] in (None, resource_type):
                    self._trie.add(branch[1], self._leaf_count)
                    leaves.append(self._leaf_count)
                    self._leaf_count += 1
                # a plain path rooted at another type selects nothing here
            components = compile_param(param, fast).components
            planned.append(_PlannedParam(param.code, param.type, tuple(leaves), tuple(fallbacks), components))
        self.params = tuple(planned)

    def extract(self, resource: Mapping[str, Any]) -> dict[str, tuple[IndexValue, ...]]:
        """See :func:`extract`."""
        results: list[list[Node]] = [[]] * self._leaf_count
        if resource.get("resourceType") == self.resource_type:
            self._trie.run(self._nav, [(resource, self.resource_type)], results)
        start: list[Node] = [(resource, None)]
        memo: _Memo = {}
        out: dict[str, tuple[IndexValue, ...]] = {}
        for p in self.params:
            if len(p.leaves) == 1 and not p.fallbacks:
                items = results[p.leaves[0]]
            else:
                items = [n for leaf in p.leaves for n in results[leaf]]
                for fallback in p.fallbacks:
                    items.extend(fallback(start))
            if items:
                values = _values(p.type, p.components, items, memo)
                if values:
                    out[p.code] = tuple(values)
        return out


_plans: weakref.WeakKeyDictionary[Registry, dict[tuple[int, str, bool], TypePlan]] = weakref.WeakKeyDictionary()
_plans_lock = threading.Lock()


def plan(registry: Registry, resource_type: str, fast: bool = True) -> TypePlan:
    """The compiled plan of ``resource_type`` in ``registry``, built once per registry generation
    (a custom parameter added later invalidates it)."""
    key = (registry.generation, resource_type, fast)
    per_registry = _plans.get(registry)
    found = per_registry.get(key) if per_registry is not None else None
    if found is None:
        found = TypePlan(resource_type, registry.params_for(resource_type).values(), fast)
        with _plans_lock:
            cached = _plans.setdefault(registry, {})
            for stale in [k for k in cached if k[0] != registry.generation]:
                del cached[stale]
            cached[key] = found
    return found


def extract(
    resource: Mapping[str, Any],
    registry: Registry | None = None,
    *,
    resource_type: str | None = None,
    fast: bool = True,
) -> dict[str, tuple[IndexValue, ...]]:
    """The index values of ``resource`` (a parsed JSON object: plain ``dict``/``list``, numbers may
    be ``Decimal``) for every indexable parameter of its type, by parameter code; parameters without
    values are left out. ``fast=False`` evaluates every expression with fhirpathpy (for comparison
    and debugging); both give the same values."""
    rtype = resource_type or resource.get("resourceType")
    if not isinstance(rtype, str):
        raise ValueError("resource has no resourceType")
    reg = registry if registry is not None else default_registry()
    return plan(reg, rtype, fast).extract(resource)


# ---------------------------------------------------------------------------------------------
# Bridge to the foundation's four index tables (idx_token/_reference/_date/_string)

_COLUMN = 255  # String(255) columns of the foundation's index tables


def basic_rows(
    resource: Mapping[str, Any], registry: Registry | None = None
) -> Iterator[tuple[Literal["token", "reference", "date", "string"], dict[str, Any]]]:
    """The values of :func:`extract` that fit the foundation's tables, as ``(kind, row)`` pairs shaped
    like ``subgraphs.store.params.extract`` output (``{"param", ...value columns}``), so writes can
    switch to the registry before the typed tables exist. Dropped: tokens without a code (text-only),
    references without type and id (logical or ``urn:``), quantity/number/uri/composite values.
    Strings are stored normalized; text is cut to the column sizes. No duplicates."""
    seen: set[tuple[Any, ...]] = set()
    for code, values in extract(resource, registry).items():
        for value in values:
            row: dict[str, Any]
            kind: Literal["token", "reference", "date", "string"]
            if isinstance(value, TokenValue) and value.code:
                kind, row = "token", {"param": code, "system": value.system, "code": value.code[:_COLUMN]}
            elif isinstance(value, ReferenceValue) and value.target_type and value.target_id:
                kind, row = "reference", {"param": code, "target_type": value.target_type, "target_id": value.target_id}
            elif isinstance(value, DateValue):
                kind, row = "date", {"param": code, "low": value.low, "high": value.high}
            elif isinstance(value, StringValue):
                kind, row = "string", {"param": code, "value": value.normalized[:_COLUMN]}
            else:
                continue
            if row.get("system") is not None:
                row["system"] = row["system"][:_COLUMN]
            key = (kind, *row.values())
            if key not in seen:
                seen.add(key)
                yield kind, row


# ---------------------------------------------------------------------------------------------
# The typed index tables (subgraphs.store.schema: idx_token ... idx_composite)

#: Parameters served from the ``resources`` table itself, never indexed as rows.
NOT_INDEXED = frozenset({"_id", "_lastUpdated"})
UCUM = "http://unitsofmeasure.org"
#: The system of the extra quantity row holding a UCUM value in canonical units (``mg`` → ``g``):
#: searches with a UCUM unit compare those rows; sorting ignores them.
UCUM_CANONICAL = "urn:unihealth:ucum-canonical"
_URI_COLUMN = 512


def _cut(text: str | None, size: int = _COLUMN) -> str | None:
    return text[:size] if text is not None else None


def _norm(text: str | None) -> str | None:
    return normalize(text)[:_COLUMN] if text else None


def point_or_range(value: QuantityValue | NumberValue) -> tuple[Decimal | None, Decimal | None]:
    """The ``[low, high]`` stored for a quantity or number: a plain value ``v`` is ``[v, v]`` (the
    search value's precision decides matches, R5 "number"), a comparator opens one side (``<5`` →
    ``[None, 5]``), a Range keeps its ends."""
    if isinstance(value, NumberValue):
        return value.value, value.value
    if value.value is None:
        return value.low, value.high
    if value.low is None:
        return None, value.value
    if value.high is None:
        return value.value, None
    return value.value, value.value


# UCUM canonical units (bonus): a small, exact subset — metric prefixes on g, L, m, s, mol, eq, U,
# kat, the time units min/h/d/wk and the counting factors 10*n; products with "." and one "/".
_UCUM_PREFIXES = {
    "Y": 24, "Z": 21, "E": 18, "P": 15, "T": 12, "G": 9, "M": 6, "k": 3, "h": 2, "da": 1,
    "d": -1, "c": -2, "m": -3, "u": -6, "n": -9, "p": -12, "f": -15, "a": -18,
}  # fmt: skip
_UCUM_ATOMS: dict[str, tuple[Decimal, str]] = {
    "g": (Decimal(1), "g"),
    "L": (Decimal(1), "L"),
    "l": (Decimal(1), "L"),
    "m": (Decimal(1), "m"),
    "s": (Decimal(1), "s"),
    "mol": (Decimal(1), "mol"),
    "eq": (Decimal(1), "eq"),
    "U": (Decimal(1), "U"),
    "kat": (Decimal(1), "kat"),
    "min": (Decimal(60), "s"),
    "h": (Decimal(3600), "s"),
    "d": (Decimal(86400), "s"),
    "wk": (Decimal(604800), "s"),
}
_UCUM_PLAIN = frozenset({"min", "h", "d", "wk"})  # no prefixes on these
_UCUM_TERM = re.compile(r"^(?:10\*(?P<pow>-?\d{1,2})|(?P<unit>[A-Za-z]+)(?P<exp>-?\d)?)$")


@lru_cache(maxsize=1024)
def ucum_canonical(code: str) -> tuple[Decimal, str] | None:
    """``(factor, canonical code)`` with ``value_in_code * factor = value_in_canonical``, for the
    UCUM codes this subset understands (``mg/dL`` → ``(0.01, "g.L-1")``); ``None`` otherwise."""
    if not code or len(code) > 40 or "(" in code:
        return None
    numerator, _, denominator = code.partition("/")
    if "/" in denominator:
        return None
    factor = Decimal(1)
    dims: dict[str, int] = {}
    for part, sign in ((numerator, 1), (denominator, -1)):
        if not part and sign == -1:
            continue
        for term in part.split(".") if part else ["1"]:
            if term == "1":
                continue
            m = _UCUM_TERM.match(term)
            if m is None:
                return None
            if m["pow"] is not None:
                factor *= Decimal(10) ** (sign * int(m["pow"]))
                continue
            unit, exp = m["unit"], int(m["exp"] or 1) * sign
            atom = _ucum_atom(unit)
            if atom is None:
                return None
            scale, base = atom
            factor *= scale**exp
            dims[base] = dims.get(base, 0) + exp
    canonical = ".".join(f"{b}{e if e != 1 else ''}" for b, e in sorted(dims.items()) if e) or "1"
    return factor, canonical


def _ucum_atom(unit: str) -> tuple[Decimal, str] | None:
    if unit in _UCUM_ATOMS:
        return _UCUM_ATOMS[unit]
    for prefix in sorted(_UCUM_PREFIXES, key=len, reverse=True):
        atom = unit[len(prefix) :]
        if unit.startswith(prefix) and atom in _UCUM_ATOMS and atom not in _UCUM_PLAIN:
            scale, base = _UCUM_ATOMS[atom]
            return scale * Decimal(10) ** _UCUM_PREFIXES[prefix], base
    return None


def _scaled(value: Decimal | None, factor: Decimal) -> Decimal | None:
    return None if value is None else value * factor


def _quantity_rows(code: str, value: QuantityValue) -> Iterator[dict[str, Any]]:
    low, high = point_or_range(value)
    yield {
        "param": code,
        "system": _cut(value.system),
        "code": _cut(value.code),
        "unit": _cut(value.unit),
        "low": low,
        "high": high,
    }
    if value.system == UCUM and value.code:
        canonical = ucum_canonical(value.code)
        if canonical is not None:  # also findable in canonical units (a row of its own, see above)
            factor, unit = canonical
            yield {
                "param": code,
                "system": UCUM_CANONICAL,
                "code": unit,
                "unit": None,
                "low": _scaled(low, factor),
                "high": _scaled(high, factor),
            }


_COMPOSITE_EMPTY = {
    "a_system": None,
    "a_code": None,
    "b_system": None,
    "b_code": None,
    "b_text": None,
    "b_low_date": None,
    "b_high_date": None,
    "b_low": None,
    "b_high": None,
}


def composite_row(code: str, value: CompositeValue) -> dict[str, Any] | None:
    """The ``idx_composite`` row of a two-part composite value (``None`` for other shapes): the first
    part a token (system, code) or reference (type, id), the second any single-valued kind."""
    if len(value.components) != 2:
        return None
    first, second = value.components
    row: dict[str, Any] = {"param": code, **_COMPOSITE_EMPTY}
    if isinstance(first, TokenValue) and first.code is not None:
        row["a_system"], row["a_code"] = _cut(first.system), _cut(first.code)
    elif isinstance(first, ReferenceValue) and first.target_id is not None:
        row["a_system"], row["a_code"] = first.target_type, first.target_id
    else:
        return None
    if isinstance(second, TokenValue):
        row["b_system"], row["b_code"] = _cut(second.system), _cut(second.code)
    elif isinstance(second, ReferenceValue):
        row["b_system"], row["b_code"] = second.target_type, second.target_id
    elif isinstance(second, QuantityValue | NumberValue):
        row["b_low"], row["b_high"] = point_or_range(second)
        if isinstance(second, QuantityValue):
            row["b_system"], row["b_code"] = _cut(second.system), _cut(second.code)
    elif isinstance(second, DateValue):
        row["b_low_date"], row["b_high_date"] = second.low, second.high
    elif isinstance(second, StringValue):
        row["b_text"] = _norm(second.normalized)
    elif isinstance(second, UriValue):
        row["b_code"] = _cut(second.value)
    else:
        return None
    return row


def rows_of(code: str, value: IndexValue) -> Iterator[tuple[str, dict[str, Any]]]:
    """The index rows (``(table kind, row)``) of one extracted value of parameter ``code``."""
    if isinstance(value, TokenValue):
        base = {
            "param": code,
            "system": _cut(value.system),
            "code": _cut(value.code),
            "text": _norm(value.text),
        }
        for type_system, type_code in value.type_codings or ((None, None),):
            yield "token", {**base, "type_system": _cut(type_system), "type_code": _cut(type_code)}
    elif isinstance(value, ReferenceValue):
        yield (
            "reference",
            {
                "param": code,
                "target_type": value.target_type,
                "target_id": value.target_id,
                "version": _cut(value.version, 64),
                "url": _cut(value.url, _URI_COLUMN),
                "identifier_system": _cut(value.identifier_system),
                "identifier_value": _cut(value.identifier_value),
            },
        )
    elif isinstance(value, DateValue):
        yield "date", {"param": code, "low": value.low, "high": value.high}
    elif isinstance(value, StringValue):
        yield "string", {"param": code, "value": value.normalized[:_COLUMN], "exact": value.exact[:_COLUMN]}
    elif isinstance(value, QuantityValue):
        for row in _quantity_rows(code, value):
            yield "quantity", row
    elif isinstance(value, NumberValue):
        low, high = point_or_range(value)
        yield "number", {"param": code, "low": low, "high": high}
    elif isinstance(value, UriValue):
        yield "uri", {"param": code, "value": value.value[:_URI_COLUMN]}
    elif isinstance(value, CompositeValue):
        composite = composite_row(code, value)
        if composite is not None:
            yield "composite", composite


def index_rows(
    resource: Mapping[str, Any], registry: Registry | None = None, *, resource_type: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The rows of ``resource`` for the typed index tables, by table kind (``token``, ``reference``,
    ``date``, ``string``, ``quantity``, ``number``, ``uri``, ``composite``): each row holds
    ``param`` and the kind's value columns, text cut to the column sizes, without duplicates.
    ``_id`` and ``_lastUpdated`` are left out (the ``resources`` table holds them); ``text`` rows
    hold the words of ``_text`` and ``_content`` (:func:`.search_text.text_rows`)."""
    from .search_text import text_rows  # it builds on normalize() here

    out: dict[str, list[dict[str, Any]]] = {}
    seen: set[tuple[Any, ...]] = set()
    for code, values in extract(resource, registry, resource_type=resource_type).items():
        if code in NOT_INDEXED:
            continue
        # a CodeableConcept.text equal to a coding's display adds nothing a search could tell apart
        displays = {_norm(v.text) for v in values if isinstance(v, TokenValue) and v.code is not None and v.text}
        for value in values:
            redundant = isinstance(value, TokenValue) and value.code is None and value.system is None
            if redundant and _norm(value.text) in displays:  # type: ignore[union-attr]
                continue
            for kind, row in rows_of(code, value):
                key = (kind, *row.values())
                if key not in seen:
                    seen.add(key)
                    out.setdefault(kind, []).append(row)
    texts = text_rows(resource)
    if texts:
        out["text"] = texts
    return out
