"""The per-request context of a subgraph: caller, facility, the one transaction, the DataLoaders.

Contract:
* Built from the request headers without I/O and without failing (:meth:`SubgraphContext.from_headers`);
  authentication happens on first use, exactly as REST does it: ``Authorization: Bearer <JWT>``
  verified by ``backends.verifier`` (401), ``X-Facility-Id`` checked by
  :func:`gateway.context.check_facility` (400) and required to be one of the token's facilities
  (403), the access policy from :func:`gateway.security.policy.policy_for`. A failure is cached
  and raised again on every later use, as a :class:`~subgraphs.store.errors.FhirError`.
* :meth:`SubgraphContext.repository` opens ONE read transaction per request, lazily, through
  ``backends.session(ctx, write=False)`` (so the caller's policy is compiled into every
  statement) and returns the same repository to every resolver; :meth:`close` ends it (rollback
  when given an exception) and is idempotent. The request lifecycle extension
  (:mod:`subgraphs.graphql.extensions`) calls it when the operation ends, errors included.
* An operation that reads data has one access record (:class:`~gateway.security.audit.AccessAudit`,
  interaction ``graphql``), opened by :meth:`start_audit`: the verified principal, the facility,
  the operation text, and — through the repository — every resource it returned and their
  patients. :meth:`record` persists it (allowed or denied) before the response leaves, as REST
  does (``Backends.record_access``).
* :meth:`loader` returns the request's DataLoader for a key, creating it on first use: loaders
  never outlive the request, so nothing is cached across callers. A batch holds at most
  :data:`MAX_BATCH` keys (more are split into several batches).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Hashable, Mapping
from contextlib import AsyncExitStack
from typing import Any, TypeVar, cast

from aiodataloader import DataLoader

from gateway.backends import Backends
from gateway.context import RequestContext, check_facility
from gateway.security.audit import AccessAudit
from gateway.security.policy import policy_for
from gateway.security.tokens import unauthorized
from subgraphs.store.access import AccessPolicy
from subgraphs.store.errors import FhirError
from subgraphs.store.repository import ResourceRepository

K = TypeVar("K")
V = TypeVar("V")
BatchFn = Callable[[list[K]], Coroutine[Any, Any, list[V]]]
AUDITED_QUERY_CHARS = 4000
MAX_BATCH = 500  # keys per statement: bounds IN lists (PostgreSQL allows 32767 bound values)
log = logging.getLogger("unihealth.audit")


def _facility_or_none(value: str | None) -> str | None:
    try:
        return check_facility(value)
    except FhirError:
        return None


class SubgraphContext:
    def __init__(
        self,
        backends: Backends,
        *,
        authorization: str | None,
        facility: str | None,
        base: str = "",
        request_id: str = "",
        client: str | None = None,
    ) -> None:
        self.backends = backends
        self.authorization = authorization
        self.facility_header = facility
        self.base = base
        self.request_id = request_id
        self.client = client
        self.audit: AccessAudit | None = None
        self._request: RequestContext | None = None
        self._denied: FhirError | None = None
        self._repo: ResourceRepository | None = None
        self._stack: AsyncExitStack | None = None
        self._opening = asyncio.Lock()
        self._closed = False
        self._loaders: dict[Hashable, DataLoader[Any, Any]] = {}

    @classmethod
    def from_headers(
        cls, backends: Backends, headers: Mapping[str, str], *, base: str = "", client: str | None = None
    ) -> SubgraphContext:
        """The context of a request with these (case-insensitive) headers, from ``client``."""
        return cls(
            backends,
            authorization=headers.get("authorization"),
            facility=headers.get("x-facility-id"),
            base=base,
            request_id=headers.get("x-request-id", ""),
            client=client,
        )

    # ------------------------------------------------------------------ caller
    def request(self) -> RequestContext:
        """The verified caller and facility (401/400/403 as :class:`FhirError`, cached)."""
        if self._request is not None:
            return self._request
        if self._denied is not None:
            raise self._denied
        try:
            self._request = self._authenticate()
        except FhirError as exc:
            self._denied = exc
            raise
        return self._request

    def _authenticate(self) -> RequestContext:
        scheme, _, token = (self.authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("a Bearer token is required")
        principal = self.backends.verifier.verify(token.strip())
        if self.audit is not None:
            self.audit.principal = principal  # known from here on, even if refused below
        facility = check_facility(self.facility_header)
        if facility not in principal.facilities:
            raise FhirError(403, "forbidden", f"the token does not grant access to facility {facility}")
        return RequestContext(
            facility=facility,
            base=self.base,
            policy=policy_for(principal),
            principal=principal,
            request_id=self.request_id,
            audit=self.audit,
        )

    @property
    def facility(self) -> str:
        return self.request().facility

    @property
    def policy(self) -> AccessPolicy:
        return self.request().policy

    # ------------------------------------------------------------------ the transaction
    async def repository(self) -> ResourceRepository:
        """The request's repository (its one read transaction, opened on first use)."""
        if self._repo is not None:
            return self._repo
        request = self.request()
        async with self._opening:
            if self._repo is None:
                if self._closed:
                    raise RuntimeError("the request is over: its transaction is closed")
                stack = AsyncExitStack()
                self._repo = await stack.enter_async_context(self.backends.session(request, write=False))
                self._stack = stack
        return self._repo

    @property
    def opened(self) -> bool:
        return self._repo is not None

    async def close(self, error: BaseException | None = None) -> None:
        """End the transaction (commit, or rollback when ``error`` is given); idempotent."""
        self._closed = True
        stack, self._stack, self._repo = self._stack, None, None
        if stack is None:
            return
        if error is None:
            await stack.aclose()
        else:
            await stack.__aexit__(type(error), error, error.__traceback__)

    # ------------------------------------------------------------------ the access record
    def start_audit(self, operation: str) -> None:
        """Open the access record of this request (before anything is read); ``operation`` is the
        GraphQL document, kept as the record's query."""
        if self.audit is None and self._request is None:
            self.audit = AccessAudit(
                interaction="graphql",
                facility=_facility_or_none(self.facility_header),
                query=operation[:AUDITED_QUERY_CHARS],
                client=self.client,
                request_id=self.request_id,
            )

    async def record(self, status: int, detail: str = "") -> None:
        """Persist the access record with the request's outcome (once; after :meth:`close`, so it
        holds everything the transaction returned). Requests without a usable facility have no
        chain to go to and are only logged."""
        audit = self.audit
        if audit is None or audit.recorded:
            return
        audit.status, audit.detail = status, detail[:200]
        if audit.facility is None:
            log.warning("unaudited GraphQL request without a facility -> %s", status)
            return
        await self.backends.record_access(audit)

    # ------------------------------------------------------------------ loaders
    def loader(self, key: Hashable, batch: BatchFn[K, V]) -> DataLoader[K, V]:
        """This request's DataLoader for ``key`` (created with ``batch`` on first use)."""
        found = self._loaders.get(key)
        if found is None:
            found = DataLoader(batch_load_fn=batch, max_batch_size=MAX_BATCH)
            self._loaders[key] = found
        return cast("DataLoader[K, V]", found)
