"""Run a query plan: level by level, one request per subgraph per level, results merged.

Contract of :meth:`Executor.run`:
* level 0 sends each subgraph its root fetch; every later level first collects, for each of its
  fetches, the representations of the objects at the fetch's path (``__typename`` equal to the
  fetch's entity type; ``@key`` and ``@requires`` fields as the plan says; objects missing one
  of them are skipped, as Apollo's gateway does), then sends ONE request per subgraph holding
  every fetch of that subgraph at that level as an aliased ``_entities`` field — a 30-patient
  ward is one request per subgraph per level, whatever the number of patients; the requests of
  one level run concurrently, and a fetch without representations sends nothing;
* answers are deep-merged into the objects they belong to (``null`` entities merge nothing);
* subgraph errors keep their message and ``extensions`` (plus ``serviceName``; ``code``
  ``DOWNSTREAM_SERVICE_ERROR`` when they had none), lose their ``locations`` (they point into the
  subgraph's query), and get the client's path: ``_entities`` indexes become the path of the
  object the representation came from;
* a subgraph that cannot be asked (:class:`SubgraphUnavailable`) or answers malformed data adds
  one error without a path (``SUBREQUEST_HTTP_ERROR`` / ``SUBREQUEST_MALFORMED_RESPONSE``) and the
  plan goes on: what it would have answered stays missing, and response shaping turns that
  into ``null`` (partial data), never an exception;
* entity cache (:class:`EntityCache`, none by default): before a level's requests are sent, the
  cache is asked ONCE for every representation of every entity fetch of that level; entities it
  returns are merged as if a subgraph had answered them and their representations are not sent
  (a subgraph whose representations were all found gets no request). After a request whose answer
  has no ``errors`` at all, the entities answered for the representations the cache asked to
  fill (a non-None ticket) are offered to it; an answer with errors offers nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .planner import Fetch, QueryPlan, RepField
from .transport import Forwarded, SubgraphResponse, SubgraphUnavailable, Transport, measured

log = logging.getLogger("unihealth.federation")
Path = list[str | int]
RESERVED_VARIABLE_PREFIX = "_uh_"


@dataclass(slots=True)
class SentRequest:
    """One request the executor sent (for tests, logs and metrics)."""

    level: int
    subgraph: str
    fetches: int
    representations: int


@dataclass(slots=True)
class Outcome:
    data: dict[str, Any]
    errors: list[dict[str, Any]] = field(default_factory=list)
    requests: list[SentRequest] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class EntityBatch:
    """The representations one entity fetch is about to send (what an :class:`EntityCache` sees)."""

    fetch: Fetch
    representations: Sequence[dict[str, Any]]


@dataclass(slots=True)
class CachedEntities:
    """An :class:`EntityCache`'s answer for a level: per batch, per representation, the cached
    entity (a fresh object the executor may merge and mutate) or None, and for a None the ticket
    to offer the answered entity back with (None: do not offer it)."""

    entities: list[list[dict[str, Any] | None]]
    tickets: list[list[Any]]


class EntityCache(Protocol):
    """The hook for caching ``_entities`` answers per representation (the edge's is
    :class:`gateway.graphql_cache.GraphQLCache`). Implementations decide which fetches they cache,
    key by everything the answer depends on (the caller's facility and access level from
    ``forwarded``, the subgraph, the selection, its variables, the representation), record the
    access of what they serve before returning it, and never raise: a failure is a miss."""

    async def lookup_entities(
        self, batches: Sequence[EntityBatch], variables: Mapping[str, Any], forwarded: Forwarded, query: str
    ) -> CachedEntities | None: ...

    async def store_entities(self, offered: Sequence[tuple[Any, dict[str, Any]]], forwarded: Forwarded) -> None: ...


@dataclass(slots=True)
class _Prepared:
    fetch: Fetch
    objects: list[dict[str, Any]]
    paths: list[Path]
    representations: list[dict[str, Any]]
    tickets: list[Any] | None = None  # the entity cache's, per representation


_MISSING = object()


def objects_at(data: Any, path: tuple[str, ...]) -> list[tuple[Path, dict[str, Any]]]:
    """The objects at ``path`` (``@`` = every element of a list), with their concrete paths."""
    current: list[tuple[Path, Any]] = [([], data)]
    for segment in path:
        following: list[tuple[Path, Any]] = []
        for where, value in current:
            if segment == "@":
                if isinstance(value, list):
                    following += [([*where, i], v) for i, v in enumerate(value) if v is not None]
            elif isinstance(value, dict):
                found = value.get(segment)
                if found is not None:
                    following.append(([*where, segment], found))
        current = following
    return [(where, value) for where, value in current if isinstance(value, dict)]


def represent(obj: dict[str, Any], fields: tuple[RepField, ...]) -> dict[str, Any] | None:
    """The representation of ``obj`` (None when a field of it is missing)."""
    out: dict[str, Any] = {}
    for f in fields:
        value = obj.get(f.key, _MISSING)
        if value is _MISSING:
            return None
        if f.children is not None and value is not None:
            if isinstance(value, list):
                items = [represent(v, f.children) if isinstance(v, dict) else v for v in value]
                if any(i is None for i, v in zip(items, value, strict=True) if v is not None):
                    return None
                value = items
            elif isinstance(value, dict):
                value = represent(value, f.children)
                if value is None:
                    return None
        out[f.name] = value
    return out


def deep_merge(target: dict[str, Any], source: dict[str, Any]) -> None:
    """Merge ``source`` into ``target``: objects recursively, lists element by element."""
    for key, value in source.items():
        current = target.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            deep_merge(current, value)
        elif isinstance(current, list) and isinstance(value, list) and len(current) == len(value):
            for i, (a, b) in enumerate(zip(current, value, strict=True)):
                if isinstance(a, dict) and isinstance(b, dict):
                    deep_merge(a, b)
                else:
                    current[i] = b
        else:
            target[key] = value


def subgraph_error(error: Mapping[str, Any], subgraph: str, path: Path | None) -> dict[str, Any]:
    """A subgraph's error as the client sees it (see the module contract)."""
    message = error.get("message")
    out: dict[str, Any] = {
        "message": message
        if isinstance(message, str) and message
        else f'Error while fetching subquery from service "{subgraph}"'
    }
    if path is not None:
        out["path"] = path
    extensions = error.get("extensions")
    extensions = dict(extensions) if isinstance(extensions, dict) else {}
    extensions.setdefault("code", "DOWNSTREAM_SERVICE_ERROR")
    extensions["serviceName"] = subgraph
    out["extensions"] = extensions
    return out


def gateway_error(message: str, code: str, subgraph: str) -> dict[str, Any]:
    return {"message": message, "extensions": {"code": code, "serviceName": subgraph}}


class Executor:
    def __init__(self, transport: Transport, entity_cache: EntityCache | None = None) -> None:
        self.transport = transport
        self.entity_cache = entity_cache

    async def run(
        self, plan: QueryPlan, variables: Mapping[str, Any], forwarded: Forwarded, query: str = ""
    ) -> Outcome:
        """Execute ``plan`` with the client's (raw) ``variables``; ``query`` is the client's text
        (for the access record of entities served from cache). See the module contract."""
        outcome = Outcome({})
        for level, fetches in enumerate(plan.levels):
            groups: dict[str, list[Fetch]] = {}
            for fetch in fetches:
                groups.setdefault(fetch.subgraph, []).append(fetch)
            tasks = []
            if level == 0:
                for group in groups.values():
                    tasks += [self._root(plan, f, variables, forwarded, outcome) for f in group]
            else:
                prepared = {subgraph: self._prepare(group, outcome.data) for subgraph, group in groups.items()}
                if self.entity_cache is not None:
                    prepared = await self._from_cache(prepared, variables, forwarded, query)
                for subgraph, items in prepared.items():
                    if items:
                        tasks.append(self._entities(plan, level, subgraph, items, variables, forwarded, outcome))
            if len(tasks) == 1:
                await tasks[0]
            elif tasks:
                await asyncio.gather(*tasks)
        return outcome

    # ------------------------------------------------------------------ requests
    def _operation_name(self, plan: QueryPlan, subgraph: str, level: int) -> str | None:
        name = plan.operation.name
        return f"{name}__{subgraph}__{level}" if name else None

    def _definitions(self, plan: QueryPlan, used: set[str], extra: list[str]) -> str:
        parts = extra + [plan.variable_definitions[n] for n in sorted(used) if n in plan.variable_definitions]
        return f"({', '.join(parts)})" if parts else ""

    async def _send(
        self,
        subgraph: str,
        query: str,
        variables: dict[str, Any],
        operation_name: str | None,
        forwarded: Forwarded,
        outcome: Outcome,
    ) -> SubgraphResponse | None:
        try:
            response = await measured(
                subgraph, self.transport.send(subgraph, query, variables, operation_name, forwarded)
            )
        except SubgraphUnavailable as exc:
            log.warning("%s", exc)
            outcome.errors.append(gateway_error(str(exc), "SUBREQUEST_HTTP_ERROR", subgraph))
            return None
        except Exception:
            log.exception("subgraph %s request failed", subgraph)
            outcome.errors.append(
                gateway_error(f"subgraph {subgraph} request failed", "SUBREQUEST_HTTP_ERROR", subgraph)
            )
            return None
        return response

    async def _root(
        self, plan: QueryPlan, fetch: Fetch, variables: Mapping[str, Any], forwarded: Forwarded, outcome: Outcome
    ) -> None:
        used = {n for n in fetch.variables if n in variables}
        query = f"query{_space(self._operation_name(plan, fetch.subgraph, 0))}"
        query += f"{self._definitions(plan, fetch.variables, [])} {{ {fetch.selection} }}"
        outcome.requests.append(SentRequest(0, fetch.subgraph, 1, 0))
        answer = await self._send(
            fetch.subgraph,
            query,
            {n: variables[n] for n in used},
            self._operation_name(plan, fetch.subgraph, 0),
            forwarded,
            outcome,
        )
        if answer is None:
            return
        if answer.data:
            deep_merge(outcome.data, answer.data)
        for error in answer.errors:
            raw = error.get("path")
            outcome.errors.append(subgraph_error(error, fetch.subgraph, list(raw) if isinstance(raw, list) else None))

    async def _from_cache(
        self,
        prepared: dict[str, list[_Prepared]],
        variables: Mapping[str, Any],
        forwarded: Forwarded,
        query: str,
    ) -> dict[str, list[_Prepared]]:
        """Merge what the entity cache holds; what is left to send (with the cache's tickets)."""
        assert self.entity_cache is not None
        items = [item for group in prepared.values() for item in group]
        if not items:
            return prepared
        cached = await self.entity_cache.lookup_entities(
            [EntityBatch(i.fetch, i.representations) for i in items], variables, forwarded, query
        )
        if cached is None:
            return prepared
        left: dict[str, list[_Prepared]] = {}
        for item, entities, tickets in zip(items, cached.entities, cached.tickets, strict=True):
            rest = _Prepared(item.fetch, [], [], [], [])
            for n, entity in enumerate(entities):
                if entity is not None:
                    deep_merge(item.objects[n], entity)
                else:
                    rest.objects.append(item.objects[n])
                    rest.paths.append(item.paths[n])
                    rest.representations.append(item.representations[n])
                    assert rest.tickets is not None
                    rest.tickets.append(tickets[n])
            if rest.representations:
                left.setdefault(item.fetch.subgraph, []).append(rest)
        return left

    def _prepare(self, group: list[Fetch], data: dict[str, Any]) -> list[_Prepared]:
        out = []
        for fetch in group:
            objects, paths, representations = [], [], []
            typename = fetch.representation[0].key  # the plan puts __typename first
            for where, obj in objects_at(data, fetch.path):
                if obj.get(typename) != fetch.type_name:
                    continue
                representation = represent(obj, fetch.representation)
                if representation is None or not representation.get("__typename"):
                    continue
                objects.append(obj)
                paths.append(where)
                representations.append(representation)
            if representations:
                out.append(_Prepared(fetch, objects, paths, representations))
        return out

    async def _entities(
        self,
        plan: QueryPlan,
        level: int,
        subgraph: str,
        prepared: list[_Prepared],
        variables: Mapping[str, Any],
        forwarded: Forwarded,
        outcome: Outcome,
    ) -> None:
        used: set[str] = set()
        fields, definitions = [], []
        sent: dict[str, Any] = {}
        for n, item in enumerate(prepared):
            used |= item.fetch.variables
            definitions.append(f"${RESERVED_VARIABLE_PREFIX}r{n}: [_Any!]!")
            fields.append(
                f"{RESERVED_VARIABLE_PREFIX}e{n}: _entities(representations: ${RESERVED_VARIABLE_PREFIX}r{n}) "
                f"{{ ... on {item.fetch.type_name} {{ {item.fetch.selection} }} }}"
            )
            sent[f"{RESERVED_VARIABLE_PREFIX}r{n}"] = item.representations
        name = self._operation_name(plan, subgraph, level)
        query = f"query{_space(name)}{self._definitions(plan, used, definitions)} {{ {' '.join(fields)} }}"
        for used_name in used:
            if used_name in variables:
                sent[used_name] = variables[used_name]
        outcome.requests.append(
            SentRequest(level, subgraph, len(prepared), sum(len(p.representations) for p in prepared))
        )
        answer = await self._send(subgraph, query, sent, name, forwarded, outcome)
        if answer is None:
            return
        data = answer.data or {}
        offered: list[tuple[Any, dict[str, Any]]] = []
        for n, item in enumerate(prepared):
            entities = data.get(f"{RESERVED_VARIABLE_PREFIX}e{n}")
            if entities is None:
                continue
            if not isinstance(entities, list) or len(entities) != len(item.representations):
                outcome.errors.append(
                    gateway_error(
                        f"subgraph {subgraph} answered {len(entities) if isinstance(entities, list) else 'no list of'} "
                        f"entities for {len(item.representations)} representations",
                        "SUBREQUEST_MALFORMED_RESPONSE",
                        subgraph,
                    )
                )
                continue
            for n, (obj, entity) in enumerate(zip(item.objects, entities, strict=True)):
                if isinstance(entity, dict):
                    if item.tickets is not None and item.tickets[n] is not None and not answer.errors:
                        offered.append((item.tickets[n], entity))
                    deep_merge(obj, entity)
        for error in answer.errors:
            outcome.errors.append(subgraph_error(error, subgraph, self._error_path(error.get("path"), prepared)))
        if offered and self.entity_cache is not None:
            await self.entity_cache.store_entities(offered, forwarded)

    @staticmethod
    def _error_path(raw: Any, prepared: list[_Prepared]) -> Path | None:
        if not isinstance(raw, list) or not raw:
            return None
        head = raw[0]
        for n, item in enumerate(prepared):
            if head != f"{RESERVED_VARIABLE_PREFIX}e{n}":
                continue
            if len(raw) > 1 and isinstance(raw[1], int):
                base = item.paths[raw[1]] if 0 <= raw[1] < len(item.paths) else []
                return [*base, *raw[2:]]
            return [*item.fetch.path, "_entities", *raw[1:]]
        return list(raw)


def _space(name: str | None) -> str:
    return f" {name}" if name else ""
