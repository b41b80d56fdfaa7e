# Load-cap enforcement: which current the column may offer, and why.
#
# The offer is the lowest of the hardware rating, the cable (PP) rating, the
# installation rating, and either the gateway-assigned limit (while its validity runs
# and the gateway keeps its heartbeat) or the failsafe limit (otherwise, including
# before the first assignment). Nothing the gateway said is used after it expired.
# Below 6 A the column pauses, and a pause that interrupted an offer lasts at least
# min_pause before the offer comes back. Decreases apply at once; increases of an offer
# a car sees (signalled on the PWM) wait until pwm_min_change_interval has passed since
# the last change; without a car (or from 0) an increase applies at once.
#
# Supervision:
# - overdraw: the largest phase current above (signalled offer + pct % + offset) for
#   longer than the grace time suspends the offer (SRC_SAFETY, ERR_OVER_CURRENT) until
#   end_session() (the controller calls it on unplug, CP state A). Counted.
# - meter stale: a meter not ok for meter_stale time counts as overload. Our choice:
#   PAUSE (offer 0, SRC_SAFETY, ERR_POWER_METER) rather than drop to 6 A, because
#   without a meter the column cannot see whether the car follows the pilot at all;
#   only a pause ends with the contactor open (6 s after the PWM stops) whatever the
#   car does. The pause counts as a pause: after the meter recovers the minimum pause
#   time still applies, so a flapping meter does not cycle the car.
#
# Every value comes from the config dict (see DEFAULTS in firmware/controller.py);
# step-time code uses integers only (da, ms) and allocates nothing.
from .pilot import MAX_CURRENT_DA, MIN_CURRENT_DA, elapsed_ms
from .status import (
    ERR_NONE,
    ERR_OVER_CURRENT,
    ERR_POWER_METER,
    SRC_CABLE,
    SRC_FAILSAFE,
    SRC_GATEWAY,
    SRC_HARDWARE,
    SRC_INSTALLATION,
    SRC_PAUSE,
    SRC_SAFETY,
)

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

REJECTED = const(-1)     # assign()/set_failsafe() answer for invalid input
MAX_VALIDITY_S = const(86400)   # longer validities are cut to a day: time differences stay < 2**29 ms


def amps_to_da(value):
    """Config amps (int or float) -> deci-amps; used at construction, never in the step."""
    return round(float(value) * 10)


class LimitArbiter:
    def __init__(self, cfg):
        self.hardware_da = amps_to_da(cfg["hardware_rating_a"])
        if self.hardware_da > MAX_CURRENT_DA:
            self.hardware_da = MAX_CURRENT_DA
        self.installation_da = amps_to_da(cfg["installation_rating_a"])
        # The ratings never change at run time: the cap on any assigned limit.
        self._cap_da = min(self.hardware_da, self.installation_da)
        self.cable_da = MAX_CURRENT_DA  # set by the controller every step (0: no cable)
        self.failsafe_da = 0
        self._hb_timeout_ms = int(cfg["heartbeat_timeout_s"] * 1000)
        self._min_pause_ms = int(cfg["min_pause_s"] * 1000)
        self._tol_pct = int(cfg["overdraw_tolerance_pct"])
        self._tol_offset_da = amps_to_da(cfg["overdraw_offset_a"])
        self._grace_ms = int(cfg["overdraw_grace_s"] * 1000)
        self._stale_ms = int(cfg["meter_stale_s"] * 1000)
        self._change_ms = int(cfg["pwm_min_change_interval_s"] * 1000)
        self.set_failsafe(amps_to_da(cfg["failsafe_a"]))
        # Gateway assignment and heartbeat (flags latch so old timestamps never wrap).
        self.gateway_da = 0
        self.gateway_valid = False
        self._gw_ms = 0
        self._gw_validity_ms = 0
        self.gateway_alive = False
        self._hb_ms = 0
        self.enabled = True
        # Pause latch.
        self._pause_latched = False
        self._pause_ms = 0
        # Overdraw and meter supervision.
        self._over = False
        self._over_ms = 0
        self.overdraw_suspended = False
        self.overdraw_count = 0
        self._meter_bad = False
        self._meter_bad_ms = 0
        self.meter_stale = False
        # Increase rate limit (only while a car sees an offer).
        self._signalled_da = 0
        self._changed_ms = 0
        self._change_settled = True
        # Outputs of offered_da().
        self.offered = 0
        self.source = SRC_FAILSAFE
        self.paused = False
        self.failsafe_active = True
        self.error = ERR_NONE
        self.rejected_count = 0

    # --- inputs from the gateway and the config -----------------------------------
    def assign(self, limit_da, validity_s, now_ms):
        """Gateway limit for validity_s seconds. Returns the limit the column applies from
        it (capped by the hardware and installation ratings, 0 if below 6 A) or REJECTED.
        validity_s == 0 clears the assignment (the failsafe applies; returns it)."""
        if not isinstance(limit_da, int) or not isinstance(validity_s, int) or limit_da < 0 \
                or validity_s < 0:
            self.rejected_count += 1
            return REJECTED
        self.heartbeat(now_ms)  # an assignment is a sign of life too
        if validity_s == 0:
            self.gateway_valid = False
            limit_da = self.failsafe_da
        else:
            if validity_s > MAX_VALIDITY_S:
                validity_s = MAX_VALIDITY_S
            if limit_da > self._cap_da:
                limit_da = self._cap_da
            self.gateway_da = limit_da
            self._gw_ms = now_ms
            self._gw_validity_ms = validity_s * 1000
            self.gateway_valid = True
        return limit_da if limit_da >= MIN_CURRENT_DA else 0

    def assignment_remaining_s(self, now_ms):
        """Whole seconds left of a valid assignment, 0 when none (rounded up)."""
        if not self.gateway_valid:
            return 0
        left = self._gw_validity_ms - elapsed_ms(now_ms, self._gw_ms)
        if left <= 0:
            return 0
        return (left + 999) // 1000

    def set_failsafe(self, limit_da):
        """Pre-assigned failsafe limit, capped by the ratings. Returns it or REJECTED."""
        if not isinstance(limit_da, int) or limit_da < 0:
            self.rejected_count += 1
            return REJECTED
        if limit_da > self._cap_da:
            limit_da = self._cap_da
        self.failsafe_da = limit_da
        return limit_da

    def heartbeat(self, now_ms):
        self._hb_ms = now_ms
        self.gateway_alive = True

    def set_enabled(self, flag):
        self.enabled = bool(flag)

    def end_session(self):
        """Vehicle gone: clear the overdraw suspension and the pause latch."""
        self.overdraw_suspended = False
        self._over = False
        self._pause_latched = False

    # --- supervision ------------------------------------------------------------------
    def supervise(self, now_ms, i_max_da, meter_ok, signalled_da):
        """Meter staleness and overdraw against the offer the car saw (signalled_da)."""
        self._signalled_da = signalled_da
        if not meter_ok:
            if not self._meter_bad:
                self._meter_bad = True
                self._meter_bad_ms = now_ms
            elif not self.meter_stale and elapsed_ms(now_ms, self._meter_bad_ms) >= self._stale_ms:
                self.meter_stale = True
            # Currents from a failing meter are not trusted. A running overdraw timer is
            # kept: only a trusted reading within the tolerance ends an overdraw.
            return
        self._meter_bad = False
        self.meter_stale = False
        if self.overdraw_suspended:
            return
        allowed = signalled_da + (signalled_da * self._tol_pct) // 100 + self._tol_offset_da
        if i_max_da > allowed:
            if not self._over:
                self._over = True
                self._over_ms = now_ms
            elif elapsed_ms(now_ms, self._over_ms) >= self._grace_ms:
                self.overdraw_suspended = True
                self.overdraw_count += 1
                self._over = False
        else:
            self._over = False

    # --- the offer ----------------------------------------------------------------------
    def offered_da(self, now_ms):
        """Recompute the offer; also sets source, paused, failsafe_active and error."""
        if self.gateway_valid and elapsed_ms(now_ms, self._gw_ms) >= self._gw_validity_ms:
            self.gateway_valid = False
        if self.gateway_alive and elapsed_ms(now_ms, self._hb_ms) >= self._hb_timeout_ms:
            self.gateway_alive = False
        # The lowest of the ratings and the gateway limit / failsafe.
        target = self.hardware_da
        source = SRC_HARDWARE
        if self.cable_da < target:
            target = self.cable_da
            source = SRC_CABLE
        if self.installation_da < target:
            target = self.installation_da
            source = SRC_INSTALLATION
        self.failsafe_active = not (self.gateway_valid and self.gateway_alive)
        if self.failsafe_active:
            if self.failsafe_da < target:
                target = self.failsafe_da
                source = SRC_FAILSAFE
        elif self.gateway_da < target:
            target = self.gateway_da
            source = SRC_GATEWAY
        if self.overdraw_suspended:
            self.error = ERR_OVER_CURRENT
        elif self.meter_stale:
            self.error = ERR_POWER_METER
        else:
            self.error = ERR_NONE
        pause = False
        if not self.enabled or self.overdraw_suspended:
            target = 0
            source = SRC_SAFETY
        elif self.cable_da == 0:
            target = 0  # no cable or an invalid PP reading: nothing to offer, not a pause
        elif self.meter_stale:
            target = 0
            source = SRC_SAFETY
            pause = True
        elif target < MIN_CURRENT_DA:
            target = 0
            source = SRC_PAUSE
            pause = True
        if self._pause_latched and elapsed_ms(now_ms, self._pause_ms) >= self._min_pause_ms:
            self._pause_latched = False  # served (checked every step: no stale timestamp)
        if pause:
            if not self._pause_latched and self.offered > 0:
                self._pause_latched = True  # this pause interrupted an offer: hold it
                self._pause_ms = now_ms
        elif self._pause_latched and target > 0:
            target = 0
            source = SRC_PAUSE
            pause = True
        self.paused = pause or self._pause_latched
        self.source = source
        # Rate limit: an increase of an offer the car sees waits pwm_min_change_interval
        # after the last change; decreases, and increases from 0 or without a car, do not.
        cur = self.offered
        if target == cur:
            if not self._change_settled and elapsed_ms(now_ms, self._changed_ms) >= self._change_ms:
                self._change_settled = True
        elif not (target > cur > 0 and self._signalled_da > 0 and not self._change_settled
                  and elapsed_ms(now_ms, self._changed_ms) < self._change_ms):
            self.offered = target
            self._changed_ms = now_ms
            self._change_settled = self._change_ms <= 0
        return self.offered
