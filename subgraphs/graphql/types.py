"""GraphQL value types shared by the subgraphs (FHIR datatypes, flattened where clients want it).

Contract: every type here is ``@shareable`` (Federation v2: a value type defined by several
subgraphs must be, and identical everywhere), has only nullable scalar fields or lists, and is
built from stored FHIR JSON by :mod:`subgraphs.graphql.fields` — never from anything else.
:class:`ResourceFields` is the base of every resource-backed type: ``id`` and ``resource`` (the
full stored FHIR JSON, served as stored, decimals and all).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self, TypeVar, cast

import strawberry
from strawberry.scalars import JSON

from .resource import Resource

F = TypeVar("F", bound=Callable[..., Any])


def field(description: str | None = None, *, name: str | None = None) -> Callable[[F], F]:
    """``@field(description=..., name=...)`` keeping the resolver's type for mypy
    (strawberry's overload for that form returns ``Any``); the GraphQL field is the same."""

    def decorate(resolver: F) -> F:
        return cast(F, strawberry.field(resolver, description=description, name=name))

    return decorate


@strawberry.federation.type(shareable=True, description="A FHIR Coding: a code in a code system.")
class Coding:
    system: str | None = None
    code: str | None = None
    display: str | None = None


@strawberry.federation.type(
    shareable=True,
    description="A FHIR CodeableConcept: its first coding's system, code and display (the display "
    "falls back to the concept's text), its text, and all its codings.",
)
class Concept:
    system: str | None = None
    code: str | None = None
    display: str | None = None
    text: str | None = None
    codings: list[Coding] = strawberry.field(default_factory=list)


@strawberry.federation.type(shareable=True, description="A FHIR HumanName.")
class HumanName:
    use: str | None = None
    family: str | None = None
    given: list[str] = strawberry.field(default_factory=list)
    text: str | None = strawberry.field(
        default=None, description="The name's text, or its given names and family name joined by spaces."
    )


@strawberry.federation.type(shareable=True, description="A FHIR Identifier.")
class Identifier:
    system: str | None = None
    value: str | None = None
    use: str | None = None


@strawberry.federation.type(shareable=True, description="A FHIR Period; start and end as stored (FHIR dateTime).")
class Period:
    start: str | None = None
    end: str | None = None


@strawberry.federation.type(shareable=True, description="A FHIR Quantity.")
class Quantity:
    value: str | None = strawberry.field(
        default=None, description="The value's exact decimal digits as stored (no binary rounding)."
    )
    value_float: float | None = strawberry.field(default=None, description="The value as a float (may round).")
    unit: str | None = None
    system: str | None = None
    code: str | None = None
    comparator: str | None = None


@strawberry.type(description="Fields every resource-backed type has.")
class ResourceFields:
    id: strawberry.ID
    res: strawberry.Private[Resource]

    @classmethod
    def of(cls, res: Resource) -> Self:
        """The GraphQL object of one stored resource."""
        return cls(id=strawberry.ID(res.id), res=res)

    @field(description="The full FHIR resource as stored (JSON, exact decimals).")
    def resource(self) -> JSON:
        return JSON(self.res.raw())

    @field(description="meta.versionId: the version this answer was read at.")
    def version_id(self) -> str:
        return str(self.res.stored.version)

    @field(description="meta.lastUpdated as a FHIR instant.")
    def last_updated(self) -> str:
        return self.res.last_updated()


PATIENT_DESCRIPTION = "A FHIR Patient of the request's facility (the patient subgraph owns it; others extend it)."
