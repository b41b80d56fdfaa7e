"""Properties of the control step, whatever the event sequence.

The offered current (and the current the pilot duty encodes) never exceeds any active
limit: hardware, cable, installation, the gateway limit while valid, the failsafe once
the assignment expired or the gateway fell silent. Below 6 A nothing is offered. The
contactor is never closed outside C/D (or with the RCD tripped), opens within 100 ms
of the EV leaving C/D, and never closes without the EV's diode.

The invariant checker is one MicroPython-compatible script (CHECKER). Hypothesis drives
it in-process under CPython; seeded random sequences drive it as a subprocess under
both interpreters (the firmware under test runs in CPython and the MicroPython VM).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hil.rig.firmware_proc import INTERPRETERS, run_firmware

CHECKER = r'''
import json
import sys

from firmware.controller import DEFAULTS, Controller
from firmware.limits import MAX_VALIDITY_S, REJECTED
from firmware.pilot import cable_rating_da
from firmware.pilot_decode import current_da_for_duty
from firmware.status import CP_A, CP_B, CP_C, CP_D, CP_E

_HIGH = (12000, 9000, 6000, 3000, 0, -12000)
PERIOD = 10


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check_sequence(seq):
    """None when every invariant held at every step, else a message naming the first break."""
    cfg = dict(DEFAULTS)
    cfg.update(seq["cfg"])
    ctl = Controller(cfg)
    hw = cfg["hardware_rating_a"] * 10
    inst = cfg["installation_rating_a"] * 10
    fs = cfg["failsafe_a"] * 10
    hb_ms = cfg["heartbeat_timeout_s"] * 1000
    t = 0
    ev = CP_A
    diode = True
    draw = 0
    meter = True
    rcd = False
    pp = 680
    enabled = True
    gw = None            # (limit da, assigned at ms, validity ms)
    contact = None       # last message from the gateway (heartbeat or assignment)
    out_since = 0        # since when the EV has been outside C/D
    energy = 0
    n = 0
    for e in seq["events"]:
        kind = e[0]
        if kind == "run":
            k = 0
            while k < e[1]:
                in_c = ev == CP_C or ev == CP_D
                high = _HIGH[ev]
                if ev == CP_E:
                    low = 0
                elif not ctl.pwm_on:
                    low = high
                elif diode or ev == CP_A:
                    low = -12000
                else:
                    low = -high
                i = draw if ctl.contactor_on else 0
                energy += 1 if i else 0
                was_closed = ctl.contactor_on
                ctl.step(t, high, low, pp, i, i, i, meter, energy, rcd, ctl.contactor_on)
                n += 1
                gw_valid = (gw is not None and t - gw[1] < gw[2] and contact is not None
                            and t - contact < hb_ms)
                bound = min(hw, inst, cable_rating_da(pp), gw[0] if gw_valid else fs)
                where = "t=%d step=%d: " % (t, n)
                off = ctl.offered_da
                if off > bound:
                    return where + "offered %d above the active limit %d" % (off, bound)
                if current_da_for_duty(ctl.duty) > bound:
                    return where + "duty %d encodes more than %d" % (ctl.duty, bound)
                if 0 < off < 60:
                    return where + "offered %d below 6 A" % off
                if off > 0 and not enabled:
                    return where + "offered %d while disabled" % off
                if off > 0 and not ctl.pwm_on:
                    return where + "offered %d without PWM" % off
                if ctl.failsafe_active == gw_valid:
                    return where + "failsafe_active %s but gateway valid %s" % (ctl.failsafe_active, gw_valid)
                if ctl.contactor_on:
                    if ctl.cp_state != CP_C and ctl.cp_state != CP_D:
                        return where + "contactor closed in CP state %d" % ctl.cp_state
                    if rcd:
                        return where + "contactor closed with the RCD tripped"
                    if not in_c and t - out_since >= 100:
                        return where + "contactor still closed %d ms after the EV left C/D" % (t - out_since)
                    if not was_closed and not diode:
                        return where + "contactor closed without the EV diode"
                t += PERIOD
                k += 1
        elif kind == "ev":
            was_in = ev == CP_C or ev == CP_D
            ev = e[1]
            if was_in and not (ev == CP_C or ev == CP_D):
                out_since = t
        elif kind == "assign":
            r = ctl.assign_limit(e[1], e[2], t)
            bad = not _is_int(e[1]) or not _is_int(e[2]) or e[1] < 0 or e[2] < 0
            if (r == REJECTED) != bad:
                return "assign(%r, %r) answered %r" % (e[1], e[2], r)
            if not bad:
                contact = t
                if e[2] == 0:
                    gw = None
                else:
                    gw = (e[1], t, min(e[2], MAX_VALIDITY_S) * 1000)
                    if r > e[1] or r > hw or r > inst:
                        return "assign(%r) applied %r, above a limit" % (e[1], r)
        elif kind == "hb":
            ctl.heartbeat(t)
            contact = t
        elif kind == "failsafe":
            r = ctl.set_failsafe(e[1])
            bad = not _is_int(e[1]) or e[1] < 0
            if (r == REJECTED) != bad:
                return "set_failsafe(%r) answered %r" % (e[1], r)
            if not bad:
                if r > e[1] or r > hw or r > inst:
                    return "set_failsafe(%r) applied %r" % (e[1], r)
                fs = e[1]
        elif kind == "enable":
            ctl.limits.set_enabled(e[1])
            enabled = e[1]
        elif kind == "pp":
            pp = e[1]
        elif kind == "draw":
            draw = e[1]
        elif kind == "meter":
            meter = e[1]
        elif kind == "rcd":
            rcd = e[1]
        elif kind == "diode":
            diode = e[1]
        elif kind == "stop":
            ctl.session.remote_stop()
    return None


def main():
    with open(sys.argv[1]) as f:
        seqs = json.load(f)
    bad = 0
    for i in range(len(seqs)):
        err = check_sequence(seqs[i])
        if err is not None:
            bad += 1
            print("FAIL %d %s" % (i, err))
    print("DONE %d %d" % (len(seqs), bad))


if __name__ == "__main__":
    main()
'''

_NS: dict[str, object] = {"__name__": "limits_props_checker"}
exec(compile(CHECKER, "limits_props_checker", "exec"), _NS)
check_sequence = _NS["check_sequence"]

# Mostly healthy values so that sequences reach charging; faults and bad input still occur.
PP_CHOICES = [None, 100, 220, 220, 680, 680, 1500, 3000, 10000, 50]
MOSTLY_TRUE = [True, True, True, True, False]
MOSTLY_FALSE = [False, False, False, False, True]

configs = st.fixed_dictionaries({
    "hardware_rating_a": st.integers(6, 80),
    "installation_rating_a": st.integers(6, 80),
    "failsafe_a": st.integers(0, 80),
    "heartbeat_timeout_s": st.integers(1, 4),
    "min_pause_s": st.integers(0, 3),
    "overdraw_grace_s": st.integers(1, 3),
    "meter_stale_s": st.integers(1, 3),
    "pwm_min_change_interval_s": st.integers(0, 3),
    "cp_debounce_ms": st.sampled_from([10, 40, 80]),
})
limits = st.one_of(st.integers(-20, 900), st.sampled_from([16.5, None, "16"]))
validities = st.one_of(st.integers(-2, 6), st.integers(7, 10**6), st.just(2.5))
events = st.one_of(
    st.tuples(st.just("run"), st.integers(1, 120)),
    st.tuples(st.just("run"), st.integers(100, 400)),
    st.tuples(st.just("ev"), st.sampled_from([0, 1, 1, 2, 2, 2, 3, 4])),
    st.tuples(st.just("assign"), limits, validities),
    st.tuples(st.just("hb")),
    st.tuples(st.just("failsafe"), st.one_of(st.integers(-10, 900), st.just(8.0))),
    st.tuples(st.just("enable"), st.booleans()),
    st.tuples(st.just("pp"), st.sampled_from(PP_CHOICES)),
    st.tuples(st.just("draw"), st.integers(0, 900)),
    st.tuples(st.just("meter"), st.sampled_from(MOSTLY_TRUE)),
    st.tuples(st.just("rcd"), st.sampled_from(MOSTLY_FALSE)),
    st.tuples(st.just("diode"), st.sampled_from(MOSTLY_TRUE)),
    st.tuples(st.just("stop")),
)
# Most sequences begin by assigning a limit and plugging a car in, so they reach charging.
prologue = st.one_of(
    st.just([]),
    st.tuples(st.integers(0, 900), st.integers(1, 30), st.sampled_from([1, 2, 3]), st.integers(10, 400))
    .map(lambda p: [("assign", p[0], p[1]), ("ev", p[2]), ("run", p[3]), ("draw", p[0])]),
)
sequences = st.builds(lambda cfg, pro, evs: {"cfg": cfg, "events": pro + evs},
                      configs, prologue, st.lists(events, max_size=40))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequences)
def test_limits_and_contactor_hold_for_any_sequence(seq: dict) -> None:
    assert check_sequence(seq) is None, check_sequence(seq)


def test_checker_catches_a_broken_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker is not vacuous: a step that ignores the gateway limit is caught."""
    from firmware.limits import LimitArbiter

    real = LimitArbiter.offered_da

    def ignores_gateway(self: LimitArbiter, now_ms: int) -> int:
        real(self, now_ms)
        self.offered = self.hardware_da
        return self.offered

    monkeypatch.setattr(LimitArbiter, "offered_da", ignores_gateway)
    seq = {"cfg": {"hardware_rating_a": 32, "installation_rating_a": 32},
           "events": [["assign", 100, 60], ["ev", 1], ["run", 20]]}
    err = check_sequence(seq)
    assert err is not None and "above the active limit" in err


def _random_sequence(rng: random.Random) -> dict:
    cfg = {"hardware_rating_a": rng.randint(6, 80), "installation_rating_a": rng.randint(6, 80),
           "failsafe_a": rng.randint(0, 80), "heartbeat_timeout_s": rng.randint(1, 3),
           "min_pause_s": rng.randint(0, 2), "overdraw_grace_s": rng.randint(1, 2),
           "meter_stale_s": rng.randint(1, 2), "pwm_min_change_interval_s": rng.randint(0, 2)}
    evs: list[list[object]] = []
    for _ in range(rng.randint(5, 30)):
        kind = rng.choice(["run", "run", "run", "ev", "ev", "assign", "assign", "hb", "hb", "failsafe",
                           "enable", "pp", "draw", "draw", "meter", "rcd", "diode", "stop"])
        if kind == "run":
            evs.append([kind, rng.randint(1, 300)])
        elif kind == "ev":
            evs.append([kind, rng.choice([0, 1, 1, 2, 2, 2, 3, 4])])
        elif kind == "assign":
            evs.append([kind, rng.choice([rng.randint(-5, 900), 12.5]),
                        rng.choice([rng.randint(-1, 5), rng.randint(6, 100000)])])
        elif kind == "failsafe":
            evs.append([kind, rng.randint(-5, 900)])
        elif kind == "pp":
            evs.append([kind, rng.choice(PP_CHOICES)])
        elif kind == "draw":
            evs.append([kind, rng.randint(0, 900)])
        elif kind == "rcd":
            evs.append([kind, rng.random() < 0.15])
        elif kind in ("enable", "meter", "diode"):
            evs.append([kind, rng.random() < 0.85])
        else:
            evs.append([kind])
    return {"cfg": cfg, "events": evs}


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_properties_hold_in_both_interpreters(interp: str, tmp_path: Path) -> None:
    rng = random.Random(20240611)
    seqs = [_random_sequence(rng) for _ in range(40)]
    (tmp_path / "seqs.json").write_text(json.dumps(seqs))
    script = tmp_path / "limits_props_checker.py"
    script.write_text(CHECKER)
    done = run_firmware(interp, script, [str(tmp_path / "seqs.json")], heap="128K",
                        timeout_s=120, cwd=tmp_path)
    out = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, out
    assert "DONE 40 0" in out, out
