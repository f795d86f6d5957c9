"""The embedded profile's agents: the same handlers as the worker, on the in-process bus.

Contract: :func:`subscribe_embedded` subscribes, before the bus starts delivering, the audit sealer
to :data:`~streams.events.AUDIT_TOPIC` and — when a cache is given — the cache invalidator to every
change topic (:data:`~streams.events.TOPIC_PREFIX`). With the in-process bus and the inline relay,
a committed change has invalidated its cache entries and an access record is sealed before the
relay marks the outbox row published: the same effects as ``unihealth streams worker``, without
Kafka. (De-identification feeds an analyst *Kafka* topic and runs in the worker only.)

On the :class:`~streams.bus.InProcessBus` every access record comes from this store's own outbox,
written by the server's own audit code, so the sealer is ``trusted`` (it does not validate the
AuditEvents again, see :mod:`streams.sealer`); on any other bus it validates them.
"""

from __future__ import annotations

from dataclasses import dataclass

from subgraphs.store.database import Database

from .bus import Bus, InProcessBus
from .cache import Cache
from .events import AUDIT_TOPIC, TOPIC_PREFIX
from .invalidation import CacheInvalidator
from .sealer import AuditSealer


@dataclass(frozen=True, slots=True)
class EmbeddedAgents:
    sealer: AuditSealer
    invalidator: CacheInvalidator | None


def subscribe_embedded(bus: Bus, db: Database, *, cache: Cache | None = None) -> EmbeddedAgents:
    """Subscribe the sealer (and, with ``cache``, the invalidator) to ``bus``; returns them. The
    sealer trusts its records only on the in-process bus (see the module docstring)."""
    sealer = AuditSealer(db, trusted=isinstance(bus, InProcessBus))
    bus.subscribe(AUDIT_TOPIC, sealer)
    invalidator = None
    if cache is not None:
        invalidator = CacheInvalidator(cache)
        bus.subscribe(TOPIC_PREFIX, invalidator)
    return EmbeddedAgents(sealer, invalidator)
