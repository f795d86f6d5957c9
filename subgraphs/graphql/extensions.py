"""The request lifecycle of a subgraph operation, as one strawberry schema extension.

Contract of :class:`SubgraphLifecycle`:
* before execution, an operation that selects anything but ``_service``, ``__typename`` or
  introspection opens its access record, authenticates the caller and opens the request's
  transaction; if that fails the operation is not executed and answers ``data: null`` with ONE
  error (``UNAUTHENTICATED``, ``FORBIDDEN`` or ``BAD_USER_INPUT`` for a malformed
  ``X-Facility-Id``). The SDL (``_service { sdl }``) needs no token: it is the schema, not data;
* when the operation ends — normally, with errors, or by an exception — the transaction is closed
  (rolled back when an exception escaped), then the access record is persisted with the outcome
  (200, or the status of the gravest error: 401, 403, 404, 400, 500) before the response leaves;
  if it cannot be persisted the answer carries no data;
* every error of the result gets its ``extensions.code`` through :func:`errors.to_graphql`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

from graphql import ExecutionResult as GraphQLExecutionResult
from graphql import FieldNode, GraphQLError, OperationDefinitionNode, get_operation_ast
from strawberry.extensions import SchemaExtension

from subgraphs.store.errors import FhirError

from .context import SubgraphContext
from .errors import INTERNAL, INTERNAL_MESSAGE, to_graphql

PUBLIC_ROOT_FIELDS = frozenset({"_service", "__typename", "__schema", "__type"})
log = logging.getLogger("unihealth.graphql")


def needs_data(operation: OperationDefinitionNode) -> bool:
    """Whether the operation selects anything beyond the SDL, ``__typename`` and introspection."""
    for selection in operation.selection_set.selections:
        if not isinstance(selection, FieldNode) or selection.name.value not in PUBLIC_ROOT_FIELDS:
            return True
    return False


def outcome(errors: Sequence[GraphQLError] | None) -> tuple[int, str]:
    """The HTTP-like status and detail of a result for its access record: 200 without errors,
    else the gravest error's (an unexpected one is 500)."""
    worst, detail = 200, ""
    for error in errors or ():
        original = error.original_error
        status = original.status if isinstance(original, FhirError) else 500
        if status > worst or (status == worst and not detail):
            worst, detail = status, original.diagnostics if isinstance(original, FhirError) else INTERNAL_MESSAGE
    return worst, detail


class SubgraphLifecycle(SchemaExtension):
    def __init__(self) -> None:
        self._validation_errors: set[int] = set()

    def _context(self) -> SubgraphContext | None:
        ctx = self.execution_context.context
        return ctx if isinstance(ctx, SubgraphContext) else None

    async def on_validate(self) -> AsyncIterator[None]:
        yield
        self._validation_errors = {id(e) for e in self.execution_context.pre_execution_errors or ()}

    async def on_execute(self) -> AsyncIterator[None]:
        ctx = self._context()
        document = self.execution_context.graphql_document
        operation = None if document is None else get_operation_ast(document, self.execution_context.operation_name)
        if ctx is not None and operation is not None and needs_data(operation):
            ctx.start_audit(self.execution_context.query or "")
            try:
                await ctx.repository()
            except FhirError as exc:
                error = GraphQLError(exc.diagnostics, original_error=exc)
                self.execution_context.result = GraphQLExecutionResult(data=None, errors=[error])
        yield

    async def on_operation(self) -> AsyncIterator[None]:
        ctx = self._context()
        try:
            yield
        except BaseException as exc:
            if ctx is not None:
                await ctx.close(exc)
            raise
        result = self.execution_context.result
        if ctx is not None:
            await ctx.close()
            try:
                await ctx.record(*outcome(result.errors if result is not None else None))
            except Exception:
                log.exception("could not persist the access record; the answer is withheld")
                if result is not None:
                    result.data = None
                    result.errors = [GraphQLError(INTERNAL_MESSAGE, extensions={"code": INTERNAL})]
                return
        if result is not None and result.errors:
            result.errors = [to_graphql(e, validation=id(e) in self._validation_errors) for e in result.errors]
