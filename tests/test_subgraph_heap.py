"""The subgraphs' heap settling (subgraphs/graphql/app.py:settle_heap): once per process, what is
alive is frozen out of the cyclic GC's reach, and calling it again changes nothing."""

from __future__ import annotations

import gc

from subgraphs.graphql import app


def test_settle_heap_freezes_what_is_alive_once_per_process() -> None:
    app.settle_heap()
    frozen = gc.get_freeze_count()
    assert frozen > 0
    keep = [[] for _ in range(1000)]  # new long-lived objects: not frozen by a second call
    app.settle_heap()
    assert gc.get_freeze_count() == frozen
    assert keep
