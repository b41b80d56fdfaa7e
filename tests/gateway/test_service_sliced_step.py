"""The control step of a large site runs in slices with the event loop free in between: the same
result as a step at once, a step begun in a gap (a DNO command's) ends it and is never
overwritten by it, and a column seeded in a gap keeps its memory."""

from __future__ import annotations

import asyncio
import random
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


def _offers(svc: GatewayService) -> dict[str, float]:
    assert svc.allocation is not None
    return {cid: a.offered_a for cid, a in svc.allocation.columns.items()}


def test_a_sliced_step_allocates_as_a_step_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_mod, "STEP_SLICE", 2)   # 3 columns: two slices at every stage
    asyncio.run(_same_result(tmp_path))


async def _same_result(tmp_path: Path) -> None:
    at_once, _ = _service(tmp_path / "a")
    sliced, writer = _service(tmp_path / "b")
    for svc in (at_once, sliced):
        for cid in COLUMNS:
            _charging(svc, cid, 10.0 + COLUMNS.index(cid))
        svc.book.add(Limit(SOURCE_DNO, 30.0, NOW + 60_000, id="l1"), NOW)
    at_once._safe_step()
    sliced.slice_min_columns = 0
    await sliced._safe_step_sliced()
    assert sliced.stats.step_errors == 0
    assert _offers(sliced) == _offers(at_once)
    assert sum(_offers(sliced).values()) <= 30.0
    assert sliced.alloc_state.columns == at_once.alloc_state.columns
    assert {c.column_id: c.limit_a for c in writer.pending.values()} == _offers(sliced)


@pytest.mark.parametrize("stage", ["_collect", "_finish_slice"])
def test_a_column_seeded_during_a_sliced_step_keeps_its_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    asyncio.run(_seeded_meanwhile(tmp_path, monkeypatch, stage))


async def _seeded_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    svc, _ = _service(tmp_path)
    _charging(svc, "c1")
    monkeypatch.setattr(service_mod, "STEP_SLICE", 1)
    loop = asyncio.get_running_loop()
    seeded: list[Any] = []
    real = getattr(GatewayService, stage)

    def watched(*args: Any, **kwargs: Any) -> Any:
        if not seeded:   # c2 comes online with a car already charging at 20 A, in the gap after
            def online() -> None:
                _charging(svc, "c2", 20.0)
                seeded.append(svc.alloc_state.columns["c2"])
            loop.call_soon(online)
        return real(*args, **kwargs)

    monkeypatch.setattr(GatewayService, stage, watched)
    await svc._safe_step_sliced()
    assert svc.stats.step_errors == 0
    assert svc.alloc_state.columns["c2"] is seeded[0]
    assert seeded[0].applied_da == to_da(20.0)
    assert "c1" in svc.alloc_state.columns   # the step's own result for the others is kept
    # The next step starts c2 from what it holds (no delay for a car already charging).
    svc._safe_step()
    assert _offers(svc)["c2"] == 20.0


@pytest.mark.parametrize("stage", ["_collect", "_finish_slice", "_send_limits"])
def test_a_step_begun_between_slices_ends_the_sliced_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         stage: str) -> None:
    """A large site's step reads the columns, finishes their offers and sends their limits a
    slice at a time, the loop free in between; a command's step taken in such a gap ends it
    (nothing more of it runs, and its stale offers never go out after the command's)."""
    asyncio.run(_between_slices(tmp_path, monkeypatch, stage))


async def _between_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    svc, writer = _service(tmp_path)
    for cid in COLUMNS:
        _charging(svc, cid)
    monkeypatch.setattr(service_mod, "STEP_SLICE", 1)
    loop = asyncio.get_running_loop()
    calls: list[str] = []
    real = getattr(GatewayService, stage)

    def command() -> None:
        svc.book.add(Limit(SOURCE_DNO, 12.0, NOW + 60_000, id="cut"), NOW)
        svc._safe_step()

    def watched(*args: Any, **kwargs: Any) -> Any:
        calls.append(stage)
        if len(calls) == 1:   # the first slice: a DNO command's step comes in the gap after it
            loop.call_soon(command)
        return real(*args, **kwargs)

    monkeypatch.setattr(GatewayService, stage, watched)
    steps = svc.stats.steps
    await svc._safe_step_sliced()
    assert svc.stats.step_errors == 0
    assert svc.stats.steps == steps + 2
    # One slice of the sliced step, then the command's step (one call at once, or none: a step
    # at once finishes its columns in allocate()); nothing more of the first.
    assert calls == [stage] + ([stage] if stage != "_finish_slice" else []), calls
    sent = {c.column_id: c.limit_a for c in writer.pending.values()}
    assert sum(sent.values()) <= 12.0, sent   # the command's limits are the last word for every column
    assert sum(_offers(svc).values()) <= 12.0


def test_a_large_sites_hand_over_log_names_the_first_columns_and_counts_the_rest() -> None:
    ids = ["c%04d" % i for i in range(7000)]
    line = service_mod._some(ids)
    assert line.startswith("['c0000', 'c0001', ") and line.endswith(", 'c0049', ...] and 6950 more")
    assert service_mod._some(ids[:3]) == "['c0000', 'c0001', 'c0002']" and service_mod._some([]) == "none"
