"""The patient subgraph: ``Patient`` (the entity the other subgraphs extend), ``Encounter``,
``AllergyIntolerance`` and ``Condition``.

Contract:
* ``patient(id)`` is the Patient the caller may read in the request's facility, else ``null`` and
  a ``NOT_FOUND`` error — the same for an absent id, a deleted one, another facility's and one
  outside the caller's access. ``_entities`` resolves Patient (and the other entities) the same
  way, all representations of a request in one query.
* ``patients(first, after, name, identifier)`` pages through the facility's patients (FHIR search
  ``name``/``identifier`` semantics, ordered by id) with opaque cursors bound to the facility and
  the query; a cursor from elsewhere, or altered, is ``BAD_USER_INPUT``.
* ``Patient.encounters(first)`` are the newest ``first`` (1 to 50) by period; ``allergies`` and
  ``conditions`` are the active ones unless ``activeOnly: false`` (conditions: active, recurrence,
  relapse), newest recorded first, at most 1000. Each is one query for all patients of a request.
* ``Patient.linkedRecords(encounters)`` is what other facilities holding the same person (the
  national identifier) share with the caller, by the REST summary's rules
  (:func:`gateway.linked.shared_with_patients`): the summary's resources (``encounters``, 1 to 50,
  as ``?encounters=``) that an active Consent permits, or all of them while the caller's
  break-the-glass session for the patient is open (opened over REST only; never here); nothing
  for ``patient/``-scoped callers; what is not shared is left out silently. Each source's access
  is recorded in its own audit chain. One DataLoader batch for all patients of a request.
"""

from __future__ import annotations

from functools import partial

import strawberry
from strawberry.scalars import JSON
from strawberry.types import Info

from gateway.linked import shared_with_patients
from gateway.summary import ACTIVE_CONDITION
from subgraphs.graphql import args, fields, loaders
from subgraphs.graphql.context import SubgraphContext
from subgraphs.graphql.resource import Resource, moment, obj, string
from subgraphs.graphql.schema import SubgraphSchema
from subgraphs.graphql.types import PATIENT_DESCRIPTION, Concept, HumanName, Identifier, Period, ResourceFields, field
from subgraphs.store import cursor
from subgraphs.store.search import parse_search

Ctx = Info[SubgraphContext, None]
MAX_ENCOUNTERS = 50
MAX_LIST = 1000


@strawberry.federation.type(keys=["id"], description="A FHIR Encounter.")
class Encounter(ResourceFields):
    @strawberry.field
    def status(self) -> str | None:
        return string(self.res.get("status"))

    @field(description="The first code of the encounter's class (AMB, IMP, EMER...).")
    def class_code(self) -> str | None:
        classes = fields.concepts(self.res.get("class"))
        return classes[0].code if classes else None

    @field(name="class", description="Encounter.class (R5: a list of concepts).")
    def class_(self) -> list[Concept]:
        return fields.concepts(self.res.get("class"))

    @strawberry.field
    def type(self) -> list[Concept]:
        return fields.concepts(self.res.get("type"))

    @field(description="Encounter.actualPeriod (R5), else plannedStartDate/plannedEndDate.")
    def period(self) -> Period | None:
        actual = fields.period(self.res.get("actualPeriod"))
        if actual is not None:
            return actual
        start, end = string(self.res.get("plannedStartDate")), string(self.res.get("plannedEndDate"))
        return Period(start=start, end=end) if start or end else None

    @classmethod
    async def resolve_reference(cls, info: Ctx, id: strawberry.ID) -> Encounter:
        return cls.of(await loaders.require(info.context, "Encounter", id))


@strawberry.federation.type(keys=["id"], description="A FHIR AllergyIntolerance.")
class AllergyIntolerance(ResourceFields):
    @field(description="The first code of clinicalStatus (active, inactive, resolved).")
    def clinical_status(self) -> str | None:
        return fields.status_code(self.res.get("clinicalStatus"))

    @strawberry.field
    def verification_status(self) -> str | None:
        return fields.status_code(self.res.get("verificationStatus"))

    @strawberry.field
    def code(self) -> Concept | None:
        return fields.concept(self.res.get("code"))

    @strawberry.field
    def criticality(self) -> str | None:
        return string(self.res.get("criticality"))

    @strawberry.field
    def categories(self) -> list[str]:
        return [c for c in (string(v) for v in self.res.get("category") or ()) if c]

    @strawberry.field
    def recorded_date(self) -> str | None:
        return string(self.res.get("recordedDate"))

    @classmethod
    async def resolve_reference(cls, info: Ctx, id: strawberry.ID) -> AllergyIntolerance:
        return cls.of(await loaders.require(info.context, "AllergyIntolerance", id))


@strawberry.federation.type(keys=["id"], description="A FHIR Condition.")
class Condition(ResourceFields):
    @field(description="The first code of clinicalStatus (active, recurrence, relapse, resolved...).")
    def clinical_status(self) -> str | None:
        return fields.status_code(self.res.get("clinicalStatus"))

    @strawberry.field
    def verification_status(self) -> str | None:
        return fields.status_code(self.res.get("verificationStatus"))

    @strawberry.field
    def code(self) -> Concept | None:
        return fields.concept(self.res.get("code"))

    @strawberry.field
    def category(self) -> list[Concept]:
        return fields.concepts(self.res.get("category"))

    @field(description="onset[x] as a dateTime (a Period's start); see `resource` for other forms.")
    def onset(self) -> str | None:
        return moment(self.res.data, "onset")

    @strawberry.field
    def recorded_date(self) -> str | None:
        return string(self.res.get("recordedDate"))

    @classmethod
    async def resolve_reference(cls, info: Ctx, id: strawberry.ID) -> Condition:
        return cls.of(await loaders.require(info.context, "Condition", id))


@strawberry.type(
    description="A record of the same person held by another facility and shared with this one, by an "
    "active Consent of that facility or under break-the-glass."
)
class LinkedRecord:
    source_facility: str = strawberry.field(description="The facility that holds (and shared) the record.")
    resource_type: str
    id: strawberry.ID = strawberry.field(description="The resource's id at its source facility.")
    break_the_glass: bool = strawberry.field(
        description="True when shared under the caller's open break-the-glass session rather than by consent."
    )
    res: strawberry.Private[Resource]

    @field(description="The full FHIR resource as stored at its source facility (JSON, exact decimals).")
    def resource(self) -> JSON:
        return JSON(self.res.raw())


async def _load_linked(ctx: SubgraphContext, encounters: int, patient_ids: list[str]) -> list[list[LinkedRecord]]:
    repo = await ctx.repository()
    found = await shared_with_patients(
        ctx.backends, ctx.request(), repo, patient_ids, encounters, via="GraphQL patient"
    )
    return [
        [
            LinkedRecord(
                source_facility=s.facility,
                resource_type=r.type,
                id=strawberry.ID(r.id),
                break_the_glass=s.btg,
                res=Resource(r),
            )
            for s in shared
            for r in s.resources
        ]
        for shared in found
    ]


@strawberry.federation.type(keys=["id"], description=PATIENT_DESCRIPTION)
class Patient(ResourceFields):
    @field(description="The official name, else the usual one, else the first current one.")
    def name(self) -> HumanName | None:
        return fields.preferred_name(self.res.get("name"))

    @strawberry.field
    def names(self) -> list[HumanName]:
        return fields.human_names(self.res.get("name"))

    @strawberry.field
    def birth_date(self) -> str | None:
        return string(self.res.get("birthDate"))

    @strawberry.field
    def gender(self) -> str | None:
        return string(self.res.get("gender"))

    @strawberry.field
    def identifiers(self) -> list[Identifier]:
        return fields.identifiers(self.res.get("identifier"))

    @strawberry.field
    def active(self) -> bool | None:
        value = self.res.get("active")
        return value if isinstance(value, bool) else None

    @field(description="deceasedDateTime, or 'true' for deceasedBoolean true.")
    def deceased(self) -> str | None:
        if self.res.get("deceasedBoolean") is True:
            return "true"
        return string(self.res.get("deceasedDateTime"))

    @field(description="The managing organization's reference (Organization/id).")
    def managing_organization(self) -> str | None:
        org = obj(self.res.get("managingOrganization"))
        return string(org.get("reference")) if org else None

    @field(description="The newest `first` (1-50) encounters by period, newest first.")
    async def encounters(self, info: Ctx, first: int = 5) -> list[Encounter]:
        spec = loaders.Compartment("Encounter", (), "date", args.count(first, "first", high=MAX_ENCOUNTERS))
        return [Encounter.of(r) for r in await loaders.in_compartment(info.context, spec, self.id)]

    @field(description="Allergies (only clinicalStatus active unless activeOnly is false), newest first.")
    async def allergies(self, info: Ctx, active_only: bool = True) -> list[AllergyIntolerance]:
        criteria = (("clinical-status", "active"),) if active_only else ()
        spec = loaders.Compartment("AllergyIntolerance", criteria, "date", MAX_LIST)
        return [AllergyIntolerance.of(r) for r in await loaders.in_compartment(info.context, spec, self.id)]

    @field(
        description="Conditions (only active, recurrence, relapse unless activeOnly is false), newest recorded first."
    )
    async def conditions(self, info: Ctx, active_only: bool = True) -> list[Condition]:
        criteria = (("clinical-status", ACTIVE_CONDITION),) if active_only else ()
        spec = loaders.Compartment("Condition", criteria, "recorded-date", MAX_LIST)
        return [Condition.of(r) for r in await loaders.in_compartment(info.context, spec, self.id)]

    @field(
        description="What other facilities holding this person (by national identifier) share with the caller: "
        "the summary's resources (`encounters`: 1-50, newest) an active Consent permits, or all of them while "
        "the caller's break-the-glass session for this patient (started over REST) is open; each marked with "
        "its source facility. Empty for patient/-scoped callers; never cached."
    )
    async def linked_records(self, info: Ctx, encounters: int = 5) -> list[LinkedRecord]:
        ctx = info.context
        n = args.count(encounters, "encounters", high=MAX_ENCOUNTERS)
        loader = ctx.loader(("linked", n), partial(_load_linked, ctx, n))
        return await loader.load(self.id)

    @classmethod
    async def resolve_reference(cls, info: Ctx, id: strawberry.ID) -> Patient:
        return cls.of(await loaders.require(info.context, "Patient", id))


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type
class PatientEdge:
    cursor: str
    node: Patient


@strawberry.type(description="A page of patients (Relay connection); cursors are opaque and facility-bound.")
class PatientConnection:
    edges: list[PatientEdge]
    page_info: PageInfo

    @strawberry.field
    def nodes(self) -> list[Patient]:
        return [e.node for e in self.edges]


def _position(patient_id: str) -> list[str]:
    """The store's keyset position of a row under ``_sort=_id``: [sort value, id]."""
    return [patient_id, patient_id]


async def _patients(
    ctx: SubgraphContext, first: int, after: str | None, name: str | None, identifier: str | None
) -> PatientConnection:
    settings = ctx.backends.settings
    pairs = [("_count", str(args.count(first, "first", high=settings.max_page_size))), ("_sort", "_id")]
    if name is not None:
        pairs.append(("name", name))
    if identifier is not None:
        pairs.append(("identifier", args.token(identifier, "identifier")))
    query = parse_search("Patient", pairs, strict=True, max_count=settings.max_page_size)
    scope = f"graphql:{query.scope()}"
    position = None if after is None else cursor.decode(settings.secret_key, ctx.facility, scope, after)
    repo = await ctx.repository()
    page = await repo.search(query, after=position)
    edges = [
        PatientEdge(
            cursor=cursor.encode(settings.secret_key, ctx.facility, scope, _position(r.id)),
            node=Patient.of(Resource(r)),
        )
        for r in page.resources
    ]
    end = edges[-1].cursor if edges else None
    return PatientConnection(
        edges=edges, page_info=PageInfo(has_next_page=page.next_position is not None, end_cursor=end)
    )


@strawberry.type
class Query:
    @field(description="The patient with this id in the request's facility (null + NOT_FOUND if none).")
    async def patient(self, info: Ctx, id: strawberry.ID) -> Patient | None:
        return Patient.of(await loaders.require(info.context, "Patient", id))

    @field(description="The facility's patients, by id; `name` and `identifier` as in FHIR search.")
    async def patients(
        self,
        info: Ctx,
        first: int = 20,
        after: str | None = None,
        name: str | None = None,
        identifier: str | None = None,
    ) -> PatientConnection:
        return await _patients(info.context, first, after, name, identifier)


def build_schema() -> SubgraphSchema:
    """The patient subgraph's schema."""
    return SubgraphSchema(name="patient", query=Query, types=[Encounter, AllergyIntolerance, Condition])
