"""Hit/miss counting around any :class:`~streams.cache.Cache`.

Contract: :class:`CountingCache` behaves exactly as the cache it wraps (same values, same errors)
and counts every ``get`` (and every key of a ``get_many``) in ``unihealth_cache_requests_total``
as a hit (bytes came back) or a miss (None), under the cache *kind* named by the key's second
segment (``f|summary|...`` → ``summary``, ``f|graphql|...`` → ``graphql``, ``f|search|...`` →
``search``, ``f|Type|id`` → ``resource``): a fixed set, never a key, facility or id. A failed
``get`` is not counted. Any other attribute (e.g. methods a newer cache contract adds) is the
inner cache's, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from streams.cache import SEP, Cache, Conditional

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

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        values = await self.inner.get_many(keys)
        for key, value in zip(keys, values, strict=True):
            record_cache(cache_kind(key), value is not None)
        return values

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self.inner.set(key, value, ttl)

    async def generation(self, prefix: str) -> str:
        return await self.inner.generation(prefix)

    async def generations(self, prefixes: Sequence[str]) -> list[str]:
        return await self.inner.generations(prefixes)

    async def set_if_current(self, key: str, value: bytes, ttl: float, prefix: str, generation: str) -> bool:
        return await self.inner.set_if_current(key, value, ttl, prefix, generation)

    async def set_many_if_current(self, items: Sequence[Conditional], ttl: float) -> int:
        return await self.inner.set_many_if_current(items, ttl)

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
