"""The cache contract, an in-process LRU+TTL cache and a Redis cache.

Keys (:func:`check_key`): ``<facility>|<segment>|<segment>...`` — the facility always comes first,
so no entry can be shared by two facilities and invalidation can never reach across them. Segments
are separated by ``|`` and may not contain it; the facility may not contain ``{`` or ``}`` (it is
the Redis hash tag). The key builders the invalidation agent relies on are in
:mod:`streams.invalidation`: ``f|Type|id``, ``f|summary|patient``, ``f|graphql|patient|...``,
``f|search|Type|...``.

Contract (:class:`Cache`):

* ``get(key)`` → the bytes stored by the last ``set`` of ``key`` that has not expired or been
  deleted, else None. ``set(key, value, ttl)`` stores ``value`` for ``ttl`` seconds (> 0).
* ``delete(*keys)`` removes those entries; ``delete_prefix(prefix)`` removes every entry whose key
  starts with ``prefix``, where ``prefix`` is ``<facility>|`` followed by zero or more *whole*
  segments, each ending in ``|`` (``f|search|Observation|``). Both return how many live entries
  they removed (Redis: how many keys existed); ``delete_prefix`` also ends that prefix's generation.
* ``generation(prefix)`` → the prefix's current generation token (created if it has none);
  ``set_if_current(key, value, ttl, prefix, token)`` stores like ``set`` and returns True only if
  ``prefix`` (an ancestor of ``key``, else ValueError) still has generation ``token``; otherwise
  it stores nothing and returns False (see Races below).
* Every call is bounded (Redis: the client's socket timeouts); errors propagate to the caller
  (the invalidation agent retries, then dead-letters).

How ``delete_prefix`` stays cheap (both implementations): every ``set`` also records the key in
one *tag set* per ancestor prefix of the key (``f|``, ``f|graphql|``, ``f|graphql|p1|`` for
``f|graphql|p1|q``; keys are a few segments deep). ``delete_prefix`` then deletes exactly the
members of one tag set: one round trip and O(entries removed), never a SCAN of the key space. In
Redis the value, its tag-set entries and their expiry are written by one Lua script, and the
deletion of a tag set with its members by another, so each is atomic. A tag set may keep names of
entries that already expired or were deleted through another tag; deleting a missing key is a
no-op, and each tag set expires with the longest-lived entry added to it, so they stay bounded by
what was cached within one TTL. (The alternative, a version counter per prefix, makes invalidation
a single ``INCR`` but costs every ``get`` a second lookup and leaves dead entries in memory until
their TTL; deleting is cheap enough here because one change touches a handful of tags.)

Races (:meth:`Cache.generation`, :meth:`Cache.set_if_current`): a reader that computed a value
*before* a change and stored it *after* the change's invalidation would leave a stale entry until
its TTL. Readers that cache derived views close that window with the *generation* of the prefix
the invalidation deletes: ``token = generation(prefix)`` BEFORE computing (before the transaction
or subgraph request that reads the data), then ``set_if_current(key, value, ttl, prefix, token)``,
which stores only if ``prefix`` is an ancestor of ``key`` and its generation is still ``token``.
``delete_prefix(prefix)`` ends the prefix's generation in the same atomic step that deletes its
entries (Redis: the same Lua script; the check-and-store is one script too), so: the change commits,
then its event is invalidated (the generation ends), so any reader whose token predates the
invalidation is refused, and any reader whose token follows it started reading after the commit
and computed the new data. A generation is a random 128-bit token created on first read, kept
:data:`GENERATION_TTL` seconds after its last read (or, in memory, while among the
``max_entries`` most recent); one that expired or was evicted is simply absent, which refuses the
store too (a lost store, never a stale one). Only ``delete_prefix`` of that exact prefix ends it:
a store conditioned on ``f|graphql|p|`` is not protected against ``delete_prefix("f|")`` — the
invalidation agent never deletes broader prefixes. Plain ``set`` keeps the old behaviour.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

SEP = "|"
Conditional = tuple[str, bytes, str, str]
"""(key, value, prefix, generation) for :meth:`Cache.set_many_if_current`."""
GENERATION_TTL = 3600.0  # seconds a generation outlives its last read (far longer than any computation)


class Cache(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """``get`` of each key, in order; the keys are of ONE facility (Redis: one round trip)."""
        ...

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def generation(self, prefix: str) -> str: ...

    async def set_if_current(self, key: str, value: bytes, ttl: float, prefix: str, generation: str) -> bool: ...

    async def generations(self, prefixes: Sequence[str]) -> list[str]:
        """``generation`` of each prefix, in order; prefixes of ONE facility (Redis: one round trip)."""
        ...

    async def set_many_if_current(self, items: Sequence[Conditional], ttl: float) -> int:
        """``set_if_current`` of each (key, value, prefix, generation), keys of ONE facility; returns
        how many were stored (Redis: one round trip, each item atomic on its own)."""
        ...

    async def delete(self, *keys: str) -> int: ...

    async def delete_prefix(self, prefix: str) -> int: ...

    async def close(self) -> None: ...


def check_key(key: str) -> str:
    """``key`` if it is ``facility|segment...`` with a non-empty facility; else ValueError."""
    facility, sep, rest = key.partition(SEP)
    if not facility or not sep or not rest or "{" in facility or "}" in facility:
        raise ValueError(f"a cache key is 'facility|...' with a facility first: {key[:120]!r}")
    return key


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is ``facility|`` plus whole segments, each ending in ``|``; else ValueError."""
    facility = prefix.partition(SEP)[0]
    if not prefix.endswith(SEP) or not facility or "{" in facility or "}" in facility or SEP + SEP in prefix:
        raise ValueError(f"a cache prefix is 'facility|' plus whole segments ending in '|': {prefix[:120]!r}")
    return prefix


def ancestors(key: str) -> list[str]:
    """The prefixes ``delete_prefix`` may name that cover ``key``: ``f|``, ``f|a|``, ``f|a|b|``..."""
    parts = key.split(SEP)
    return [SEP.join(parts[: i + 1]) + SEP for i in range(len(parts) - 1)]


def _check_scope(key: str, prefix: str) -> None:
    if check_prefix(prefix) not in ancestors(check_key(key)):
        raise ValueError(f"{prefix[:120]!r} is not a prefix of the key {key[:120]!r}")


def new_generation() -> str:
    return secrets.token_hex(16)


def _check_ttl(ttl: float) -> float:
    if not ttl > 0:
        raise ValueError("ttl must be a positive number of seconds")
    return ttl


class MemoryCache:
    """An in-process cache: LRU beyond ``max_entries``, per-entry TTL, tag sets for prefixes.

    Not shared between processes: the embedded profile's edge and its in-process bus use one.
    """

    def __init__(self, max_entries: int = 10_000, *, clock: Any = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._tags: dict[str, set[str]] = {}
        self._generations: OrderedDict[str, tuple[float, str]] = OrderedDict()  # prefix -> (expires, token)

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(check_key(key))
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._forget(key)
            return None
        self._entries.move_to_end(key)
        return entry[1]

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [await self.get(k) for k in keys]

    async def generations(self, prefixes: Sequence[str]) -> list[str]:
        return [await self.generation(p) for p in prefixes]

    async def set_many_if_current(self, items: Sequence[Conditional], ttl: float) -> int:
        return sum([await self.set_if_current(k, v, ttl, p, g) for k, v, p, g in items])

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        check_key(key)
        expires = self._clock() + _check_ttl(ttl)
        if key in self._entries:
            self._entries.move_to_end(key)
        self._entries[key] = (expires, bytes(value))
        for tag in ancestors(key):
            self._tags.setdefault(tag, set()).add(key)
        while len(self._entries) > self.max_entries:
            self._forget(next(iter(self._entries)))

    async def generation(self, prefix: str) -> str:
        """The current generation token of ``prefix`` (a new one if it has none)."""
        now = self._clock()
        found = self._generations.get(check_prefix(prefix))
        token = found[1] if found is not None and found[0] > now else new_generation()
        self._generations[prefix] = (now + GENERATION_TTL, token)
        self._generations.move_to_end(prefix)
        while len(self._generations) > self.max_entries:
            self._generations.popitem(last=False)  # evicted: its readers' stores are refused
        return token

    async def set_if_current(self, key: str, value: bytes, ttl: float, prefix: str, generation: str) -> bool:
        """Store like :meth:`set` only if ``prefix``'s generation is still ``generation``."""
        _check_scope(key, prefix)
        _check_ttl(ttl)
        found = self._generations.get(prefix)
        if found is None or found[0] <= self._clock() or found[1] != generation:
            return False
        await self.set(key, value, ttl)
        return True

    async def delete(self, *keys: str) -> int:
        now = self._clock()
        removed = 0
        for key in keys:
            entry = self._entries.get(check_key(key))
            if entry is not None:
                removed += entry[0] > now
                self._forget(key)
        return removed

    async def delete_prefix(self, prefix: str) -> int:
        members = self._tags.pop(check_prefix(prefix), set())
        self._generations.pop(prefix, None)  # the generation ends with its entries
        return await self.delete(*members)

    async def close(self) -> None:
        self._entries.clear()
        self._tags.clear()
        self._generations.clear()

    def _forget(self, key: str) -> None:
        self._entries.pop(key, None)
        for tag in ancestors(key):
            members = self._tags.get(tag)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._tags[tag]


def _store_script(first_tag: int) -> str:
    """Lua: SET ``KEYS[1]`` with a TTL of ``ARGV[2]`` ms and add it to the tag sets ``KEYS[first_tag..]``,
    each living at least as long as the entry."""
    return f"""
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local ttl = tonumber(ARGV[2])
for i = {first_tag}, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  if redis.call('PTTL', KEYS[i]) < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return 1
"""


_SET = _store_script(2)
# the same store, only while the generation key KEYS[2] still holds the token ARGV[3]
_SET_IF_CURRENT = "\nif redis.call('GET', KEYS[2]) ~= ARGV[3] then\n  return 0\nend" + _store_script(3)

_GENERATIONS = """
local out = {}
local millis = ARGV[#KEYS + 1]
for i = 1, #KEYS do
  local token = redis.call('GET', KEYS[i])
  if not token then
    token = ARGV[i]
    redis.call('SET', KEYS[i], token, 'PX', millis)
  else
    redis.call('PEXPIRE', KEYS[i], millis)
  end
  out[i] = token
end
return out
"""

_DELETE_TAG = """
redis.call('UNLINK', KEYS[2])
local members = redis.call('SMEMBERS', KEYS[1])
local removed = 0
for i = 1, #members, 500 do
  removed = removed + redis.call('UNLINK', unpack(members, i, math.min(i + 499, #members)))
end
redis.call('UNLINK', KEYS[1])
return removed
"""


class RedisCache:
    """The shared cache on Redis (redis-py asyncio), for every edge and worker process.

    Layout: entry ``<ns>{<facility>}:c:<rest of key>``, tag set ``<ns>{<facility>}:t:<prefix>``,
    generation ``<ns>{<facility>}:g:<prefix>``.
    The facility is the hash tag, so one facility's entries and tags share a Redis Cluster slot
    and the Lua scripts stay single-slot. Values are stored as given (bytes).
    """

    def __init__(self, client: Any, *, namespace: str = "uh:") -> None:
        self.client = client
        self.namespace = namespace
        self._set = client.register_script(_SET)
        self._delete_tag = client.register_script(_DELETE_TAG)
        self._set_if_current = client.register_script(_SET_IF_CURRENT)
        self._generations = client.register_script(_GENERATIONS)

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 5.0, namespace: str = "uh:") -> RedisCache:
        """A cache on the Redis at ``url``; connects lazily, every call bounded by ``timeout``."""
        import redis.asyncio as aioredis

        client = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        return cls(client, namespace=namespace)

    def _entry(self, key: str) -> str:
        facility, _, rest = check_key(key).partition(SEP)
        return f"{self.namespace}{{{facility}}}:c:{rest}"

    def _tag(self, prefix: str) -> str:
        facility, _, rest = prefix.partition(SEP)
        return f"{self.namespace}{{{facility}}}:t:{rest}"

    def _generation_key(self, prefix: str) -> str:
        facility, _, rest = prefix.partition(SEP)
        return f"{self.namespace}{{{facility}}}:g:{rest}"

    async def get(self, key: str) -> bytes | None:
        value = await self.client.get(self._entry(key))
        return None if value is None else bytes(value)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        millis = max(1, int(_check_ttl(ttl) * 1000))
        keys = [self._entry(key), *(self._tag(p) for p in ancestors(key))]
        await self._set(keys=keys, args=[bytes(value), millis])

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One ``MGET`` (one facility: one hash tag, one Redis Cluster slot)."""
        if not keys:
            return []
        values = await self.client.mget([self._entry(k) for k in keys])
        return [None if v is None else bytes(v) for v in values]

    async def generations(self, prefixes: Sequence[str]) -> list[str]:
        """Like :meth:`generation` for each prefix, in one script (one facility: one slot)."""
        if not prefixes:
            return []
        keys = [self._generation_key(check_prefix(p)) for p in prefixes]
        tokens = await self._generations(
            keys=keys, args=[*(new_generation() for _ in keys), int(GENERATION_TTL * 1000)]
        )
        return [t.decode() if isinstance(t, bytes) else str(t) for t in tokens]

    async def set_many_if_current(self, items: Sequence[Conditional], ttl: float) -> int:
        """Each item as :meth:`set_if_current` does it, pipelined: one round trip."""
        if not items:
            return 0
        millis = max(1, int(_check_ttl(ttl) * 1000))
        async with self.client.pipeline(transaction=False) as pipe:
            for key, value, prefix, generation in items:
                keys = self._conditional_keys(key, prefix)
                await self._set_if_current(keys=keys, args=[bytes(value), millis, generation], client=pipe)
            results = await pipe.execute()
        return sum(1 for r in results if r)

    async def generation(self, prefix: str) -> str:
        """The current generation token of ``prefix`` (a new one if it has none); one round trip."""
        return (await self.generations([prefix]))[0]

    async def set_if_current(self, key: str, value: bytes, ttl: float, prefix: str, generation: str) -> bool:
        """Store like :meth:`set` only if ``prefix``'s generation is still ``generation`` (one script)."""
        keys = self._conditional_keys(key, prefix)
        millis = max(1, int(_check_ttl(ttl) * 1000))
        return bool(await self._set_if_current(keys=keys, args=[bytes(value), millis, generation]))

    def _conditional_keys(self, key: str, prefix: str) -> list[str]:
        """The KEYS of ``_SET_IF_CURRENT``: entry, the prefix's generation, tag sets (scope checked)."""
        _check_scope(key, prefix)
        return [self._entry(key), self._generation_key(prefix), *(self._tag(p) for p in ancestors(key))]

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        return int(await self.client.unlink(*(self._entry(k) for k in keys)))

    async def delete_prefix(self, prefix: str) -> int:
        check_prefix(prefix)
        return int(await self._delete_tag(keys=[self._tag(prefix), self._generation_key(prefix)]))

    async def close(self) -> None:
        await self.client.aclose()
