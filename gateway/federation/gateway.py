"""The federated gateway: one GraphQL request in, one response out.

Contract of :meth:`FederatedGateway.execute` (never raises for anything a client can send):
* no ``query`` → 400 ``BAD_REQUEST``; syntax errors → 400 ``GRAPHQL_PARSE_FAILED``; documents that
  are not valid against the supergraph's API schema → 400 ``GRAPHQL_VALIDATION_FAILED`` (one
  error per problem, with locations); an operation name that names nothing, or none for several
  operations → 400 ``OPERATION_RESOLUTION_FAILURE``; variable values that do not coerce → 400
  ``BAD_USER_INPUT``; depth or cost over :class:`GatewayConfig` → 400 ``DEPTH_LIMIT_EXCEEDED`` /
  ``COST_LIMIT_EXCEEDED``; all of these answer ``{"errors": [...]}`` without ``data`` and send
  nothing to any subgraph;
* otherwise the plan (cached per query text, operation name and the values of the variables
  that change it) runs through the :class:`~gateway.federation.executor.Executor` and the result
  is shaped (:mod:`gateway.federation.shaping`): 200 with ``data`` (possibly partial, possibly
  ``null``) and, if anything failed, ``errors`` — a subgraph that is down is an error, not a 500;
* parse and validation results are cached per query text (bounded LRU), so a repeated operation
  costs a dictionary lookup before execution;
* the response-cache hook (:class:`ResponseCache`, none by default) is asked before execution and
  offered every 200 response without errors after it; the entity-cache hook
  (:class:`~gateway.federation.executor.EntityCache`, none by default) is the executor's, asked per
  plan level; the gateway does not cache by itself.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import orjson
from graphql import (
    DocumentNode,
    GraphQLError,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    execute_sync,
    get_operation_ast,
    parse,
    validate,
)
from graphql.execution.values import get_variable_values

from .executor import RESERVED_VARIABLE_PREFIX, EntityCache, Executor, SentRequest
from .limits import LimitExceeded, check
from .operation import Field, Operation, normalize, operation_variables
from .planner import Planner, PlanningError, QueryPlan
from .shaping import shape
from .supergraph import Supergraph
from .transport import Forwarded, Transport

log = logging.getLogger("unihealth.federation")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    max_depth: int = 12
    max_cost: int = 5000
    max_tokens: int = 15000  # lexical tokens per document (parse refuses more)
    plan_cache_size: int = 1000
    document_cache_size: int = 1000


@dataclass(frozen=True, slots=True)
class GraphQLRequest:
    query: str | None
    variables: Mapping[str, Any] | None = None
    operation_name: str | None = None


@dataclass(slots=True)
class GatewayResponse:
    status: int
    body: dict[str, Any]
    requests: list[SentRequest] = field(default_factory=list)  # what was sent to subgraphs


@dataclass(frozen=True, slots=True)
class PreparedOperation:
    """What a response cache needs to key an answer (see :class:`ResponseCache`)."""

    plan: QueryPlan
    fingerprint: str  # sha256 of the query text, operation name and variable values
    patients: tuple[str, ...]  # ids of the Query.patient(id:) fields the operation is rooted on
    query: str = ""  # the client's query text (for the access record of an answer served from cache)
    state: dict[str, Any] = field(default_factory=dict, compare=False)  # the cache's, from lookup to store


class ResponseCache(Protocol):
    """The hook for caching assembled answers (the edge's is :class:`gateway.graphql_cache.GraphQLCache`).

    ``lookup`` returns a stored response body or None; ``store`` is offered every 200 response
    without errors, with the same :class:`PreparedOperation` (whose ``state`` carries what lookup
    learnt, e.g. a generation token). Implementations key by the facility and the caller's access
    level (both from ``forwarded``), the patients and the fingerprint, are invalidated by change
    events, and record the access of an answer they serve (no subgraph is asked then).
    """

    async def lookup(self, operation: PreparedOperation, forwarded: Forwarded) -> dict[str, Any] | None: ...

    async def store(self, operation: PreparedOperation, forwarded: Forwarded, body: dict[str, Any]) -> None: ...


class _LRU(Generic[K, V]):
    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        found = self.items.get(key)
        if found is not None:
            self.items.move_to_end(key)
        return found

    def put(self, key: K, value: V) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


def _error(message: str, code: str, locations: list[Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"message": message}
    if locations:
        out["locations"] = locations
    out["extensions"] = {"code": code}
    return out


def _graphql_errors(errors: list[GraphQLError], code: str) -> dict[str, Any]:
    return {
        "errors": [
            _error(e.message, code, [{"line": loc.line, "column": loc.column} for loc in e.locations or ()])
            for e in errors
        ]
    }


@dataclass(slots=True)
class _Document:
    document: DocumentNode | None
    errors: dict[str, Any] | None  # the 400 body, if the text is not a valid document


@dataclass(slots=True)
class _Planned:
    plan: QueryPlan | None
    error: tuple[str, str] | None = None  # (code, message)


class FederatedGateway:
    """See the module contract."""

    def __init__(
        self,
        supergraph: Supergraph,
        transport: Transport,
        config: GatewayConfig | None = None,
        *,
        cache: ResponseCache | None = None,
        entity_cache: EntityCache | None = None,
    ) -> None:
        self.supergraph = supergraph
        self.transport = transport
        self.config = config or GatewayConfig()
        self.cache = cache
        self.planner = Planner(supergraph)
        self.executor = Executor(transport, entity_cache)
        self._documents: _LRU[str, _Document] = _LRU(self.config.document_cache_size)
        self._plans: _LRU[Hashable, _Planned] = _LRU(self.config.plan_cache_size)

    async def close(self) -> None:
        await self.transport.close()

    # ------------------------------------------------------------------ request → plan
    def _document(self, query: str) -> _Document:
        found = self._documents.get(query)
        if found is not None:
            return found
        schema = self.supergraph.api_schema
        try:
            document = parse(query, max_tokens=self.config.max_tokens, allow_empty_selection_sets=False)
        except GraphQLError as exc:
            found = _Document(None, _graphql_errors([exc], "GRAPHQL_PARSE_FAILED"))
        else:
            errors = validate(schema, document, allow_empty_selection_sets=False)
            found = _Document(
                None if errors else document, _graphql_errors(errors, "GRAPHQL_VALIDATION_FAILED") if errors else None
            )
        self._documents.put(query, found)
        return found

    def _plan(
        self, query: str, document: DocumentNode, definition: OperationDefinitionNode, variables: Mapping[str, Any]
    ) -> _Planned:
        name = definition.name.value if definition.name else None
        relevant = operation_variables(document, definition)
        key = (query, name, orjson.dumps([variables.get(v) for v in relevant], default=str))
        found = self._plans.get(key)
        if found is not None:
            return found
        operation = normalize(self.supergraph.api_schema, document, definition, variables)
        try:
            check(
                self.supergraph.api_schema,
                operation.selections,
                variables,
                self.supergraph.is_entity,
                max_depth=self.config.max_depth,
                max_cost=self.config.max_cost,
            )
            found = _Planned(self.planner.plan(operation))
        except LimitExceeded as exc:
            found = _Planned(None, (exc.code, exc.message))
        except PlanningError as exc:
            found = _Planned(None, ("GRAPHQL_VALIDATION_FAILED", str(exc)))
        self._plans.put(key, found)
        return found

    # ------------------------------------------------------------------ execute
    async def execute(self, request: GraphQLRequest, forwarded: Forwarded) -> GatewayResponse:
        """One client request (see the module contract)."""
        if not isinstance(request.query, str) or not request.query.strip():
            return GatewayResponse(
                400, {"errors": [_error("GraphQL operations must contain a non-empty `query`.", "BAD_REQUEST")]}
            )
        parsed = self._document(request.query)
        if parsed.document is None:
            return GatewayResponse(400, parsed.errors or {"errors": []})
        document = parsed.document
        definition = get_operation_ast(document, request.operation_name)
        if definition is None:
            message = (
                f'Unknown operation named "{request.operation_name}".'
                if request.operation_name
                else "Must provide operation name if query contains multiple operations."
            )
            return GatewayResponse(400, {"errors": [_error(message, "OPERATION_RESOLUTION_FAILURE")]})
        if definition.operation != OperationType.QUERY:
            kind = definition.operation.value
            return GatewayResponse(
                400, {"errors": [_error(f"{kind} operations are not supported by this gateway", "BAD_REQUEST")]}
            )
        reserved = [
            d.variable.name.value
            for d in definition.variable_definitions or ()
            if d.variable.name.value.startswith(RESERVED_VARIABLE_PREFIX)
        ]
        if reserved:
            message = f'Variable "${reserved[0]}": names starting with {RESERVED_VARIABLE_PREFIX} are reserved.'
            return GatewayResponse(400, {"errors": [_error(message, "BAD_USER_INPUT")]})
        raw = dict(request.variables or {})
        coerced = get_variable_values(self.supergraph.api_schema, definition.variable_definitions or (), raw)
        if isinstance(coerced, list):
            return GatewayResponse(400, _graphql_errors(coerced, "BAD_USER_INPUT"))
        values: dict[str, Any] = dict(coerced.coerced)
        planned = self._plan(request.query, document, definition, values)
        if planned.plan is None:
            code, message = planned.error or ("INTERNAL_SERVER_ERROR", "internal error")
            return GatewayResponse(400, {"errors": [_error(message, code)]})
        return await self._run(planned.plan, request, raw, values, forwarded, document)

    async def _run(
        self,
        plan: QueryPlan,
        request: GraphQLRequest,
        raw: dict[str, Any],
        coerced: dict[str, Any],
        forwarded: Forwarded,
        document: DocumentNode,
    ) -> GatewayResponse:
        prepared = None
        if self.cache is not None:
            prepared = PreparedOperation(
                plan, fingerprint(request), rooted_patients(plan.operation, coerced), request.query or ""
            )
            cached = await self.cache.lookup(prepared, forwarded)
            if cached is not None:
                return GatewayResponse(200, cached)
        try:
            outcome = await self.executor.run(plan, raw, forwarded, request.query or "")
            data, completion = shape(
                self.supergraph.api_schema,
                plan.operation,
                outcome.data,
                lambda f: self._introspect(f, plan.operation, document, coerced),
            )
        except Exception:
            log.exception("the gateway failed to execute an operation")
            return GatewayResponse(500, {"errors": [_error("internal error", "INTERNAL_SERVER_ERROR")], "data": None})
        body: dict[str, Any] = {}
        if outcome.errors:
            body["errors"] = outcome.errors
        body["data"] = data
        if completion and not outcome.errors:
            body["extensions"] = {"valueCompletion": completion}
        if prepared is not None and self.cache is not None and not outcome.errors:
            await self.cache.store(prepared, forwarded, body)
        return GatewayResponse(200, body, outcome.requests)

    def _introspect(self, f: Field, operation: Operation, document: DocumentNode, variables: dict[str, Any]) -> Any:
        """``__schema``/``__type`` answered from the API schema."""
        definition = OperationDefinitionNode(
            operation=OperationType.QUERY,
            variable_definitions=operation.definition.variable_definitions,
            directives=(),
            selection_set=SelectionSetNode(selections=tuple(f.nodes)),
        )
        single = DocumentNode(definitions=(definition, *operation.fragments.values()))
        result = execute_sync(self.supergraph.api_schema, single, variable_values=variables)
        return (result.data or {}).get(f.key)


def fingerprint(request: GraphQLRequest) -> str:
    """sha256 of the query text, operation name and variable values (a response-cache key part)."""
    payload = orjson.dumps(
        [request.query, request.operation_name, dict(request.variables or {})], option=orjson.OPT_SORT_KEYS, default=str
    )
    return hashlib.sha256(payload).hexdigest()


def rooted_patients(operation: Operation, variables: Mapping[str, Any]) -> tuple[str, ...]:
    """The ids of ``Query.patient(id: ...)`` root fields (literal or variable)."""
    from graphql import StringValueNode, VariableNode

    out = []
    for selection in operation.selections:
        if not isinstance(selection, Field) or selection.name != "patient":
            continue
        for argument in selection.node.arguments or ():
            if argument.name.value != "id":
                continue
            if isinstance(argument.value, StringValueNode):
                out.append(argument.value.value)
            elif isinstance(argument.value, VariableNode):
                value = variables.get(argument.value.name.value)
                if isinstance(value, str):
                    out.append(value)
    return tuple(out)
