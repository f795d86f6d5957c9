"""GraphQL errors of the subgraphs: the one place where failures get their ``extensions.code``.

Contract: :func:`to_graphql` maps every error of a result once:

* a :class:`~subgraphs.store.errors.FhirError` keeps its diagnostics as the message and gets the
  code of its status (:data:`CODES`: 400 → ``BAD_USER_INPUT``, 401 → ``UNAUTHENTICATED``,
  403 → ``FORBIDDEN``, 404/410 → ``NOT_FOUND``); absent and "exists in another facility" are the
  same ``NOT_FOUND``;
* syntax errors are ``GRAPHQL_PARSE_FAILED``, validation errors ``GRAPHQL_VALIDATION_FAILED``,
  variable values that do not coerce ``BAD_USER_INPUT`` (Apollo's codes);
* anything else is ``INTERNAL_SERVER_ERROR`` with a fixed message: no exception text, SQL or stack
  trace reaches the client (the details go to the log).
"""

from __future__ import annotations

import logging

from graphql import GraphQLError, GraphQLSyntaxError

from subgraphs.store.errors import FhirError

log = logging.getLogger("unihealth.graphql")

CODES = {
    400: "BAD_USER_INPUT",
    401: "UNAUTHENTICATED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    410: "NOT_FOUND",
    412: "BAD_USER_INPUT",
    422: "BAD_USER_INPUT",
}
INTERNAL = "INTERNAL_SERVER_ERROR"
INTERNAL_MESSAGE = "internal error"


def code_for(error: FhirError) -> str:
    """The GraphQL ``extensions.code`` of a store error."""
    if error.status in CODES:
        return CODES[error.status]
    return INTERNAL if error.status >= 500 else "BAD_REQUEST"


def _with(error: GraphQLError, message: str, code: str) -> GraphQLError:
    return GraphQLError(
        message,
        nodes=error.nodes,
        source=error.source,
        positions=error.positions,
        path=error.path,
        extensions={**(error.extensions or {}), "code": code},
    )


def to_graphql(error: GraphQLError, *, validation: bool = False) -> GraphQLError:
    """``error`` with its ``extensions.code`` (see the module contract); ``validation`` marks
    errors raised while validating the document."""
    original = error.original_error
    if isinstance(original, FhirError):
        return _with(error, original.diagnostics, code_for(original))
    if original is None or isinstance(original, GraphQLError):
        if error.extensions and "code" in error.extensions:
            return error
        if isinstance(error, GraphQLSyntaxError):
            return _with(error, error.message, "GRAPHQL_PARSE_FAILED")
        if validation:
            return _with(error, error.message, "GRAPHQL_VALIDATION_FAILED")
        if error.path is None:  # raised before any resolver ran: variable coercion
            return _with(error, error.message, "BAD_USER_INPUT")
        log.error("GraphQL execution error at %s: %s", error.path, error.message)
        return _with(error, INTERNAL_MESSAGE, INTERNAL)
    log.error("unexpected error at %s", error.path, exc_info=original)
    return _with(error, INTERNAL_MESSAGE, INTERNAL)


def is_expected(error: GraphQLError) -> bool:
    """Client-caused errors, which are not worth a log line with a stack trace."""
    return error.original_error is None or isinstance(error.original_error, FhirError | GraphQLError)
