"""The control step of a large site allocates in a worker thread: same result as on the loop, a
step begun later (a DNO command's) is never overwritten by it, and a column seeded meanwhile
keeps its memory."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path
from typing import Any

import pytest

import gateway.service as service_mod
from gateway.config import load_config
from gateway.core.allocation import AllocatorState
from gateway.core.limits import SOURCE_DNO, Limit
from gateway.core.site import to_da
from gateway.service import GatewayService, LimitWriter, South
from gateway.south.types import ColumnLink, ColumnReading
from hil.rig.site_files import new_key, toml_text, write_secrets

NOW = 1_800_000_000_000
COLUMNS = ("c1", "c2", "c3")


def _service(tmp_path: Path) -> tuple[GatewayService, LimitWriter]:
    write_secrets(tmp_path, new_key())
    doc = {
        "site": {"id": "s-off", "capacity_a": 100},
        "columns": [{"id": cid, "hardware_a": 32, "link": "modbus-tcp", "host": "127.0.0.1", "port": 1502 + i}
                    for i, cid in enumerate(COLUMNS)],
        "mqtt": {"host": "127.0.0.1", "port": 1, "outbox": {"path": str(tmp_path / "outbox.sqlite3")}},
        "dno": {"keys_file": "secrets/dno-keys", "audit_path": str(tmp_path / "audit.jsonl")},
    }
    (tmp_path / "site.toml").write_text(toml_text(doc))
    south = South({}, dict.fromkeys(COLUMNS, "w"), {"w": "none"}, {})
    svc = GatewayService(load_config(tmp_path / "site.toml"), now_ms=lambda: NOW, south=south)
    svc.alloc_state = AllocatorState(rng=random.Random(7))
    writer = LimitWriter("w", None, lambda *_: None)  # type: ignore[arg-type]  # submissions only
    svc._writers["w"] = writer
    return svc, writer


def _charging(svc: GatewayService, cid: str, offered_a: float = 16.0) -> None:
    """The column comes online with a car charging at `offered_a`."""
    svc._on_link(ColumnLink(cid, True, "ok", 0, NOW, NOW))
    svc._on_reading(ColumnReading(cid, NOW, "Charging", "NoError", "C", offered_a, (offered_a,) * 3,
                                  (230.0,) * 3, 11000, 1000, 100, 1, "gateway", (), 6.0, phases=3,
                                  hardware_a=32.0))


class _HeldAllocate:
    """allocate() that waits in its thread until released: a step caught mid-allocation."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.real = service_mod.allocate

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            self.entered.set()
            assert self.release.wait(10)
        return self.real(*args, **kwargs)


def _offers(svc: GatewayService) -> dict[str, float]:
    assert svc.allocation is not None
    return {cid: a.offered_a for cid, a in svc.allocation.columns.items()}


def test_offloaded_step_allocates_as_the_loop_does(tmp_path: Path) -> None:
    asyncio.run(_same_result(tmp_path))


async def _same_result(tmp_path: Path) -> None:
    on_loop, _ = _service(tmp_path / "a")
    offloaded, writer = _service(tmp_path / "b")
    for svc in (on_loop, offloaded):
        for cid in COLUMNS:
            _charging(svc, cid, 10.0 + COLUMNS.index(cid))
    on_loop.book.add(Limit(SOURCE_DNO, 30.0, NOW + 60_000, id="l1"), NOW)
    offloaded.book.add(Limit(SOURCE_DNO, 30.0, NOW + 60_000, id="l1"), NOW)
    on_loop._safe_step()
    offloaded.offload_min_columns = 0
    await offloaded._safe_step_offloaded()
    assert offloaded.stats.step_errors == 0
    assert _offers(offloaded) == _offers(on_loop)
    assert sum(_offers(offloaded).values()) <= 30.0
    assert offloaded.alloc_state.columns == on_loop.alloc_state.columns
    assert {c.column_id: c.limit_a for c in writer.pending.values()} == _offers(offloaded)


def test_a_command_step_is_not_overwritten_by_an_offloaded_step_that_began_earlier(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_superseded(tmp_path, monkeypatch))


async def _superseded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc, writer = _service(tmp_path)
    for cid in COLUMNS:
        _charging(svc, cid)
    held = _HeldAllocate()
    monkeypatch.setattr(service_mod, "allocate", held)
    stale = asyncio.create_task(svc._safe_step_offloaded())
    assert await asyncio.to_thread(held.entered.wait, 10)
    # Meanwhile a DNO limit arrives; its step runs at once, on the loop.
    svc.book.add(Limit(SOURCE_DNO, 12.0, NOW + 60_000, id="cut"), NOW)
    svc._safe_step()
    fresh = svc.allocation
    held.release.set()
    await stale
    assert svc.allocation is fresh
    assert sum(_offers(svc).values()) <= 12.0
    sent = {c.column_id: c.limit_a for c in writer.pending.values()}
    assert sum(sent.values()) <= 12.0, sent   # the stale 3 x 16 A never went out after it


def test_a_column_seeded_during_an_offloaded_step_keeps_its_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_seeded_meanwhile(tmp_path, monkeypatch))


async def _seeded_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc, _ = _service(tmp_path)
    _charging(svc, "c1")
    held = _HeldAllocate()
    monkeypatch.setattr(service_mod, "allocate", held)
    step = asyncio.create_task(svc._safe_step_offloaded())
    assert await asyncio.to_thread(held.entered.wait, 10)
    _charging(svc, "c2", 20.0)   # c2 comes online with a car already charging at 20 A
    seeded = svc.alloc_state.columns["c2"]
    held.release.set()
    await step
    assert svc.stats.step_errors == 0
    assert svc.alloc_state.columns["c2"] is seeded
    assert seeded.applied_da == to_da(20.0)
    assert "c1" in svc.alloc_state.columns   # the step's own result for the others is kept
    # The next step starts c2 from what it holds (no delay for a car already charging).
    monkeypatch.setattr(service_mod, "allocate", held.real)
    svc._safe_step()
    assert _offers(svc)["c2"] == 20.0


def test_a_step_begun_between_slices_ends_the_sliced_one(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A large site's step reads the columns and sends their limits a slice at a time, the loop
    free in between; a command's step taken in such a gap ends it (nothing more of it runs)."""
    asyncio.run(_between_slices(tmp_path, monkeypatch, "_collect"))
    asyncio.run(_between_slices(tmp_path / "send", monkeypatch, "_send_limits"))


async def _between_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: str) -> None:
    svc, writer = _service(tmp_path)
    for cid in COLUMNS:
        _charging(svc, cid)
    monkeypatch.setattr(service_mod, "STEP_SLICE", 1)
    loop = asyncio.get_running_loop()
    calls: list[tuple[str, int]] = []   # (phase, columns in the call)
    real = getattr(GatewayService, phase)

    def watched(self: GatewayService, views: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((phase, len(views)))
        if len(calls) == 1:   # the first slice: a DNO command's step comes in the gap after it
            def command() -> None:
                svc.book.add(Limit(SOURCE_DNO, 12.0, NOW + 60_000, id="cut"), NOW)
                svc._safe_step()
            loop.call_soon(command)
        return real(self, views, *args, **kwargs)

    monkeypatch.setattr(GatewayService, phase, watched)
    threaded = []
    real_allocate = service_mod.allocate

    def counted(*args: Any, **kwargs: Any) -> Any:
        threaded.append(threading.current_thread() is not threading.main_thread())
        return real_allocate(*args, **kwargs)

    monkeypatch.setattr(service_mod, "allocate", counted)
    await svc._safe_step_offloaded()
    assert svc.stats.step_errors == 0
    # One slice of the sliced step, then the command's whole step; nothing more of the first.
    assert calls == [(phase, 1), (phase, len(COLUMNS))], calls
    assert threaded == ([False] if phase == "_collect" else [True, False])
    sent = {c.column_id: c.limit_a for c in writer.pending.values()}
    assert sum(sent.values()) <= 12.0, sent   # the command's limits are the last word for every column
    assert sum(_offers(svc).values()) <= 12.0
