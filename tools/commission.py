"""Commission an RS-485 bus: find the columns and meters on it, move a column to another address.

    python -m tools.commission scan PORT [--bauds 19200,9600|all] [--first 1] [--last 247]
                                         [--timeout S] [--json]
    python -m tools.commission set-address PORT --from A --to B [--baud N] [--timeout S] [--json]

PORT is the laptop's USB–RS-485 adapter on the site's bus (the gateway's bus, stopped or
unplugged while you work: two masters on one bus garble each other's frames).

`scan` asks every address in the range, at each baud rate, for the column's input registers
(firmware/regmap.py) and, where something else answers, for an Eastron SDM630 / SDM120
meter's (firmware/sdm.py), and prints what answered: columns with their column id, firmware
version, phases, ratings, status and readings; meters with their readings; and addresses
whose replies came back garbled (two devices on one address, or noise).

`set-address` moves a column from bus address A to B: it checks that a column answers at A
and that nothing answers at B, writes B with its confirm value (new_address and
address_confirm, see docs/firmware-contract.md), and verifies that the same column answers
at B. The column saves `bus_address` B in its column.json before it answers there.

Exit status: 0 done; 1 the change failed (the column refused it, or did not answer at its new
address), or a scan heard only garbled replies; 2 refused before anything was written, one
line on stderr: a usage mistake, a missing or busy port, nothing answering, the target
address taken.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import NoReturn

import serial

from firmware import config as fw_config
from firmware import regmap, regmap_tables, sdm, status_names
from firmware.crc import crc16

PROG = "python -m tools.commission"
EXIT_FAILED = 1
EXIT_REFUSED = 2
DEFAULT_BAUDS = (19200, 9600)       # the example site's bus; the SDM meters' factory setting
MAX_ADDRESS = regmap.BROADCAST_MAX_ADDRESS
# Every firmware version serves the polled input registers; the column id after them
# came later, so it is read separately and may be missing.
COLUMN_IMAGE_WORDS = regmap.POLL_COUNT
SAVE_ALLOWANCE_S = 1.0              # a column writes its config to flash before it answers
TRAILING_WAIT_S = 0.02              # listening after a reply for a second device's
EPILOG = """\
examples:
  %(prog)s scan /dev/ttyUSB0                 (every address, at 19200 and 9600 baud)
  %(prog)s scan /dev/ttyUSB0 --first 1 --last 20 --bauds all
  %(prog)s set-address /dev/ttyUSB0 --from 3 --to 7
  %(prog)s COMMAND --help                    (all options of a command)

exit status: 0 done; 1 the change failed (refused by the column, or it does not answer at
its new address), or a scan heard only garbled replies; 2 refused before anything was
written (usage, missing or busy port, nothing answering, the new address taken), one line
on stderr. Run it with the gateway stopped: two masters on one bus garble each other.
Walkthrough: docs/field-guide.md, section 'Commissioning a bus'.
"""


class CommissionError(Exception):
    """What stops the tool; the message is the one line the technician reads."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


# -- Modbus RTU master over pyserial --------------------------------------------------------
class NoAnswer(Exception):
    """Nothing came back in time."""


class Garbled(Exception):
    """Bytes came back, but not a valid reply (CRC, length, another unit or function)."""


class DeviceException(Exception):
    """A Modbus exception reply."""

    def __init__(self, code: int) -> None:
        super().__init__(f"exception {code:02d}")
        self.code = code


def char_time_s(baud: int) -> float:
    return 11 / baud  # start, 8 data, parity or second stop, stop


def with_crc(body: bytes) -> bytes:
    crc = crc16(body)
    return body + bytes((crc & 0xFF, crc >> 8))


class RtuMaster:
    """Requests one at a time on an open serial port; `timeout_s` is how long a device may
    take to start answering, on top of the wire time of the frames."""

    def __init__(self, ser: serial.Serial, timeout_s: float) -> None:
        self.ser = ser
        self.timeout_s = timeout_s
        self.requests = 0
        self._idle_from = 0.0

    @property
    def baud(self) -> int:
        return int(self.ser.baudrate)

    def set_baud(self, baud: int) -> None:
        self.ser.baudrate = baud

    def exchange(self, frame: bytes, extra_s: float = 0.0) -> bytes:
        """Send one request frame; the valid reply frame for its unit and function."""
        unit, fc = frame[0], frame[1]
        gap = max(3.5 * char_time_s(self.baud), 0.00175)
        wait = self._idle_from + gap - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.ser.reset_input_buffer()  # a late reply to an earlier request is not this one's
        self.ser.write(frame)
        self.ser.flush()
        self.requests += 1
        deadline = time.monotonic() + len(frame) * char_time_s(self.baud) + self.timeout_s + extra_s
        buf = b""
        need = 3
        while len(buf) < need:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.ser.timeout = min(left, 0.05)
            buf += self.ser.read(need - len(buf))
            if need == 3:
                buf = buf.lstrip(b"\x00")  # a glitch as an adapter turns its driver around
            if len(buf) >= 3 and need == 3:
                need = reply_length(buf)
                # the rest of the reply needs its wire time, however late it started
                deadline = max(deadline, time.monotonic() + (need - 3) * char_time_s(self.baud) * 2 + 0.05)
        self._idle_from = time.monotonic()
        if not buf:
            raise NoAnswer()
        if len(buf) < need:
            raise Garbled(f"{len(buf)} bytes, cut short: {buf.hex(' ')}")
        reply = buf[:need]
        # A second device at the same address: on a wire the replies collide (CRC error); if
        # they came one after the other instead, the second one shows up here.
        self.ser.timeout = max(8 * char_time_s(self.baud), TRAILING_WAIT_S)
        extra = buf[need:] + self.ser.read(256)
        self._idle_from = time.monotonic()
        if extra:
            raise Garbled(f"{len(extra)} more bytes after the reply {reply.hex(' ')}")
        if crc16(reply[:-2]) != reply[-2] | (reply[-1] << 8):
            raise Garbled(f"CRC error in {reply.hex(' ')}")
        if reply[0] != unit or reply[1] & 0x7F != fc:
            raise Garbled(f"a reply for unit {reply[0]} function {reply[1] & 0x7F}: {reply.hex(' ')}")
        if reply[1] & 0x80:
            raise DeviceException(reply[2])
        return reply

    def read(self, unit: int, fc: int, start: int, count: int, attempts: int = 1) -> list[int]:
        """FC03/FC04: `count` registers from `start`."""
        frame = with_crc(struct.pack(">BBHH", unit, fc, start, count))
        for attempt in range(attempts):
            try:
                reply = self.exchange(frame)
                break
            except (NoAnswer, Garbled):
                if attempt == attempts - 1:
                    raise
        if reply[2] != 2 * count:
            raise Garbled(f"{reply[2] // 2} registers instead of {count}")
        return list(struct.unpack(f">{count}H", reply[3:3 + 2 * count]))

    def write(self, unit: int, start: int, values: Sequence[int], extra_s: float = 0.0) -> None:
        """FC16: the values from `start`, checked against the echo."""
        body = struct.pack(">BBHHB", unit, 16, start, len(values), 2 * len(values))
        body += struct.pack(f">{len(values)}H", *values)
        reply = self.exchange(with_crc(body), extra_s)
        if struct.unpack(">HH", reply[2:6]) != (start, len(values)):
            raise Garbled(f"echo {reply.hex(' ')} does not match the write")


def reply_length(head: bytes) -> int:
    """Bytes in the whole reply frame, from its first three bytes."""
    if head[1] & 0x80:
        return 5
    if head[1] in (3, 4):
        return 5 + head[2]
    return 8  # 06 and 16 echo address and value/count


# -- the port ------------------------------------------------------------------------------
def open_port(port: str, parity: str = "N", stopbits: int = 1) -> serial.Serial:
    """The adapter's port, opened exclusively, or CommissionError in one line."""
    if port.startswith("/dev/") and not os.path.exists(port):
        raise CommissionError(f"port {port} not found: is the USB–RS-485 adapter plugged in? "
                              f"(list ports with: python -m serial.tools.list_ports)")
    try:
        return serial.Serial(port, DEFAULT_BAUDS[0], parity=parity, stopbits=stopbits, timeout=0.05,
                             exclusive=True)
    except (serial.SerialException, OSError) as exc:
        code = getattr(exc, "errno", None)
        text = str(exc)
        if code in (errno.EBUSY, errno.EAGAIN, errno.EWOULDBLOCK) or "exclusively lock" in text:
            raise CommissionError(f"port {port} is busy: another program holds it (a gateway, a serial "
                                  f"monitor or another commission run); stop it and try again") from None
        if code == errno.ENOENT:
            raise CommissionError(f"port {port} not found: is the USB–RS-485 adapter plugged in?") from None
        if code == errno.EACCES:
            raise CommissionError(f"no permission to open {port}: add your user to the 'dialout' group "
                                  f"(sudo usermod -aG dialout $USER) and log in again") from None
        if code == errno.ENOTTY or "Inappropriate ioctl" in text:
            raise CommissionError(f"{port} is not a serial port") from None
        raise CommissionError(f"cannot open port {port}: {text}") from None


# -- what answers --------------------------------------------------------------------------
@dataclass
class Column:
    address: int
    baud: int
    column_id: str | None             # None: firmware from before column ids were served
    firmware: str
    phases: int
    hardware_rating_a: float
    cable_rating_a: float
    status: str
    error: str
    cp_state: str
    offered_a: float
    current_a: list[float]
    voltage_v: list[float]
    power_w: int
    energy_wh: int
    failsafe_a: float
    flags: list[str]
    boots: int
    uptime_s: int
    kind: str = "column"


@dataclass
class Meter:
    address: int
    baud: int
    type: str                         # sdm630 or sdm120
    voltage_v: list[float]
    current_a: list[float]
    power_w: float
    frequency_hz: float
    import_kwh: float
    export_kwh: float
    kind: str = "meter"


@dataclass
class Other:
    """Answers Modbus, but is neither a column nor an SDM meter; or answers garbled."""

    address: int
    baud: int
    detail: str
    kind: str = "other"


@dataclass
class ScanResult:
    port: str
    bauds: list[int]
    first: int
    last: int
    columns: list[Column] = field(default_factory=list)
    meters: list[Meter] = field(default_factory=list)
    others: list[Other] = field(default_factory=list)
    garbled: list[Other] = field(default_factory=list)

    @property
    def found(self) -> int:
        return len(self.columns) + len(self.meters) + len(self.others)


def _name(names: Sequence[str], code: int) -> str:
    return names[code] if 0 <= code < len(names) else f"Unknown({code})"


def looks_like_column(regs: Sequence[int], address: int) -> bool:
    """A column's image names its own address; a meter's float registers never hold a
    small integer in that word (it would be a denormal float's high word)."""
    return (regs[regmap.IR_BUS_ADDRESS] == address and regs[regmap.IR_PHASES] in (0, 1, 3)
            and regs[regmap.IR_STATUS] < len(status_names.STATUS_NAMES)
            and regs[regmap.IR_CP_STATE] < len(status_names.CP_NAMES))


def decode_column(regs: Sequence[int], address: int, baud: int, column_id: str | None) -> Column:
    f: dict[str, int] = {}
    for name, addr, words, enc, _desc in regmap_tables.input_map():
        if enc != "ascii" and addr + words <= len(regs):
            f[name] = regmap_tables.get_u32(regs, addr) if words == 2 else regs[addr]
    version = f["fw_version"]
    return Column(
        address=address, baud=baud, column_id=column_id,
        firmware=f"{version >> 8}.{version & 0xFF}.{f['fw_patch']}",
        phases=f["phases"], hardware_rating_a=f["hardware_rating_da"] / 10,
        cable_rating_a=f["cable_rating_da"] / 10,
        status=_name(status_names.STATUS_NAMES, f["status_code"]),
        error=_name(status_names.ERROR_NAMES, f["error_code"]),
        cp_state=_name(status_names.CP_NAMES, f["cp_state"]), offered_a=f["offered_current_da"] / 10,
        current_a=[f[f"current_l{i}_da"] / 10 for i in (1, 2, 3)],
        voltage_v=[f[f"voltage_l{i}_dv"] / 10 for i in (1, 2, 3)],
        power_w=f["power_w"], energy_wh=f["energy_wh"], failsafe_a=f["failsafe_limit_da"] / 10,
        flags=[n for bit, n in enumerate(regmap_tables.FLAG_NAMES) if f["error_flags"] & (1 << bit)],
        boots=f["boots"], uptime_s=f["uptime_s"])


def read_column(master: RtuMaster, address: int, regs: Sequence[int]) -> Column:
    try:
        words = master.read(address, 4, regmap.IR_COLUMN_ID, regmap.COLUMN_ID_WORDS, attempts=2)
        column_id: str | None = regmap_tables.get_ascii(words, 0, regmap.COLUMN_ID_WORDS)
    except DeviceException:
        column_id = None  # older firmware: no column id registers
    return decode_column(regs, address, master.baud, column_id)


def _f32(regs: Sequence[int], at: int) -> float:
    value: float = struct.unpack(">f", struct.pack(">HH", regs[at], regs[at + 1]))[0]
    return round(value, 3)


def read_meter(master: RtuMaster, address: int) -> Meter | None:
    """An SDM meter's readings, or None when the device does not serve the SDM map. An
    SDM120 refuses reads that span the holes in its map; an SDM630 answers them."""
    try:
        master.read(address, sdm.FC_READ_INPUT, sdm.REG_VOLTAGE[0], 2, attempts=2)
    except DeviceException:
        return None
    try:
        master.read(address, sdm.FC_READ_INPUT, sdm.REG_VOLTAGE[1], 2, attempts=2)
        kind = sdm.SDM630
    except DeviceException:
        kind = sdm.SDM120
    regs: dict[int, int] = {}
    for start, count in sdm.BLOCKS[kind]:
        for i, word in enumerate(master.read(address, sdm.FC_READ_INPUT, start, count, attempts=2)):
            regs[start + i] = word
    fields = sdm.FIELDS[kind]

    def value(field_id: int) -> float:
        at = fields[field_id]
        return _f32([regs.get(at, 0), regs.get(at + 1, 0)], 0) if at >= 0 else 0.0

    phases = sdm.PHASES[kind]
    power = value(sdm.F_PTOTAL) if fields[sdm.F_PTOTAL] >= 0 else value(sdm.F_P1)
    return Meter(address=address, baud=master.baud, type=kind,
                 voltage_v=[value(sdm.F_V1 + i) for i in range(phases)],
                 current_a=[value(sdm.F_I1 + i) for i in range(phases)],
                 power_w=power, frequency_hz=value(sdm.F_FREQ),
                 import_kwh=value(sdm.F_IMPORT), export_kwh=value(sdm.F_EXPORT))


def probe(master: RtuMaster, address: int) -> Column | Meter | Other | None:
    """What answers at `address` at the present baud rate; None for silence. Garbled
    replies come back as an Other with kind "garbled"."""
    try:
        try:
            regs = master.read(address, 4, 0, COLUMN_IMAGE_WORDS)
        except DeviceException:
            regs = None
        if regs is not None and looks_like_column(regs, address):
            return read_column(master, address, regs)
        meter = read_meter(master, address)
        if meter is not None:
            return meter
        return Other(address, master.baud, "answers Modbus, but is neither a column nor an SDM meter")
    except NoAnswer:
        return None
    except Garbled as exc:
        return Other(address, master.baud, f"garbled reply ({exc}): two devices on one address, "
                                           f"or noise on the bus", kind="garbled")


def scan(master: RtuMaster, port: str, bauds: Sequence[int], first: int, last: int, *,
         progress: bool = False) -> ScanResult:
    result = ScanResult(port, list(bauds), first, last)
    for baud in bauds:
        master.set_baud(baud)
        for address in range(first, last + 1):
            if progress:
                print(f"\rscanning {baud} baud, address {address} of {first}..{last} ",
                      end="", file=sys.stderr, flush=True)
            found = probe(master, address)
            if isinstance(found, Column):
                result.columns.append(found)
            elif isinstance(found, Meter):
                result.meters.append(found)
            elif isinstance(found, Other):
                (result.garbled if found.kind == "garbled" else result.others).append(found)
    if progress:
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
    return result


# -- moving a column -----------------------------------------------------------------------
@dataclass
class Moved:
    column_id: str | None
    old_address: int
    new_address: int
    baud: int
    firmware: str


def _describe(found: Column | Meter | Other) -> str:
    if isinstance(found, Column):
        return f"column {found.column_id or '(no id)'}"
    if isinstance(found, Meter):
        return f"an {found.type.upper()} meter"
    return "a device" if found.kind == "other" else "garbled replies (two devices on one address?)"


def find_column(master: RtuMaster, address: int, bauds: Sequence[int]) -> Column:
    seen: list[str] = []
    for baud in bauds:
        master.set_baud(baud)
        found = probe(master, address)
        if isinstance(found, Column):
            return found
        if isinstance(found, Other) and found.kind == "garbled":
            raise CommissionError(f"the replies at bus address {address} ({baud} baud) are garbled: "
                                  f"{found.detail}; if two columns share the address, power one down "
                                  f"or disconnect it, move the other, then reconnect")
        if found is not None:
            seen.append(f"{_describe(found)} at {baud} baud")
    rates = ", ".join(str(b) for b in bauds)
    if seen:
        raise CommissionError(f"bus address {address} is not a column: {'; '.join(seen)}")
    raise CommissionError(f"no column answers at bus address {address} on {master.ser.port} "
                          f"({rates} baud): check the address, the baud rate (--baud), the wiring "
                          f"(A to A, B to B, GND) and that the column is powered")


def set_address(master: RtuMaster, old: int, new: int, bauds: Sequence[int]) -> Moved:
    column = find_column(master, old, bauds)
    taken = probe(master, new)
    if taken is not None:
        raise CommissionError(f"bus address {new} is taken by {_describe(taken)} at {master.baud} baud: "
                              f"pick a free one (scan shows which)")
    try:
        master.write(old, regmap.HR_NEW_ADDRESS, [new, regmap.address_confirm(old, new)], SAVE_ALLOWANCE_S)
    except DeviceException as exc:
        if exc.code == 2:
            raise CommissionError(f"column {column.column_id or old} (firmware {column.firmware}) cannot "
                                  f"change its address over the bus: reflash it with the new bus_address "
                                  f"(python -m tools.flash)", EXIT_FAILED) from None
        if exc.code == 4:
            raise CommissionError(f"column {column.column_id or old} refused the move (exception 04): its "
                                  f"config is broken or could not be written; nothing was changed",
                                  EXIT_FAILED) from None
        raise CommissionError(f"column {column.column_id or old} refused the move (exception "
                              f"{exc.code:02d}): its config would not validate with bus_address {new}; "
                              f"nothing was changed", EXIT_FAILED) from None
    except (NoAnswer, Garbled):
        pass  # the reply may be lost while the move went through: the check below tells
    deadline = time.monotonic() + 3.0
    while True:
        found = probe(master, new)
        if isinstance(found, Column) and found.column_id == column.column_id:
            return Moved(column.column_id, old, new, master.baud, column.firmware)
        if time.monotonic() > deadline:
            where = "still answers at" if isinstance(probe(master, old), Column) else "is silent at"
            raise CommissionError(f"column {column.column_id or old} does not answer at its new address "
                                  f"{new} and {where} {old}: scan the bus to see where it is",
                                  EXIT_FAILED)
        time.sleep(0.1)


# -- output --------------------------------------------------------------------------------
def _phases(values: Sequence[float], fmt: str) -> str:
    return "/".join(format(v, fmt) for v in values)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in (header, *rows)]


def render_scan(result: ScanResult, elapsed_s: float, requests: int) -> str:
    rates = ", ".join(str(b) for b in result.bauds)
    lines = [f"scanned {result.port}: {rates} baud, addresses {result.first}..{result.last} "
             f"({requests} requests, {elapsed_s:.1f} s)"]
    if result.columns:
        lines += ["", "COLUMNS"]
        lines += _table(("addr", "baud", "column id", "firmware", "phases", "rating A", "cable A", "status",
                         "offered A", "current A", "energy kWh", "flags"),
                        [(str(c.address), str(c.baud), c.column_id or "(no id)", c.firmware, str(c.phases),
                          f"{c.hardware_rating_a:g}", f"{c.cable_rating_a:g}" if c.cable_rating_a else "-",
                          c.status if c.error == "NoError" else f"{c.status} ({c.error})",
                          f"{c.offered_a:g}", _phases(c.current_a[:c.phases or 3], ".1f"),
                          f"{c.energy_wh / 1000:.3f}",
                          ",".join(c.flags) or "-") for c in result.columns])
    if result.meters:
        lines += ["", "METERS"]
        lines += _table(("addr", "baud", "type", "voltage V", "current A", "power W", "freq Hz",
                         "import kWh", "export kWh"),
                        [(str(m.address), str(m.baud), m.type, _phases(m.voltage_v, ".1f"),
                          _phases(m.current_a, ".2f"), f"{m.power_w:.0f}", f"{m.frequency_hz:.2f}",
                          f"{m.import_kwh:.3f}", f"{m.export_kwh:.3f}") for m in result.meters])
    if result.others or result.garbled:
        lines += ["", "OTHER ANSWERS"]
        lines += [f"address {o.address} at {o.baud} baud: {o.detail}"
                  for o in (*result.others, *result.garbled)]
    lines += ["", f"found {len(result.columns)} column(s), {len(result.meters)} meter(s)"
                  + (f", {len(result.others)} other device(s)" if result.others else "")
                  + (f"; {len(result.garbled)} address(es) with garbled replies" if result.garbled else "")]
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:   # one line, not the usage block
        self.exit(EXIT_REFUSED, f"commission: {message} (see {self.prog} --help)\n")


def _bauds(text: str) -> list[int]:
    if text == "all":
        return list(fw_config.BAUDS)
    try:
        bauds = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of baud rates like 19200,9600") from None
    bad = [b for b in bauds if b not in fw_config.BAUDS]
    if bad or not bauds:
        raise argparse.ArgumentTypeError(f"baud rates must be among {', '.join(map(str, fw_config.BAUDS))}")
    return bauds


def _baud(text: str) -> int:
    bauds = _bauds(text)
    if len(bauds) != 1:
        raise argparse.ArgumentTypeError("give one baud rate")
    return bauds[0]


def _address(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= MAX_ADDRESS:
        raise argparse.ArgumentTypeError(f"{text} is not a bus address (1..{MAX_ADDRESS})")
    return value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.01 <= value <= 10:
        raise argparse.ArgumentTypeError(f"{text} is not a timeout in seconds (0.01..10)")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    s = sub.add_parser("scan", help="list the columns and meters answering on the bus",
                       description="Ask every address at each baud rate; print the columns and meters that "
                                   "answer. Exit 0 when something answered, 2 when nothing did.")
    s.add_argument("port", help="the USB–RS-485 adapter (e.g. /dev/ttyUSB0, COM5)")
    s.add_argument("--bauds", type=_bauds, default=list(DEFAULT_BAUDS), metavar="B1,B2|all",
                   help="baud rates to try, in order (default %s; all = %s)"
                        % (",".join(map(str, DEFAULT_BAUDS)), ",".join(map(str, fw_config.BAUDS))))
    s.add_argument("--first", type=_address, default=1, metavar="A", help="first address (default 1)")
    s.add_argument("--last", type=_address, default=MAX_ADDRESS, metavar="A",
                   help=f"last address (default {MAX_ADDRESS})")
    m = sub.add_parser("set-address", help="move a column to another bus address",
                       description="Move the column at --from to --to: checks that --to is free, writes the "
                                   "new address with its confirm value, and verifies the column answers "
                                   "there. The column saves the new bus_address in its column.json.")
    m.add_argument("port", help="the USB–RS-485 adapter (e.g. /dev/ttyUSB0, COM5)")
    m.add_argument("--from", dest="old", type=_address, required=True, metavar="A",
                   help="the column's present bus address")
    m.add_argument("--to", dest="new", type=_address, required=True, metavar="B", help="its new bus address")
    m.add_argument("--baud", type=_baud, metavar="N",
                   help="the bus's baud rate (default: try %s)" % ",".join(map(str, DEFAULT_BAUDS)))
    for cmd in (s, m):
        cmd.add_argument("--parity", choices=("N", "E", "O"), default="N",
                         help="the bus's parity, as in the gateway's [buses] section (default N; columns "
                              "use N)")
        cmd.add_argument("--stopbits", type=int, choices=(1, 2), default=1, help="default 1")
        cmd.add_argument("--timeout", type=_timeout, default=0.2, metavar="S",
                         help="how long a device may take to start answering (default 0.2 s; "
                              "raise it for slow meters)")
        cmd.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    if args.command == "scan" and args.first > args.last:
        raise CommissionError(f"--first {args.first} is above --last {args.last}")
    if args.command == "set-address" and args.old == args.new:
        raise CommissionError(f"--from and --to are both {args.old}: nothing to move")
    ser = open_port(args.port, args.parity, args.stopbits)
    try:
        master = RtuMaster(ser, args.timeout)
        if args.command == "scan":
            return _run_scan(master, args)
        return _run_move(master, args)
    finally:
        ser.close()


def _run_scan(master: RtuMaster, args: argparse.Namespace) -> int:
    start = time.monotonic()
    result = scan(master, args.port, args.bauds, args.first, args.last,
                  progress=not args.json and sys.stderr.isatty())
    elapsed = time.monotonic() - start
    if result.found == 0 and not result.garbled:
        rates = ", ".join(str(b) for b in args.bauds)
        raise CommissionError(f"no device answered on {args.port} ({rates} baud, addresses "
                              f"{args.first}..{args.last}, {args.timeout:g} s each): check the wiring "
                              f"(A to A, B to B, GND), the termination, the baud rates (--bauds all) "
                              f"and that the devices are powered")
    if args.json:
        print(json.dumps(asdict(result) | {"requests": master.requests, "elapsed_s": round(elapsed, 2)},
                         indent=2))
    else:
        print(render_scan(result, elapsed, master.requests))
    if result.found == 0:
        print("commission: only garbled replies: two devices on one address, a wrong baud rate or noise",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


def _run_move(master: RtuMaster, args: argparse.Namespace) -> int:
    bauds = [args.baud] if args.baud else list(DEFAULT_BAUDS)
    moved = set_address(master, args.old, args.new, bauds)
    if args.json:
        print(json.dumps(asdict(moved) | {"verified": True}, indent=2))
    else:
        print(f"moved column {moved.column_id or '(no id)'} from bus address {moved.old_address} to "
              f"{moved.new_address} ({moved.baud} baud): it answers there and saved bus_address "
              f"{moved.new_address} in its column.json")
        print(f"next: set address = {moved.new_address} in this column's [[columns]] entry of the gateway's "
              f"site file, then restart the gateway")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except CommissionError as exc:
        print(f"commission: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("commission: interrupted", file=sys.stderr)
        return 130
    except (serial.SerialException, OSError) as exc:
        print(f"commission: the port failed: {exc} (adapter unplugged?)", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # never a traceback in front of a technician
        print(f"commission: internal error: {type(exc).__name__}: {exc} (please report this)",
              file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
