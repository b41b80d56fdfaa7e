"""The gateway process's collector policy: what the service built is frozen once it is ready
and again once every column is online (or the start has taken too long), and garbage among
frozen objects is still collected on the periodic pass."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from gateway.collector import YOUNG_THRESHOLD, manage_collector


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture(autouse=True)
def _restore_collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def _watched(obj: object) -> bool:
    """In the collector's sight (not frozen)."""
    return any(o is obj for o in gc.get_objects())


def test_frozen_once_ready_and_again_once_every_column_is_online() -> None:
    async def run() -> None:
        ready, online = asyncio.Event(), [False]
        task = asyncio.create_task(manage_collector(ready, lambda: online[0], settle_max_s=60))
        await asyncio.sleep(0.05)
        assert gc.get_freeze_count() == 0          # nothing happens before the service is ready
        ready.set()
        await asyncio.sleep(0.05)
        assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
        frozen = gc.get_freeze_count()
        assert frozen > 0
        built = [_Node()]                           # built during the start (a column's connection)
        assert _watched(built)
        online[0] = True
        await asyncio.sleep(1.5)                    # the policy looks once a second
        assert not _watched(built)
        task.cancel()

    asyncio.run(run())


def test_frozen_again_after_the_longest_start_even_with_a_column_offline() -> None:
    async def run() -> None:
        ready = asyncio.Event()
        ready.set()
        task = asyncio.create_task(manage_collector(ready, lambda: False, settle_max_s=0.3))
        await asyncio.sleep(0.05)
        built = [_Node()]
        assert _watched(built)
        await asyncio.sleep(0.6)
        assert not _watched(built)
        task.cancel()

    asyncio.run(run())


def test_garbage_among_frozen_objects_is_collected_on_the_periodic_pass() -> None:
    async def run() -> None:
        a, b = _Node(), _Node()
        a.other, b.other = b, a                     # a cycle: reference counting never frees it
        gone = weakref.ref(a)
        ready = asyncio.Event()
        ready.set()
        task = asyncio.create_task(manage_collector(ready, lambda: True, refreeze_s=0.2))
        await asyncio.sleep(0.05)
        assert not _watched(a)                      # frozen with the rest
        del a, b                                    # the column went away: its cycle is garbage
        assert gone() is not None
        await asyncio.sleep(0.5)
        assert gone() is None
        task.cancel()

    asyncio.run(run())
