"""FHIR JSON → the shared GraphQL value types (:mod:`subgraphs.graphql.types`).

Contract: each builder takes a FHIR element as stored (any JSON value) and returns the GraphQL
value, or ``None`` / ``[]`` when the element is absent or not of the expected shape — never an
exception, so one odd resource cannot fail a whole list.
"""

from __future__ import annotations

from typing import Any

from .resource import as_float, decimal_text, obj, objects, string, strings
from .types import Coding, Concept, HumanName, Identifier, Period, Quantity


def coding(value: Any) -> Coding | None:
    c = obj(value)
    if c is None:
        return None
    return Coding(system=string(c.get("system")), code=string(c.get("code")), display=string(c.get("display")))


def concept(value: Any) -> Concept | None:
    """A CodeableConcept (or a bare Coding) flattened to its first coding plus text."""
    c = obj(value)
    if c is None:
        return None
    if "coding" not in c and "code" in c:  # a Coding where a concept was expected
        c = {"coding": [c]}
    codings = [x for x in (coding(v) for v in objects(c.get("coding"))) if x is not None]
    first = codings[0] if codings else Coding()
    text = string(c.get("text"))
    return Concept(
        system=first.system,
        code=first.code,
        display=first.display or text,
        text=text,
        codings=codings,
    )


def concepts(value: Any) -> list[Concept]:
    return [x for x in (concept(v) for v in objects(value)) if x is not None]


def codes(value: Any) -> list[str]:
    """Every code of a list of CodeableConcepts (``category`` → ``["vital-signs"]``)."""
    return [c.code for item in concepts(value) for c in item.codings if c.code]


def status_code(value: Any) -> str | None:
    """A status held as a CodeableConcept (``clinicalStatus``): its first code."""
    c = concept(value)
    return c.code if c is not None else None


def human_name(value: Any) -> HumanName | None:
    n = obj(value)
    if n is None:
        return None
    family, given = string(n.get("family")), strings(n.get("given"))
    text = string(n.get("text")) or " ".join([*given, *([family] if family else [])]) or None
    return HumanName(use=string(n.get("use")), family=family, given=given, text=text)


def human_names(value: Any) -> list[HumanName]:
    return [x for x in (human_name(v) for v in objects(value)) if x is not None]


def preferred_name(value: Any) -> HumanName | None:
    """The ``official`` name, else the first that is not ``old``, else the first."""
    names = human_names(value)
    for wanted in ("official", "usual"):
        for name in names:
            if name.use == wanted:
                return name
    current = [n for n in names if n.use != "old"] or names
    return current[0] if current else None


def identifiers(value: Any) -> list[Identifier]:
    return [
        Identifier(system=string(i.get("system")), value=string(i.get("value")), use=string(i.get("use")))
        for i in objects(value)
    ]


def period(value: Any) -> Period | None:
    p = obj(value)
    if p is None:
        return None
    return Period(start=string(p.get("start")), end=string(p.get("end")))


def quantity(value: Any) -> Quantity | None:
    q = obj(value)
    if q is None:
        return None
    number = q.get("value")
    return Quantity(
        value=decimal_text(number),
        value_float=as_float(number),
        unit=string(q.get("unit")),
        system=string(q.get("system")),
        code=string(q.get("code")),
        comparator=string(q.get("comparator")),
    )
