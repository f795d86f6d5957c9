"""Observability of the HTTP processes (edge and subgraphs): request ids, structured logs,
Prometheus metrics, readiness.

Modules: :mod:`.request_id` (the id of the current request, in a contextvar), :mod:`.logs` (the one
logging setup of every process, text or JSON), :mod:`.instruments` (every metric family of the
edge and the subgraphs, and the functions other modules call to record), :mod:`.asgi` (the
outermost ASGI layer: request id, access log, request-duration histogram), :mod:`.cache` (cache
hit/miss counting around any :class:`~streams.cache.Cache`), :mod:`.endpoints` (``/metrics`` and
``/readyz``). The registry itself is :data:`streams.metrics.REGISTRY`, shared with the relay and
the worker.
"""
