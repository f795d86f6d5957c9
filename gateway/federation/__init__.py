"""A Python Apollo Federation v2 gateway: supergraph, planner, executor, transports.

Modules, in data-flow order (each is small and has its own contract):

* :mod:`.fieldsets` — ``@key``/``@requires``/``@provides`` field sets;
* :mod:`.supergraph` — the merged graph: which subgraph resolves which field, keys, requires,
  provides; read from a supergraph SDL (:func:`load_supergraph`);
* :mod:`.composition` — the same built from subgraph SDLs (:func:`compose`); conflicts are
  :class:`CompositionError`;
* :mod:`.operation` — a validated client operation normalized to a field tree (fragments inlined,
  ``@skip``/``@include`` applied);
* :mod:`.limits` — depth and cost of a normalized operation;
* :mod:`.planner` — the fetch plan: root fetches, then ``_entities`` fetches level by level;
* :mod:`.transport` — how a subgraph request is sent: HTTP (httpx, pooled) or in-process
  (the subgraph's strawberry schema executed directly);
* :mod:`.executor` — runs a plan: one request per subgraph per level, merged results, error paths;
* :mod:`.shaping` — the final response: the client's selection, order, null propagation;
* :mod:`.gateway` — :class:`FederatedGateway`, the one entry point (parse, validate, limits, plan
  cache, execute, shape).

Nothing here does I/O at import time.
"""

from .composition import compose
from .gateway import FederatedGateway, GatewayConfig, GatewayResponse, GraphQLRequest
from .supergraph import CompositionError, Supergraph, load_supergraph

__all__ = [
    "CompositionError",
    "FederatedGateway",
    "GatewayConfig",
    "GatewayResponse",
    "GraphQLRequest",
    "Supergraph",
    "compose",
    "load_supergraph",
]
