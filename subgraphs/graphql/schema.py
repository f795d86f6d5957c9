"""The strawberry Federation v2 schema class every subgraph uses.

Contract: :class:`SubgraphSchema` is a ``strawberry.federation.Schema`` pinned to
:data:`FEDERATION_VERSION` (its SDL links ``https://specs.apollo.dev/federation/v2.x`` and imports
the directives it uses), with the :class:`~subgraphs.graphql.extensions.SubgraphLifecycle`
extension (authentication, the request's transaction, error codes), and simple fields resolved
directly by graphql-core (:mod:`subgraphs.graphql.direct`). Errors are logged once, by
:func:`subgraphs.graphql.errors.to_graphql` (unexpected ones with their stack trace), not by
strawberry's default logger. A representation that names no entity of the subgraph is
``BAD_USER_INPUT`` (strawberry would fail with an internal error).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import strawberry
from graphql import GraphQLError
from strawberry.federation.schema import FederationAny
from strawberry.types import ExecutionContext, Info

from subgraphs.store.errors import bad_request

from . import direct
from .extensions import SubgraphLifecycle

# Federation 2.3: @key/@shareable/@external/@requires/@provides/@interfaceObject — supported by
# Apollo Router and Gateway 2.x, Hive Gateway and Cosmo alike.
FEDERATION_VERSION: Literal["2.3"] = "2.3"


class SubgraphSchema(strawberry.federation.Schema):
    def __init__(self, *, name: str, query: type[Any], types: Iterable[type[Any]] = ()) -> None:
        self.name = name
        super().__init__(
            query=query,
            types=list(types),
            extensions=[SubgraphLifecycle],
            federation_version=FEDERATION_VERSION,
            execution_context_class=direct.DirectExecutionContext,
        )
        direct.install(self._schema)

    def entities_resolver(self, info: Info, representations: list[FederationAny]) -> list[FederationAny]:
        """strawberry's, after checking that every representation names an entity type here."""
        type_map = self.schema_converter.type_map
        for representation in representations:
            typename = representation.get("__typename") if isinstance(representation, dict) else None
            found = type_map.get(typename) if isinstance(typename, str) else None
            origin = getattr(found.definition, "origin", None) if found is not None else None
            if not hasattr(origin, "resolve_reference"):
                raise bad_request("each representation needs the __typename of an entity of this subgraph")
        return super().entities_resolver(info, representations)

    def process_errors(self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None) -> None:
        """Logged by :func:`subgraphs.graphql.errors.to_graphql` instead."""
