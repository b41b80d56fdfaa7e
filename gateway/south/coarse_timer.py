"""Deadlines on a coarse grid: one event-loop timer per grid slot, not one per deadline.

Why: every poll of every Modbus TCP column arms a reply timeout and then a nap until its next
slot. With thousands of columns that is thousands of loop timers a second, nearly all of them
cancelled, and the loop's timer heap (a handle each, compared on every push and pop) cost more
than the polls themselves (bench/columns_per_core.py profiles it). Here the deadlines falling
in the same slot share one loop timer. A callback runs at most `resolution_s` late and never
early; there is no cancel: each callback must do nothing when its work is already done (the
ones used here settle a future only if it is still pending).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class CoarseTimer:
    """`timer.call_at(loop, when, callback, arg)`: `callback(arg)` at the first grid slot at or
    after `when` (the loop's clock)."""

    def __init__(self, resolution_s: float = 0.01) -> None:
        if not resolution_s > 0:
            raise ValueError("resolution_s must be > 0")
        self.resolution_s = resolution_s
        self._slots: dict[int, list[tuple[Callable[[Any], None], Any]]] = {}

    def call_at(self, loop: asyncio.AbstractEventLoop, when: float, callback: Callable[[Any], None],
                arg: Any) -> None:
        slot = math.ceil(when / self.resolution_s)
        entries = self._slots.get(slot)
        if entries is None:
            entries = self._slots[slot] = []
            loop.call_at(slot * self.resolution_s, self._fire, slot)
        entries.append((callback, arg))

    def call_later(self, loop: asyncio.AbstractEventLoop, delay_s: float, callback: Callable[[Any], None],
                   arg: Any) -> None:
        self.call_at(loop, loop.time() + delay_s, callback, arg)

    @property
    def pending(self) -> int:
        """Callbacks not yet run (done or not)."""
        return sum(len(entries) for entries in self._slots.values())

    def _fire(self, slot: int) -> None:
        for callback, arg in self._slots.pop(slot, ()):
            try:
                callback(arg)
            except Exception:   # one broken callback must not leave the others' futures hanging
                log.exception("coarse timer callback failed")
