"""Hit/miss counting around any :class:`~streams.cache.Cache`.

Contract: :class:`CountingCache` behaves exactly as the cache it wraps (same values, same errors)
and counts every ``get`` in ``unihealth_cache_requests_total`` as a hit (bytes came back) or a miss
(None), under the cache *kind* named by the key's second segment (``f|summary|...`` → ``summary``,
``f|graphql|...`` → ``graphql``, ``f|search|...`` → ``search``, ``f|Type|id`` → ``resource``): a
fixed set, never a key, facility or id. A failed ``get`` is not counted. Any other attribute
(e.g. methods a newer cache contract adds) is the inner cache's, unchanged.
"""

from __future__ import annotations

from typing import Any

from streams.cache import SEP, Cache

from .instruments import record_cache

_KINDS = frozenset({"summary", "graphql", "search"})


def cache_kind(key: str) -> str:
    """The kind of cache entry ``key`` names (see the module contract)."""
    parts = key.split(SEP, 2)
    return parts[1] if len(parts) > 1 and parts[1] in _KINDS else "resource"


class CountingCache:
    """``inner`` with its lookups counted (see the module contract)."""

    def __init__(self, inner: Cache) -> None:
        self.inner = inner

    async def get(self, key: str) -> bytes | None:
        value = await self.inner.get(key)
        record_cache(cache_kind(key), value is not None)
        return value

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self.inner.set(key, value, ttl)

    async def delete(self, *keys: str) -> int:
        return await self.inner.delete(*keys)

    async def delete_prefix(self, prefix: str) -> int:
        return await self.inner.delete_prefix(prefix)

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def counted(cache: Cache) -> Cache:
    """``cache`` wrapped in a :class:`CountingCache` (once: an already counted cache is returned)."""
    return cache if isinstance(cache, CountingCache) else CountingCache(cache)
