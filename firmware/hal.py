# The column's hardware abstraction: the only firmware module that touches `machine`.
# Everything above it (controller, meter, links) is pure logic fed with integers.
# The board wiring comes from a pin map (PINS below for an ESP32 board; the config may
# override entries), and `machine` is passed in so a virtual board can stand in.
const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

# CP sense: a divider maps -12 V .. +12 V onto the ADC's 0 .. 65535.
_CP_ADC_MIN_MV = const(-12000)
_CP_ADC_SPAN_MV = const(24000)
# PP sense: the cable's resistor to ground against a pull-up to the ADC reference.
_PP_PULLUP_OHMS = const(1000)
_PP_OPEN_RAW = const(65000)         # above this the PP line is open: no cable
_CP_SAMPLES = const(8)              # spread over at least one 1 kHz PWM period
_PWM_FREQ = const(1000)

PINS = dict(
    cp_pwm=25, cp_adc=34, pp_adc=35, contactor=26, contactor_fb=27, rcd=14,
    meter_uart=1, meter_tx=17, meter_rx=16, meter_de=4,
    link_uart=2, link_tx=22, link_rx=21, link_de=5,
)


def cp_raw_to_mv(raw):
    return _CP_ADC_MIN_MV + raw * _CP_ADC_SPAN_MV // 65535


def cp_mv_to_raw(mv):
    """Inverse of cp_raw_to_mv, for virtual boards and tests."""
    raw = (mv - _CP_ADC_MIN_MV) * 65535 // _CP_ADC_SPAN_MV
    return 0 if raw < 0 else (65535 if raw > 65535 else raw)


def pp_ohms_to_raw(ohms):
    """Inverse of Hal.read_pp_ohms, for virtual boards and tests."""
    if ohms < 0:
        return 65535
    return 65535 * ohms // (ohms + _PP_PULLUP_OHMS)


class Hal:
    """Owns every pin. Reads return ints; writes take ints (duty in 0.01 %)."""

    def __init__(self, machine, pins=None, wdt_timeout_ms=5000, use_wdt=True):
        p = PINS
        if pins:  # a copy only when the config overrides entries
            p = dict(PINS)
            p.update(pins)
        self.pins = p
        self._machine = machine
        self._pwm = machine.PWM(machine.Pin(p["cp_pwm"], machine.Pin.OUT), freq=_PWM_FREQ, duty_u16=65535)
        self._cp_adc = machine.ADC(machine.Pin(p["cp_adc"]))
        self._pp_adc = machine.ADC(machine.Pin(p["pp_adc"]))
        self._contactor = machine.Pin(p["contactor"], machine.Pin.OUT, value=0)
        self._contactor_fb = machine.Pin(p["contactor_fb"], machine.Pin.IN)
        self._rcd = machine.Pin(p["rcd"], machine.Pin.IN)
        self._wdt = machine.WDT(timeout=wdt_timeout_ms) if use_wdt else None
        self.cp_high_mv = 0
        self.cp_low_mv = 0

    def read_cp(self):
        """Sample CP and keep the highest and lowest level: the PWM plateau and the
        EV diode's -12 V. Results in self.cp_high_mv / self.cp_low_mv (no allocation)."""
        hi = 0
        lo = 65535
        adc = self._cp_adc
        for _ in range(_CP_SAMPLES):
            raw = adc.read_u16()
            if raw > hi:
                hi = raw
            if raw < lo:
                lo = raw
        self.cp_high_mv = cp_raw_to_mv(hi)
        self.cp_low_mv = cp_raw_to_mv(lo)

    def read_pp_ohms(self):
        """Resistance seen on PP; -1 when the line is open (no cable plugged)."""
        raw = self._pp_adc.read_u16()
        if raw >= _PP_OPEN_RAW:
            return -1
        return _PP_PULLUP_OHMS * raw // (65535 - raw)

    def set_duty(self, duty):
        """duty in 0.01 % (10000 = constant +12 V, no current; 0 = constant -12 V, state F)."""
        self._pwm.duty_u16(duty * 65535 // 10000)

    def set_contactor(self, on):
        self._contactor.value(1 if on else 0)

    def contactor_closed(self):
        return self._contactor_fb.value() == 1

    def rcd_tripped(self):
        return self._rcd.value() == 1

    def feed_watchdog(self):
        if self._wdt is not None:
            self._wdt.feed()

    def uart(self, which, baud):
        """Open the meter or link UART ("meter" / "link") with its RS-485 direction pin."""
        p = self.pins
        uart = self._machine.UART(p[which + "_uart"], baudrate=baud, tx=p[which + "_tx"],
                                  rx=p[which + "_rx"])
        de = self._machine.Pin(p[which + "_de"], self._machine.Pin.OUT, value=0)
        return uart, de

    def reset(self):
        self._machine.reset()
