"""The medication subgraph: ``MedicationRequest``, ``Medication`` and ``Patient.medicationRequests``.

Contract:
* ``Patient`` here is the patient subgraph's entity (``@key(fields: "id")``) contributing
  ``medicationRequests``; resolving it checks, in one query per request, that the patient exists
  in the request's facility and that the caller may read it (else ``null`` and ``NOT_FOUND``).
* ``medicationRequests(status, first)``: the patient's MedicationRequests newest ``authoredOn``
  first, ``status`` a FHIR token (comma = any of), at most ``first`` (1 to 1000); one query for all
  patients of a request, only what the caller may search.
* ``MedicationRequest.medication`` is ``medication.concept``; ``medicationReference`` resolves a
  referenced Medication of the same facility (batched, one query per request).
* ``medicationRequest(id)``, ``medication(id)``: one resource, or null + ``NOT_FOUND``.
"""

from __future__ import annotations

import strawberry
from strawberry.types import Info

from subgraphs.graphql import args, fields, loaders
from subgraphs.graphql.context import SubgraphContext
from subgraphs.graphql.resource import obj, objects, string
from subgraphs.graphql.schema import SubgraphSchema
from subgraphs.graphql.types import PATIENT_DESCRIPTION, Concept, ResourceFields, field
from subgraphs.store.params import split_reference

Ctx = Info[SubgraphContext, None]


@strawberry.federation.type(keys=["id"], description="A FHIR Medication (shared reference data of the facility).")
class Medication(ResourceFields):
    @strawberry.field
    def code(self) -> Concept | None:
        return fields.concept(self.res.get("code"))

    @strawberry.field
    def status(self) -> str | None:
        return string(self.res.get("status"))

    @field(description="Medication.doseForm.")
    def dose_form(self) -> Concept | None:
        return fields.concept(self.res.get("doseForm"))

    @classmethod
    async def resolve_reference(cls, info: Ctx, id: strawberry.ID) -> Medication:
        return cls.of(await loaders.require(info.context, "Medication", id))


@strawberry.federation.type(keys=["id"], description="A FHIR MedicationRequest.")
class MedicationRequest(ResourceFields):
    @strawberry.field
    def status(self) -> str | None:
        return string(self.res.get("status"))

    @strawberry.field
    def intent(self) -> str | None:
        return string(self.res.get("intent"))

    @field(description="medication.concept: the medication as a code (null when only referenced).")
    def medication(self) -> Concept | None:
        med = obj(self.res.get("medication"))
        return fields.concept(med.get("concept")) if med else None

    @field(description="The Medication that medication.reference points to, if any (same facility).")
    async def medication_reference(self, info: Ctx) -> Medication | None:
        med = obj(self.res.get("medication"))
        ref = obj(med.get("reference")) if med else None
        target = split_reference(ref["reference"]) if ref and isinstance(ref.get("reference"), str) else None
        if target is None or target[0] != "Medication":
            return None
        found = await loaders.by_id(info.context, "Medication", target[1])
        return Medication.of(found) if found is not None else None

    @strawberry.field
    def authored_on(self) -> str | None:
        return string(self.res.get("authoredOn"))

    @field(description="The texts of dosageInstruction, joined by '; '.")
    def dosage_text(self) -> str | None:
        texts = [t for t in (string(d.get("text")) for d in objects(self.res.get("dosageInstruction"))) if t]
        return "; ".join(texts) or None

    @field(description="The requester's reference (Practitioner/id...).")
    def requester(self) -> str | None:
        ref = obj(self.res.get("requester"))
        return string(ref.get("reference")) if ref else None

    @field(description="The subject's reference (Patient/id).")
    def subject(self) -> str | None:
        ref = obj(self.res.get("subject"))
        return string(ref.get("reference")) if ref else None

    @classmethod
    async def resolve_reference(cls, info: Ctx, id: strawberry.ID) -> MedicationRequest:
        return cls.of(await loaders.require(info.context, "MedicationRequest", id))


@strawberry.federation.type(keys=["id"], description=PATIENT_DESCRIPTION)
class Patient:
    id: strawberry.ID

    @field(description="MedicationRequests newest authoredOn first; status as a FHIR token.")
    async def medication_requests(
        self, info: Ctx, status: str | None = None, first: int = 20
    ) -> list[MedicationRequest]:
        criteria = (("status", args.token(status, "status")),) if status is not None else ()
        spec = loaders.Compartment("MedicationRequest", criteria, "authoredon", args.count(first, "first"))
        return [MedicationRequest.of(r) for r in await loaders.in_compartment(info.context, spec, self.id)]

    @classmethod
    async def resolve_reference(cls, info: Ctx, id: strawberry.ID) -> Patient:
        return cls(id=strawberry.ID(await loaders.require_visible(info.context, "Patient", id)))


@strawberry.type
class Query:
    @field(description="The MedicationRequest with this id (null + NOT_FOUND if none).")
    async def medication_request(self, info: Ctx, id: strawberry.ID) -> MedicationRequest | None:
        return MedicationRequest.of(await loaders.require(info.context, "MedicationRequest", id))

    @field(description="The Medication with this id (null + NOT_FOUND if none).")
    async def medication(self, info: Ctx, id: strawberry.ID) -> Medication | None:
        return Medication.of(await loaders.require(info.context, "Medication", id))


def build_schema() -> SubgraphSchema:
    """The medication subgraph's schema."""
    return SubgraphSchema(name="medication", query=Query, types=[Patient])
