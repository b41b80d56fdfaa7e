"""The `site` replay target: the real gateway, a real broker and the real firmware, in real time.

Short versions of two suite scenarios replayed end to end, each on its own private site:
a DNO curtailment (the real gateway must bring the measured site current under the DNO's
limit, pausing a car) on each firmware interpreter, the MicroPython one on mixed links
(Modbus RTU and Modbus TCP); and a broker outage during which the DNO's limit expires (the
real gateway, cut off from its broker, must fall to the site's DNO failsafe, and every
telemetry message queued meanwhile must reach the consumer afterwards). The telemetry check
judges the sequence numbers a real MQTT consumer received. A broken site proves the checks
can fail: DNO commands the gateway refuses (unsigned) fail limit.site, and a consumer that
loses messages fails the telemetry check, with the others passing.

The four sites run at the same time (real time: about 50 s in all). The cars unplug five
seconds before each trace ends so that the firmware's energy register, read from the meter
every second, has caught up with the modelled energy (even on a busy machine) before the
energy check compares them.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from gateway.north import payloads, topics
from hil.replay.cli import UsageError, make_target, run_suite
from hil.replay.engine import EngineOptions, RunResult, replay
from hil.replay.oracles import OracleResult
from hil.replay.site_target import SiteTarget
from hil.replay.telemetry_consumer import TelemetryConsumer
from hil.rig.broker import mosquitto_binary
from hil.rig.ports import LOOPBACK
from hil.scenarios import Scenario, write_trace

DNO_LIMIT_A = 8.0
FAILSAFE_A = 10.0
CURTAIL_AT_S = 15
CAR_RESPONSE_S = 10          # the site check's response time (hil.replay.oracles)


def _layout(capacity_a: float, n: int, **site: Any) -> dict[str, Any]:
    return {"site": {"id": "scenario", "capacity_a": capacity_a, **site,
                     "allocation": {"increase_delay_max_s": 2, "dno_restore_without_delay": True}},
            "columns": [{"id": "c%d" % (i + 1), "phases": 3, "hardware_a": 32.0} for i in range(n)],
            "gateway": {"period_s": 5, "refresh_s": 10, "validity_s": 60}}


def _plug(soc_pct: float) -> dict[str, Any]:
    return {"type": "plug", "profile": "generic-3ph-11kw", "soc_pct": soc_pct}


def curtailment(folder: Path) -> Path:
    """Two cars ramp up; at 15 s (about 9 A each) the DNO limits the site to 8 A: one car
    must pause (two would need 12 A at the 6 A minimum)."""
    sc = Scenario("dno-curtailment-short", "two cars; the DNO curtails the site to 8 A", 32_000,
                  _layout(63.0, 2))
    sc.add(1, "c1/ev.event", _plug(30)).add(2, "c2/ev.event", _plug(35))
    sc.add(CURTAIL_AT_S, "dno.limit", {"limit_a": DNO_LIMIT_A, "validity_s": 60, "id": "curtail-1"})
    sc.add(27, "c1/ev.event", {"type": "unplug"}).add(27, "c2/ev.event", {"type": "unplug"})
    return write_trace(sc, folder / "curtailment.trace")


def broker_outage(folder: Path) -> Path:
    """A 30 A DNO limit valid 12 s; the broker is down from 6 s to 34 s, so the limit expires
    at 15 s with the DNO link down: the site must fall to its DNO failsafe (10 A), not to
    its capacity (40 A), until the link is back."""
    sc = Scenario("broker-outage-short", "the broker is down while the DNO limit expires", 42_000,
                  _layout(40.0, 2, dno_failsafe_a=FAILSAFE_A))
    sc.add(1, "c1/ev.event", _plug(30)).add(2, "c2/ev.event", _plug(35))
    sc.add(3, "dno.limit", {"limit_a": 30.0, "validity_s": 12, "id": "d1"})
    sc.add(6, "link.fault", {"kind": "silent", "duration_ms": 28_000, "link": "dno"})
    sc.add(37, "c1/ev.event", {"type": "unplug"}).add(37, "c2/ev.event", {"type": "unplug"})
    return write_trace(sc, folder / "broker-outage.trace")


# ---- a broken site ---------------------------------------------------------------------------


class LossyConsumer(TelemetryConsumer):
    """Loses every third column telemetry message it is handed (a consumer bug, on purpose)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dropped: list[int] = []
        self._n = 0

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if topics.parse(msg.topic).kind is topics.TopicKind.COLUMN_TELEMETRY:
            self._n += 1
            if self._n % 3 == 0:
                self.dropped.append(int(json.loads(msg.payload)["seq"]))
                return
        super()._on_message(client, userdata, msg)


class BrokenSite(SiteTarget):
    """The DNO's commands go out unsigned (the gateway must refuse them) and the consumer
    loses messages."""

    def _publish(self, topic: str, body: dict[str, Any]) -> None:
        assert self.dno is not None
        unsigned = self.dno.command(topic, {**body, "issued_ms": payloads.utc_ms()}, sign=False)
        self.dno.client.publish(topic, json.dumps(unsigned).encode(), qos=1)

    def _consumer(self, port: int, site_id: str) -> TelemetryConsumer:
        return LossyConsumer(LOOPBACK, port, site_id).start()


# ---- the runs ------------------------------------------------------------------------------------


Run = tuple[RunResult, dict[str, Any], dict[str, list[int]], list[int]]   # result, stats, seqs, dropped


def _run(trace: Path, target: SiteTarget) -> Run:
    try:
        result = replay(trace, target, EngineOptions(speed=1.0, progress=False), target_name="site")
        seqs = target.telemetry_sequences() or {}
        dropped = list(getattr(target.consumer, "dropped", []))
        return result, dict(target.stats()), seqs, dropped
    finally:
        target.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    try:
        mosquitto_binary()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    folder = tmp_path_factory.mktemp("site-traces")
    curtail = curtailment(folder)
    jobs = {
        "curtailment-cpython": (curtail, SiteTarget("cpython")),
        "curtailment-micropython": (curtail, SiteTarget("micropython", links="mixed")),
        "broker-outage": (broker_outage(folder), SiteTarget("cpython")),
        "broken": (curtail, BrokenSite("cpython")),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(_run, trace, target) for name, (trace, target) in jobs.items()}
        return {name: f.exception() or f.result() for name, f in futures.items()}


def _get(runs: dict[str, Any], name: str) -> Run:
    run = runs[name]
    if isinstance(run, BaseException):
        raise run
    return run  # type: ignore[no-any-return]


def _check(result: RunResult, oracle_id: str) -> OracleResult:
    return next(r for r in result.results if r.id == oracle_id)


def _failed(result: RunResult) -> list[str]:
    return ["%s: %s %s" % (r.id, r.message, dict(r.figure)) for r in result.results if not r.ok]


def _contiguous_from_one(seqs: dict[str, list[int]], *, redelivered: int = 0) -> list[int]:
    """The seqs received, which must be 1..N each once after dropping at most `redelivered`
    duplicates (what a consumer does, docs/mqtt-api.md)."""
    assert list(seqs) == ["scenario"], seqs.keys()   # one publisher: the site's gateway
    got = seqs["scenario"]
    unique = sorted(set(got))
    assert unique == list(range(1, max(got) + 1)), "a gap in %s" % got
    assert len(got) - len(unique) <= redelivered, "duplicates in %s" % got
    return unique


# ---- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("interp", ["cpython", "micropython"])
def test_the_real_gateway_curtails_the_site_for_the_dno(runs: dict[str, Any], interp: str) -> None:
    result, stats, seqs, _ = _get(runs, "curtailment-" + interp)
    assert result.ok, _failed(result)
    assert stats["interp"] == interp
    assert stats["telemetry"]["acks"] == {"accepted": 1}          # the gateway took the DNO's command
    site = _check(result, "limit.site")
    assert site.figure["lowest_limit_a"] == DNO_LIMIT_A
    # The cars drew more than the DNO's limit when it came: the gateway had to act.
    assert site.figure["max_measured_a"] > DNO_LIMIT_A + 2
    assert {"limit.offer/c1", "limit.car/c2", "timing/c1", "energy/c2"} <= {r.id for r in result.results}
    telemetry = _check(result, "telemetry")
    assert telemetry.passed and telemetry.figure["lost"] == 0 and telemetry.figure["duplicates"] == 0
    got = _contiguous_from_one(seqs)   # no outage: nothing is redelivered
    assert len(got) >= 30       # column and site telemetry every 2 s, plus status and events
    if interp == "micropython":
        assert stats["links"] == {"c1": "modbus-rtu", "c2": "modbus-tcp"}


def test_the_real_gateway_falls_to_the_dno_failsafe_while_its_broker_is_down(runs: dict[str, Any]) -> None:
    result, stats, seqs, _ = _get(runs, "broker-outage")
    assert result.ok, _failed(result)
    assert stats["broker_stops"] == 1
    assert stats["telemetry"]["connects"] >= 2                   # the consumer lived through it
    site = _check(result, "limit.site")
    assert site.figure["lowest_limit_a"] == FAILSAFE_A
    # The limit that expired allowed 30 A, and the cars were over the failsafe by then: the
    # gateway, cut off from its broker, brought them under it (the check has judged the
    # site from 25 s, 10 s after the expiry, to 34 s, when the link came back).
    assert site.figure["max_measured_a"] > FAILSAFE_A + 2
    # Delivery is at least once: a message in flight when the broker stopped may come twice
    # (its PUBACK died with the broker, or the broker had not yet had the consumer's). Those
    # are at most one round of telemetry (the site and two columns) on each of the two hops.
    telemetry = _check(result, "telemetry")
    assert telemetry.passed and telemetry.figure["conflicting"] == 0
    got = _contiguous_from_one(seqs, redelivered=2 * 3)
    # 28 of the 42 s had no broker: what the gateway queued then (about 2/3 of the
    # telemetry) arrived afterwards, and nothing in between is missing.
    assert len(got) >= 50, len(got)


def test_a_refused_command_and_a_lossy_consumer_fail_their_checks_only(runs: dict[str, Any]) -> None:
    result, stats, seqs, dropped = _get(runs, "broken")
    assert stats["telemetry"]["acks"] == {"rejected:unauthenticated": 1}
    failed = sorted(r.id for r in result.results if not r.ok)
    assert failed == ["limit.site", "telemetry"], _failed(result)
    site = _check(result, "limit.site")
    assert site.figure["violations"] >= 1
    assert site.figure["worst_excess_a"] > 2                     # both cars kept charging
    assert site.figure["worst_at_s"] >= CURTAIL_AT_S + CAR_RESPONSE_S   # judged after the response time
    telemetry = _check(result, "telemetry")
    received = seqs["scenario"]
    gaps = [s for s in dropped if s < max(received)]            # a drop after the last arrival is no gap
    assert dropped and telemetry.figure["lost"] == len(gaps)
    assert telemetry.figure["duplicates"] == 0


def test_the_cli_knows_the_site_target_and_what_it_cannot_run(capsys: pytest.CaptureFixture[str]) -> None:
    target = make_target("site:micropython,mixed,hang", 1.0)
    assert isinstance(target, SiteTarget) and target.realtime and target.gateway_in_loop
    assert (target.interp, target.links, target.gateway_loss) == ("micropython", "mixed", "stop")
    target.close()
    with pytest.raises(UsageError, match="unknown site option 'fast'"):
        make_target("site:fast", 1.0)
    with pytest.raises(UsageError, match="real time only"):
        make_target("site", 10.0)
    # The 24 h site cannot run in real time: skipped, with the reason, and the suite passes.
    assert run_suite("site", only=["site-24h-20col"], options=EngineOptions(speed=1.0, progress=False)) == 0
    out = capsys.readouterr().out
    assert "site-24h-20col           skipped (too long for real time on site)" in out
    assert "0 passed, 0 failed, 0 could not run, 1 skipped" in out
