"""The observation subgraph: ``Observation``, and ``Patient.observations`` / ``Patient.latestVitals``.

Contract:
* ``Patient`` here is the patient subgraph's entity (``@key(fields: "id")``) contributing only the
  two list fields; resolving it (``_entities``) checks, in one query per request, that the patient
  exists in the request's facility and that the caller may read it — otherwise ``null`` and
  ``NOT_FOUND``, as in the patient subgraph.
* ``observations(code, category, since, first)``: the patient's Observations newest first (by
  effective time), filtered like FHIR search (``code``/``category`` tokens — ``code`` or
  ``system|code``, comma = any of; ``since`` = effective at or after that date/dateTime), at most
  ``first`` (1 to 1000). ``latestVitals``: the newest Observation of each code in the vital-signs and
  laboratory categories, as the REST patient summary has it. Both are one query for all patients
  of a request, and only ever show what the caller may search.
* ``observation(id)``: one Observation (null + ``NOT_FOUND`` when not readable here).
"""

from __future__ import annotations

import strawberry
from strawberry.types import Info

from gateway.summary import SUMMARY_CATEGORIES
from subgraphs.graphql import args, fields, loaders
from subgraphs.graphql.context import SubgraphContext
from subgraphs.graphql.resource import moment, obj, objects, string
from subgraphs.graphql.schema import SubgraphSchema
from subgraphs.graphql.types import PATIENT_DESCRIPTION, Concept, Period, Quantity, ResourceFields, field

Ctx = Info[SubgraphContext, None]


@strawberry.type(description="One component of an Observation (e.g. systolic of a blood pressure).")
class ObservationComponent:
    code: Concept | None
    value_quantity: Quantity | None
    value_string: str | None
    value_concept: Concept | None


@strawberry.federation.type(keys=["id"], description="A FHIR Observation.")
class Observation(ResourceFields):
    @strawberry.field
    def status(self) -> str | None:
        return string(self.res.get("status"))

    @field(description="Every code of Observation.category (vital-signs, laboratory...).")
    def categories(self) -> list[str]:
        return fields.codes(self.res.get("category"))

    @strawberry.field
    def category(self) -> list[Concept]:
        return fields.concepts(self.res.get("category"))

    @strawberry.field
    def code(self) -> Concept | None:
        return fields.concept(self.res.get("code"))

    @field(description="effective[x] as one dateTime/instant string (a Period's start).")
    def effective(self) -> str | None:
        return moment(self.res.data, "effective")

    @field(description="effectivePeriod, when the observation covers a period.")
    def effective_period(self) -> Period | None:
        return fields.period(self.res.get("effectivePeriod"))

    @strawberry.field
    def issued(self) -> str | None:
        return string(self.res.get("issued"))

    @strawberry.field
    def value_quantity(self) -> Quantity | None:
        return fields.quantity(self.res.get("valueQuantity"))

    @strawberry.field
    def value_string(self) -> str | None:
        return string(self.res.get("valueString"))

    @field(description="valueCodeableConcept.")
    def value_concept(self) -> Concept | None:
        return fields.concept(self.res.get("valueCodeableConcept"))

    @strawberry.field
    def interpretation(self) -> list[Concept]:
        return fields.concepts(self.res.get("interpretation"))

    @strawberry.field
    def components(self) -> list[ObservationComponent]:
        return [
            ObservationComponent(
                code=fields.concept(c.get("code")),
                value_quantity=fields.quantity(c.get("valueQuantity")),
                value_string=string(c.get("valueString")),
                value_concept=fields.concept(c.get("valueCodeableConcept")),
            )
            for c in objects(self.res.get("component"))
        ]

    @field(description="The subject's reference (Patient/id).")
    def subject(self) -> str | None:
        ref = obj(self.res.get("subject"))
        return string(ref.get("reference")) if ref else None

    @classmethod
    async def resolve_reference(cls, info: Ctx, id: strawberry.ID) -> Observation:
        return cls.of(await loaders.require(info.context, "Observation", id))


@strawberry.federation.type(keys=["id"], description=PATIENT_DESCRIPTION)
class Patient:
    id: strawberry.ID

    @field(description="Observations newest first; code/category as FHIR tokens, since = effective >= it.")
    async def observations(
        self,
        info: Ctx,
        code: str | None = None,
        category: str | None = None,
        since: str | None = None,
        first: int = 20,
    ) -> list[Observation]:
        criteria: list[tuple[str, str]] = []
        if code is not None:
            criteria.append(("code", args.token(code, "code")))
        if category is not None:
            criteria.append(("category", args.token(category, "category")))
        if since is not None:
            criteria.append(("date", "ge" + args.date_time(since, "since")))
        spec = loaders.Compartment("Observation", tuple(criteria), "date", args.count(first, "first"))
        return [Observation.of(r) for r in await loaders.in_compartment(info.context, spec, self.id)]

    @field(description="The newest Observation of each code in the vital-signs and laboratory categories.")
    async def latest_vitals(self, info: Ctx) -> list[Observation]:
        found = await loaders.latest_per_code(info.context, "Observation", SUMMARY_CATEGORIES, self.id)
        return [Observation.of(r) for r in found]

    @classmethod
    async def resolve_reference(cls, info: Ctx, id: strawberry.ID) -> Patient:
        return cls(id=strawberry.ID(await loaders.require_visible(info.context, "Patient", id)))


@strawberry.type
class Query:
    @field(description="The Observation with this id in the request's facility (null + NOT_FOUND if none).")
    async def observation(self, info: Ctx, id: strawberry.ID) -> Observation | None:
        return Observation.of(await loaders.require(info.context, "Observation", id))


def build_schema() -> SubgraphSchema:
    """The observation subgraph's schema."""
    return SubgraphSchema(name="observation", query=Query, types=[Patient])
