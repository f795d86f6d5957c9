"""The subgraphs' DataLoaders: every resolver that can run for many parents loads through these.

Contract: each function enqueues one key on the request's DataLoader for what it asks
(:meth:`SubgraphContext.loader`); all keys enqueued in the same tick of the event loop are
answered by ONE statement of :mod:`subgraphs.graphql.queries` — N patients, one query. Loaders
are keyed by everything that changes the SQL or its values (type, criteria, limit), so two fields
with different arguments never share a batch, and equal ones share results. Input is checked
before anything is enqueued: malformed ids and search values are 400 (``BAD_USER_INPUT``), a
missing grant 403; what is absent here or outside the caller's access is ``None`` / left out
(:func:`require` turns it into 404: same answer as another facility's id). Every batch's size is
recorded in ``unihealth_dataloader_batch_size`` (loader kind and resource type: bounded labels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from gateway.observability.instruments import record_batch
from subgraphs.store.errors import not_found
from subgraphs.store.records import check_id
from subgraphs.store.search import SearchQuery, parse_search

from . import queries
from .context import SubgraphContext
from .resource import Resource

Criteria = tuple[tuple[str, str], ...]


# ---------------------------------------------------------------------------------- by id
async def _load_by_id(ctx: SubgraphContext, resource_type: str, ids: list[str]) -> list[Resource | None]:
    record_batch("by-id", resource_type, len(ids))
    repo = await ctx.repository()
    found = await queries.resources_by_ids(repo, resource_type, ids)
    return [Resource(found[i]) if i in found else None for i in ids]


async def by_id(ctx: SubgraphContext, resource_type: str, resource_id: str) -> Resource | None:
    """The current version of ``resource_type/resource_id`` the caller may read, else None."""
    check_id(resource_id)
    ctx.policy.grant(resource_type, "r")
    loader = ctx.loader(("by-id", resource_type), partial(_load_by_id, ctx, resource_type))
    return await loader.load(resource_id)


async def require(ctx: SubgraphContext, resource_type: str, resource_id: str) -> Resource:
    """As :func:`by_id`, but 404 when there is nothing (absent, deleted, elsewhere or invisible)."""
    found = await by_id(ctx, resource_type, resource_id)
    if found is None:
        raise not_found(resource_type, resource_id)
    return found


async def _load_visible(ctx: SubgraphContext, resource_type: str, ids: list[str]) -> list[bool]:
    record_batch("visible", resource_type, len(ids))
    repo = await ctx.repository()
    seen = await queries.visible_ids(repo, resource_type, ids)
    return [i in seen for i in ids]


async def require_visible(ctx: SubgraphContext, resource_type: str, resource_id: str) -> str:
    """``resource_id`` if the caller may read it here (without loading its content), else 404."""
    check_id(resource_id)
    ctx.policy.grant(resource_type, "r")
    loader = ctx.loader(("visible", resource_type), partial(_load_visible, ctx, resource_type))
    if not await loader.load(resource_id):
        raise not_found(resource_type, resource_id)
    return resource_id


# ---------------------------------------------------------------------------------- compartments
@dataclass(frozen=True, slots=True)
class Compartment:
    """What to list from each patient's compartment: ``type`` matching ``criteria`` (FHIR search
    pairs: comma = OR, repeated = AND), the newest ``limit`` by ``sort_param``."""

    type: str
    criteria: Criteria
    sort_param: str
    limit: int

    def query(self) -> SearchQuery:
        """The criteria as a search (400 with the offending parameter on malformed values)."""
        return parse_search(self.type, list(self.criteria), strict=True)


async def _load_compartments(ctx: SubgraphContext, spec: Compartment, patients: list[str]) -> list[list[Resource]]:
    record_batch("compartment", spec.type, len(patients))
    repo = await ctx.repository()
    found = await queries.compartments(repo, spec.query(), patients, sort_param=spec.sort_param, limit=spec.limit)
    return [[Resource(s) for s in found.get(p, ())] for p in patients]


async def in_compartment(ctx: SubgraphContext, spec: Compartment, patient_id: str) -> list[Resource]:
    """The resources ``spec`` selects from ``patient_id``'s compartment, newest first."""
    spec.query()  # reject bad input before it is batched with good
    ctx.policy.grant(spec.type, "s")
    loader = ctx.loader(("compartment", spec), partial(_load_compartments, ctx, spec))
    return await loader.load(patient_id)


async def _load_latest(
    ctx: SubgraphContext, resource_type: str, categories: tuple[str, ...], patients: list[str]
) -> list[list[Resource]]:
    record_batch("latest-per-code", resource_type, len(patients))
    repo = await ctx.repository()
    found = await queries.latest_per_code(repo, resource_type, patients, categories)
    return [[Resource(s) for s in found.get(p, ())] for p in patients]


async def latest_per_code(
    ctx: SubgraphContext, resource_type: str, categories: Sequence[str], patient_id: str
) -> list[Resource]:
    """The newest resource of each code in ``categories`` of ``patient_id``'s compartment."""
    ctx.policy.grant(resource_type, "s")
    key = tuple(categories)
    loader = ctx.loader(("latest", resource_type, key), partial(_load_latest, ctx, resource_type, key))
    return await loader.load(patient_id)
