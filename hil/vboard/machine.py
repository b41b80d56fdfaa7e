# A virtual board's `machine` module for the firmware under CPython and the MicroPython
# unix port. It lives with the HIL, never in the firmware bundle. Tests and the HIL set
# inputs (ADC readings, input pins) and read outputs (PWM duty, relay pins, WDT feeds)
# through the module-level `board` object. MicroPython-compatible code only. It offers
# the part of `machine` the firmware's HAL uses and no more: its code shares the heap of
# the column it runs (see tests/firmware_host/test_app_cbor.py).


class _Board:
    def __init__(self):
        self.adc_u16 = {}       # pin id -> raw reading 0..65535
        # pin id -> (pwm pin id, raw while the PWM is high, raw while it is low): an ADC
        # that samples a PWM-driven line (the control pilot) sees both plateaus in turn.
        self.adc_pwm = {}
        self.pin_levels = {}    # pin id -> 0/1 (inputs set by tests, outputs set by firmware)
        self.pwm = {}           # pin id -> PWM object
        self.uart_paths = {}    # uart id -> device path (a pty end) for the unix leg
        self.wdt = None
        self.resets = 0

    def clear(self):
        self.__init__()


board = _Board()


class Pin:
    IN = 0
    OUT = 1

    def __init__(self, pin_id, mode=-1, pull=-1, value=None):
        self.id = pin_id
        self.mode = mode
        if value is not None:
            board.pin_levels[pin_id] = 1 if value else 0

    def value(self, level=None):
        if level is None:
            return board.pin_levels.get(self.id, 0)
        board.pin_levels[self.id] = 1 if level else 0
        return None


class PWM:
    def __init__(self, pin, freq=1000, duty_u16=0):
        self.pin = pin
        self._freq = freq
        self._duty = duty_u16
        board.pwm[pin.id if isinstance(pin, Pin) else pin] = self

    def freq(self):
        return self._freq

    def duty_u16(self, value=None):
        if value is None:
            return self._duty
        self._duty = value
        return None


class ADC:
    def __init__(self, pin):
        self.id = pin.id if isinstance(pin, Pin) else pin
        self._phase = 0

    def read_u16(self):
        follow = board.adc_pwm.get(self.id)
        if follow is None:
            return board.adc_u16.get(self.id, 0)
        pwm = board.pwm.get(follow[0])
        duty = pwm.duty_u16() if pwm is not None else 65535
        if duty >= 65535:
            return follow[1]
        if duty <= 0:
            return 0  # constant -12 V
        self._phase ^= 1
        return follow[1] if self._phase else follow[2]


class WDT:
    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout
        self.feeds = 0
        board.wdt = self

    def feed(self):
        self.feeds += 1


class UART:
    """A UART backed by a pty path (board.uart_paths[id]) so real serial peers can talk.
    Reads never block (VMIN 0, VTIME 0), like a board's UART.read() returning None."""

    def __init__(self, uart_id, baudrate=9600, **kwargs):
        import sys
        import termios

        self.id = uart_id
        self.baudrate = baudrate
        path = board.uart_paths.get(uart_id)
        if path is None:
            raise OSError("virtual board has no line for UART %s" % uart_id)
        if sys.implementation.name == "micropython":
            self._line = open(path, "r+b")
        else:
            self._line = open(path, "r+b", buffering=0)
        try:
            attrs = termios.tcgetattr(self._line.fileno())
            attrs[6][6] = 0   # VMIN
            attrs[6][5] = 0   # VTIME
            termios.tcsetattr(self._line.fileno(), termios.TCSANOW, attrs)
        except Exception:  # termios.error on CPython, OSError on MicroPython
            pass  # not a tty (e.g. /dev/null for a line nobody listens on)

    def write(self, data):
        return self._line.write(data)  # unbuffered: the bytes are on the pty now

    def flush(self):
        """A board waits here for the last stop bit; a pty has nothing in flight."""

    def readinto(self, buf):
        return self._line.readinto(buf) or None


def reset():
    board.resets += 1
    raise SystemExit("machine.reset")
