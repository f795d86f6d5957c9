"""A function memoized by the identity of its argument, bounded.

Contract: ``IdentityMemo(f, size)(obj)`` is ``f(obj)``, computed once per object while it is
among the ``size`` most recently *added* (oldest out first). Keys are ``id(obj)``, checked with
``is``: each entry holds its object, so an id is never reused while it is remembered. For values
that are immutable and hashed poorly or not at all (plans, fetches, access policies); ``f`` must
be pure.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class IdentityMemo(Generic[K, V]):
    def __init__(self, compute: Callable[[K], V], size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self._compute = compute
        self._size = size
        self._items: OrderedDict[int, tuple[K, V]] = OrderedDict()

    def __call__(self, obj: K) -> V:
        found = self._items.get(id(obj))
        if found is not None and found[0] is obj:
            return found[1]
        value = self._compute(obj)
        self._items[id(obj)] = (obj, value)
        while len(self._items) > self._size:
            self._items.popitem(last=False)
        return value
