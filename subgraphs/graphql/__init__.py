"""What the three GraphQL subgraphs (patient, observation, medication) share.

``context`` (caller, facility, the request's one transaction, DataLoaders), ``loaders`` and
``queries`` (batched reads: one SQL statement per DataLoader batch), ``resource``/``fields``/
``types`` (stored FHIR JSON → typed GraphQL fields), ``errors`` (``extensions.code``),
``extensions`` (the request lifecycle), ``schema`` (the Federation v2 schema class) and ``app``
(ASGI apps at ``/graphql``). Nothing here does I/O at import time.
"""

SUBGRAPHS = ("patient", "observation", "medication")
