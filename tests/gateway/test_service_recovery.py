"""The gateway after a crash, and after a limit write that never arrived (found by the fault soak).

- A gateway restarted after a SIGKILL or a power cut restores, from its audit log, the DNO
  commands it accepted that are still valid, so the site keeps obeying a curtailment the
  DNO was told was applied (it used to start at the connection capacity again).
- Limit writes to an RS-485 bus may go as one broadcast frame, which nobody confirms, and
  noise can eat it: a decrease sent that way is confirmed by the column's next poll (its
  offer within the limit, its validity restarted) or written again, answered, as a unicast
  with the failsafe; a column that offers more than the limit the gateway recorded
  for it, while that limit binds it, or holds less validity than the last write left it
  (a lost refresh), gets its limit again at once instead of at the next refresh.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.config import load_config
from gateway.core.limits import SOURCE_DNO
from gateway.north import payloads, topics
from gateway.north.audit import read_decisions
from gateway.service import GatewayService, South
from gateway.south.types import ColumnReading, LimitCommand, LimitResult
from hil.rig.site_files import new_key, toml_text, write_secrets

SITE = "s-rec"
_IDS = itertools.count(1)


def _service(tmp_path: Path) -> GatewayService:
    write_secrets(tmp_path, new_key())
    doc = {
        "site": {"id": SITE, "capacity_a": 100, "dno_failsafe_a": 40},
        "columns": [{"id": "c1", "hardware_a": 32, "link": "modbus-tcp", "host": "127.0.0.1", "port": 1502},
                    {"id": "c2", "hardware_a": 32, "link": "modbus-tcp", "host": "127.0.0.1", "port": 1503}],
        "mqtt": {"host": "127.0.0.1", "port": 1, "outbox": {"path": str(tmp_path / "outbox.sqlite3")}},
        "dno": {"keys_file": "secrets/dno-keys", "audit_path": str(tmp_path / "audit.jsonl")},
    }
    (tmp_path / "site.toml").write_text(toml_text(doc))
    return GatewayService(load_config(tmp_path / "site.toml"), south=South({}, {}, {}, {}))


def _decision(kind: str, topic: str, *, until_s: float, decision: str = "accepted", **fields: Any) -> str:
    now = payloads.utc_ms()
    entry = {"ts_ms": now - 1000, "decision": decision, "reason": "ok" if decision == "accepted" else "stale",
             "id": "cmd-%d" % next(_IDS), "topic": topic, "key_id": "dno-1", "kind": kind,
             "issued_ms": now - 1000, "valid_until_ms": int(now + until_s * 1000), **fields}
    return json.dumps(entry) + "\n"


def _open(service: GatewayService) -> None:
    service._open_north()


def _close(service: GatewayService) -> None:
    assert service.outbox is not None and service.audit is not None
    service.outbox.close()
    service.audit.close()


def test_a_restarted_gateway_goes_on_obeying_the_dno_limits_it_accepted(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    # Older decisions in a rotated file, then the live one: read oldest first.
    (tmp_path / "audit.jsonl.1").write_text(_decision("site_limit", topics.cmd_site_limit(SITE), until_s=600,
                                                      limit_a=50.0))
    audit.write_text(
        _decision("site_limit", topics.cmd_site_limit(SITE), until_s=600, limit_a=30.0)      # replaces 50
        + _decision("site_limit", topics.cmd_site_limit(SITE), until_s=-5, limit_a=10.0)     # expired
        + _decision("site_limit", topics.cmd_site_limit(SITE), until_s=600, limit_a=5.0, decision="rejected")
        + _decision("column_limit", topics.cmd_column_limit(SITE, "c2"), until_s=600, limit_a=8.0)
        + _decision("site_failsafe", topics.cmd_site_failsafe(SITE), until_s=600, limit_a=20.0,
                    duration_s=3600)
        + _decision("config", topics.cmd_config(SITE), until_s=600, config={"telemetry_interval_s": 5})
        + '{"ts_ms": 1, "decision": "acc')                                  # torn by a power cut
    assert [d.get("limit_a") for d in read_decisions(audit)][:2] == [50.0, 30.0]
    service = _service(tmp_path)
    before = service.book.effective(payloads.utc_ms())
    assert before.source != SOURCE_DNO and max(before.site_a) == 100
    _open(service)
    try:
        now = payloads.utc_ms()
        eff = service.book.effective(now)
        assert eff.source == SOURCE_DNO and eff.site_a == (30.0, 30.0, 30.0)
        assert eff.columns["c2"].value_a == 8.0 and "c1" not in eff.columns
        assert (service.site.dno_failsafe_a, service.site.dno_failsafe_duration_s) == (20.0, 3600)
        assert service.telemetry_interval_s == 5
        assert sum(service.plan.limits_a.values()) <= 20.0 * 3
    finally:
        _close(service)


def test_a_first_start_without_an_audit_log_restores_nothing(tmp_path: Path) -> None:
    service = _service(tmp_path)
    _open(service)
    try:
        eff = service.book.effective(payloads.utc_ms())
        assert eff.source != SOURCE_DNO and max(eff.site_a) == 100 and not eff.columns
    finally:
        _close(service)


def _reading(offered_a: float, source: str, ts_ms: int, remaining_s: int = 25) -> ColumnReading:
    amps = (offered_a, offered_a, offered_a)
    volts = (230.0, 230.0, 230.0)
    return ColumnReading("c1", ts_ms, "Charging", "NoError", "C", offered_a, amps, volts, 0, 0, 0, 1, source,
                         (), 6.0, assigned_remaining_s=remaining_s)


def test_a_column_offering_above_its_recorded_limit_gets_the_limit_again(tmp_path: Path) -> None:
    service = _service(tmp_path)
    view = service.views["c1"]
    now = payloads.utc_ms()
    view.online, view.seeded, view.need_sync = True, True, False
    view.applied_a, view.written_ms, view.valid_until_ms = 10.0, now - 500, now + 29_500
    view.failsafe_ok_a = 6.0
    # A reading from before the write says nothing about it; one bound by its failsafe or its
    # cable neither; one bound by our limit at the limit is fine.
    for reading in (_reading(16.0, "gateway", now - 600), _reading(16.0, "failsafe", now),
                    _reading(10.0, "gateway", now), _reading(10.03, "gateway", now)):
        service._check_column_limits(view, reading, now)
        assert not view.need_sync, reading
    service._check_column_limits(view, _reading(16.0, "gateway", now), now)
    assert view.need_sync      # the next control step writes limit and failsafe, confirmed (unicast)
    # While a write is on its way nothing is concluded.
    fresh = replace(view, need_sync=False, inflight=True)
    service._check_column_limits(fresh, _reading(16.0, "gateway", now), now)
    assert not fresh.need_sync


def test_a_broadcast_decrease_is_confirmed_by_the_next_poll_or_written_again(tmp_path: Path) -> None:
    service = _service(tmp_path)
    view = service.views["c1"]
    view.online, view.seeded, view.need_sync = True, True, False
    view.applied_a, view.failsafe_ok_a = 16.0, 6.0
    cases = [(LimitResult("c1", True, "broadcast", limit_da=160, validity_s=30), False),  # a refresh
             (LimitResult("c1", True, "broadcast", limit_da=200, validity_s=30), False),  # an increase
             (LimitResult("c1", True, "unicast", limit_da=160, validity_s=30), False),    # confirmed
             (LimitResult("c1", True, "broadcast", limit_da=100, validity_s=30), True)]   # not confirmed
    for result, awaits_readback in cases:
        view.inflight = True
        service._on_limit_results([LimitCommand("c1", result.limit_da / 10, 30)], [result])
        assert view.applied_a == result.limit_da / 10 and not view.inflight, result
        assert bool(view.unconfirmed_ms) is awaits_readback, result
        assert not view.need_sync, result        # no extra write on the bus for now
    sent = view.unconfirmed_ms
    before = replace(view)
    # A reading from before the broadcast's result says nothing about it.
    service._check_column_limits(view, _reading(10.0, "gateway", sent - 5, remaining_s=3), sent + 60)
    assert view.unconfirmed_ms == sent and not view.need_sync
    # The next poll shows the offer within the new limit and the validity restarted: confirmed.
    service._check_column_limits(view, _reading(10.0, "gateway", sent + 900, remaining_s=29), sent + 910)
    assert view.unconfirmed_ms == 0 and not view.need_sync
    # A column that missed it (car paused, so its offer shows nothing; its validity is what the
    # write before left) gets the limit again, answered, at the next step.
    for missed in (_reading(0.0, "gateway", sent + 900, remaining_s=12),
                   _reading(0.0, "gateway", sent + 900, remaining_s=0),
                   _reading(16.0, "gateway", sent + 900, remaining_s=29)):
        lost = replace(before)
        service._check_column_limits(lost, missed, sent + 910)
        assert lost.need_sync and lost.unconfirmed_ms == 0, missed
    # An answered write after the broadcast settles it.
    view = replace(before, inflight=True)
    service.views["c1"] = view
    ok = LimitResult("c1", True, "unicast", limit_da=100, validity_s=30)
    service._on_limit_results([LimitCommand("c1", 10.0, 30, 6.0)], [ok])
    assert view.unconfirmed_ms == 0 and not view.need_sync


def test_a_lost_refresh_is_noticed_before_the_assignment_expires(tmp_path: Path) -> None:
    service = _service(tmp_path)
    view = service.views["c1"]
    now = payloads.utc_ms()
    view.online, view.seeded, view.need_sync, view.failsafe_ok_a = True, True, False, 6.0
    view.applied_a, view.written_ms, view.valid_until_ms = 10.0, now - 5000, now + 25_000
    service._check_column_limits(view, _reading(10.0, "gateway", now, remaining_s=25), now)
    assert not view.need_sync                 # holds what the last write (a refresh) gave it
    service._check_column_limits(view, _reading(10.0, "gateway", now, remaining_s=15), now)
    assert view.need_sync                     # 10 s short: the refresh never arrived
