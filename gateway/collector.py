"""The gateway process's policy for the cyclic garbage collector (a process setting: the
process's entry point runs it, not the service).

The steady state makes no cyclic garbage (readings, telemetry and steps are freed by reference
counting), so every collection is pure cost, and a collection walks every tracked object of its
generations with the event loop held: polls come late. What the service builds and keeps (the
site's views, channels, schedules, config; then each column's connection, built as it comes
online) is frozen out of the collector's sight: once the service is ready and again once the
start is over. Of what has been frozen, anything that has since become garbage is collected
every ``REFREEZE_S`` (one full collection, then frozen again), so a long run does not keep it.
The young generation is collected after ``YOUNG_THRESHOLD`` net allocations rather than 700:
the peaks of a large site's control step and telemetry round hold tens of thousands of new
objects at once, all freed by reference counting. At 700 the young generation was collected ten
times a second at 1,000 columns (5 % of the CPU); at 10,000, one or two times a second at 5,000
columns (~20 ms each, 3 % of the CPU); at 50,000, not once in the steady state.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

YOUNG_THRESHOLD = 50_000
START_SETTLE_MAX_S = 120.0   # the start is over once every column is online, or after this
REFREEZE_S = 3600.0          # what was frozen and became garbage is collected this often
_POLL_S = 1.0


def settle_process() -> None:
    """Freeze what exists now and set the young generation's threshold."""
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 10, 10)


def refreeze() -> int:
    """Collect everything, frozen objects included, then freeze what is left; the number of
    objects collected."""
    started = time.perf_counter()
    gc.unfreeze()
    collected = gc.collect()
    gc.freeze()
    log.info("collector: full pass: %d objects collected, %d frozen, in %.0f ms",
             collected, gc.get_freeze_count(), 1000 * (time.perf_counter() - started))
    return collected


async def manage_collector(ready: asyncio.Event, started: Callable[[], bool], *,
                           settle_max_s: float = START_SETTLE_MAX_S, refreeze_s: float = REFREEZE_S) -> None:
    """Run for the service's lifetime: settle once ``ready`` is set, freeze again once
    ``started()`` (every column online) or after ``settle_max_s``, then every ``refreeze_s``."""
    await ready.wait()
    settle_process()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle_max_s
    while not started() and loop.time() < deadline:
        await asyncio.sleep(min(_POLL_S, max(0.0, deadline - loop.time())))
    refreeze()
    while True:
        await asyncio.sleep(refreeze_s)
        refreeze()
