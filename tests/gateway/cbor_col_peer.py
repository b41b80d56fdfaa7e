# A column on the CBOR message link, for the gateway's cbor_columns tests. Runs the real
# firmware.cbor_link.Link (side=FROM_COLUMN) under CPython or MicroPython:
#     cbor_col_peer.py serial /dev/pts/N [options]    the gateway has the other end of the pair
#     cbor_col_peer.py tcp PORT [options]            listens on 127.0.0.1:PORT, one gateway at a time
# options: --id COLUMN_ID  --rating A  --config-error TEXT  --meter-ms N
#
# It boots (retrying until Accepted), heartbeats at the interval the gateway gave, sends a
# StatusNotification, a StartTransaction and MeterValues every --meter-ms. Test controls
# arrive as ChangeConfiguration keys, answered first and acted on in the next loop step:
#   peer.mute         stop sending and ignore everything received (a silent column)
#   peer.garbage      send a burst of bad bytes, bad frames and bad calls (ids 900..905)
#   peer.stopSession  send StopTransaction for the running session
#   peer.rejectLimits (bool) answer SetChargingLimit with Rejected
# GetConfiguration key "peer.errors" returns {id: errorCode} of the error frames the
# gateway sent back for the burst's ids; "peer.stats" returns the peer link's counters.
import select
import socket
import sys
import termios

from firmware import cbor, messages
from firmware.cbor_link import Link
from firmware.frames import FrameReader, encode_frame

try:
    from time import sleep_ms, ticks_diff, ticks_ms
except ImportError:  # CPython
    import time

    def ticks_ms():
        return int(time.monotonic() * 1000)

    def ticks_diff(a, b):
        return a - b

    def sleep_ms(ms):
        time.sleep(ms / 1000)

_VTIME = 5
_VMIN = 6


def frame_of(obj):
    return encode_frame(cbor.dumps(obj))


def garbage_burst():
    """Bad input of every kind; 901..904 must come back as error frames, 900/905 not."""
    out = bytearray(b"\x00\xffnoise\x01\x02")                      # no SYNC at all
    bad_crc = bytearray(frame_of([2, 900, "Heartbeat", {}]))
    bad_crc[-1] ^= 0xFF
    out += bad_crc
    out += encode_frame(b"\x84\x02\x19\x03\x85\x63He")               # [2, 901, <truncated text>
    out += frame_of([2, 902, "StatusNotification", {"status": "Sleeping", "errorCode": "NoError",
                                                    "cpState": "A", "offeredA": 0,
                                                    "limitSource": "hardware"}])
    out += frame_of([2, 903, "Teleport", {}])
    out += frame_of([2, 904, "SetChargingLimit", {"limitA": 6, "validityS": 10}])
    out += frame_of([3, 905, {}])
    return bytes(out)


class Wire:
    """The byte stream: a pty path (serial) or an accepted TCP connection."""

    def __init__(self, kind, where):
        self.kind = kind
        self.poller = select.poll()
        self.conn = None
        self.server = None
        if kind == "serial":
            try:
                self.f = open(where, "r+b", buffering=0)
            except TypeError:  # MicroPython
                self.f = open(where, "r+b")
            attrs = termios.tcgetattr(self.f.fileno())
            attrs[6][_VMIN] = 0  # reads return at once, with what is there
            attrs[6][_VTIME] = 0
            termios.tcsetattr(self.f.fileno(), termios.TCSANOW, attrs)
            self.poller.register(self.f, select.POLLIN)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(socket.getaddrinfo("127.0.0.1", int(where))[0][-1])
            s.listen(1)
            s.setblocking(False)
            self.server = s
            self.poller.register(s, select.POLLIN)

    def connected(self):
        return self.kind == "serial" or self.conn is not None

    def wait(self, timeout_ms):
        """Bytes received within timeout_ms (b"" if none), or None when the peer hung up."""
        for obj, ev in self.poller.poll(timeout_ms):
            if obj is self.server or (type(obj) is int and self.server and obj == self.server.fileno()):
                conn, _addr = self.server.accept()
                if self.conn is not None:  # one gateway at a time: the newest wins
                    self.drop()
                conn.setblocking(False)
                self.conn = conn
                self.poller.register(conn, select.POLLIN)
                print("peer: connected")
                continue
            if self.kind == "serial":
                data = self.f.read(512)
                return data or b""
            if self.conn is None:
                continue
            try:
                data = self.conn.recv(512)
            except OSError:
                data = b""
            if not data or ev & (select.POLLHUP | select.POLLERR):
                self.drop()
                return None
            return data
        return b""

    def write(self, data):
        off = 0
        if self.kind == "serial":
            while off < len(data):
                off += self.f.write(data[off:]) or 0
            return
        if self.conn is None:
            raise OSError("not connected")
        while off < len(data):
            try:
                off += self.conn.send(data[off:])
            except OSError as exc:
                if exc.args and exc.args[0] == 11:  # EAGAIN: the gateway is slow, wait a little
                    sleep_ms(1)
                    continue
                self.drop()
                raise

    def drop(self):
        if self.conn is not None:
            try:
                self.poller.unregister(self.conn)
            except Exception:
                pass
            self.conn.close()
            self.conn = None
            print("peer: disconnected")


class Column:
    def __init__(self, wire, column_id, rating_a, config_error, meter_ms):
        self.wire = wire
        self.column_id = column_id
        self.rating_a = rating_a
        self.config_error = config_error
        self.meter_ms = meter_ms
        handlers = {"SetChargingLimit": self.set_limit, "GetConfiguration": self.get_config,
                    "ChangeConfiguration": self.change_config, "Reset": self.reset,
                    "TriggerMessage": self.trigger}
        self.link = Link(wire.write, handlers, 2000, 4, side=messages.FROM_COLUMN)
        self.sniffer = FrameReader()
        self.errors = {}        # burst id (str) -> error code the gateway answered
        self.todo = []          # actions to send at the next step (after any result went out)
        self.muted = False
        self.reject_limits = False
        self.offered_a = rating_a
        self.source = "hardware"
        self.energy_wh = 1000
        self.session_id = 0
        self.seq = 0
        self.reboot()

    def reboot(self):
        self.booted = False
        self.boot_pending = False
        self.next_boot = ticks_ms()
        self.hb_ms = 1000
        self.next_hb = 0
        self.next_meter = 0

    # -- calls from the gateway ------------------------------------------------------------
    def set_limit(self, p, now):
        if self.reject_limits:
            return {"status": "Rejected", "appliedA": self.offered_a}
        self.offered_a = min(p["limitA"], self.rating_a)
        self.source = "gateway" if self.offered_a < self.rating_a else "hardware"
        self.todo.append("StatusNotification")
        return {"status": "Accepted", "appliedA": self.offered_a}

    def get_config(self, p, now):
        known = {"columnId": self.column_id, "ratingA": self.rating_a, "meterMs": self.meter_ms,
                 "peer.errors": self.errors, "peer.stats": self.link.stats()}
        out = {}
        unknown = []
        for key in p.get("keys", list(known)):
            if key in known:
                out[key] = known[key]
            else:
                unknown.append(key)
        return {"configuration": out, "unknownKeys": unknown}

    def change_config(self, p, now):
        key = p["key"]
        if key in ("peer.mute", "peer.garbage", "peer.stopSession"):
            self.todo.append(key)
        elif key == "peer.rejectLimits":
            self.reject_limits = bool(p["value"])
        elif key == "ratingA" and type(p["value"]) in (int, float) and 6 <= p["value"] <= 80:
            self.rating_a = p["value"]
        else:
            return {"status": "NotSupported"}
        return {"status": "Accepted"}

    def reset(self, p, now):
        self.todo.append("reboot")
        return {"status": "Accepted"}

    def trigger(self, p, now):
        self.todo.append(p["requestedMessage"])
        return {"status": "Accepted"}

    # -- calls to the gateway --------------------------------------------------------------
    def payload(self, action):
        if action == "BootNotification":
            p = {"columnId": self.column_id, "firmwareVersion": "1.2.3", "model": "peer",
                 "phases": 3, "hardwareRatingA": self.rating_a, "busAddress": 0}
            if self.config_error:
                p["configError"] = self.config_error
            return p
        if action == "Heartbeat":
            return {}
        if action == "StatusNotification":
            faulted = bool(self.config_error)
            return {"status": "Faulted" if faulted else ("Charging" if self.session_id else "Available"),
                    "errorCode": "ConfigError" if faulted else "NoError",
                    "cpState": "C" if self.session_id else "A", "offeredA": self.offered_a,
                    "limitSource": "safety" if faulted else self.source}
        if action == "MeterValues":
            self.seq += 1
            self.energy_wh += 1
            amps = 15.8 if self.session_id else 0.0
            return {"energyWh": self.energy_wh, "sessionEnergyWh": self.energy_wh - 1000,
                    "powerW": 10950 if self.session_id else 0, "currentA": [amps, amps - 0.1, amps - 0.2],
                    "voltageV": [230.1, 229.9, 230.5], "offeredA": self.offered_a, "seq": self.seq}
        if action == "StartTransaction":
            self.session_id = 7
            return {"sessionId": 7, "meterStartWh": self.energy_wh}
        if action == "StopTransaction":
            sid = self.session_id
            self.session_id = 0
            return {"sessionId": sid, "meterStopWh": self.energy_wh, "reason": "Local"}
        return None

    def on_boot(self, answer):
        self.boot_pending = False
        if isinstance(answer, dict) and answer["status"] == "Accepted":
            self.booted = True
            self.hb_ms = answer["heartbeatIntervalS"] * 1000
            now = ticks_ms()
            self.next_hb = now + self.hb_ms
            self.next_meter = now
            if not self.config_error and not self.session_id:
                self.todo.append("StartTransaction")
            self.todo.append("StatusNotification")
            print("peer: booted")
        else:
            self.next_boot = ticks_ms() + 500

    def send(self, action, now):
        """Act on one todo item; False when the link refused the call (try again later)."""
        if action == "peer.mute":
            self.muted = True
        elif action == "peer.garbage":
            self.wire.write(garbage_burst())
        elif action == "reboot":
            self.reboot()
        elif action == "BootNotification":
            self.booted = False
            return self.boot(now)
        elif action == "peer.stopSession":
            if self.session_id:
                return self.link.call("StopTransaction", self.payload("StopTransaction"), now) is not None
        else:
            return self.link.call(action, self.payload(action), now) is not None
        return True

    def boot(self, now):
        if self.boot_pending:
            return True
        self.boot_pending = True
        if self.link.call("BootNotification", self.payload("BootNotification"), now, self.on_boot) is None:
            self.boot_pending = False
            return False
        return True

    def step(self, now):
        while self.todo and not self.muted:
            if not self.booted and self.todo[0] not in ("reboot", "BootNotification", "peer.mute"):
                break  # everything else waits for an accepted boot
            if not self.send(self.todo[0], now):
                break
            self.todo.pop(0)
        if self.muted:
            return
        if not self.booted:
            if not self.boot_pending and ticks_diff(now, self.next_boot) >= 0 and self.wire.connected():
                self.boot(now)
            return
        if ticks_diff(now, self.next_hb) >= 0 and self.link.call("Heartbeat", {}, now) is not None:
            self.next_hb = now + self.hb_ms
        if self.meter_ms and ticks_diff(now, self.next_meter) >= 0 \
                and self.link.call("MeterValues", self.payload("MeterValues"), now) is not None:
            self.next_meter = now + self.meter_ms

    def received(self, data, now):
        if self.muted:
            return
        self.sniffer.feed(data)
        while True:
            frame = self.sniffer.next_frame()
            if frame is None:
                break
            try:
                msg = cbor.loads(frame)
            except Exception:
                continue
            if type(msg) is list and len(msg) == 5 and msg[0] == messages.ERROR and 900 <= msg[1] <= 905:
                self.errors[str(msg[1])] = msg[2]
        self.link.on_bytes(data, now)


def main(argv):
    opts = {"--id": "col-1", "--rating": "16", "--config-error": "", "--meter-ms": "200"}
    i = 3
    while i < len(argv):
        opts[argv[i]] = argv[i + 1]
        i += 2
    wire = Wire(argv[1], argv[2])
    rating = float(opts["--rating"])
    col = Column(wire, opts["--id"], int(rating) if rating == int(rating) else rating,
                 opts["--config-error"], int(opts["--meter-ms"]))
    print("peer: ready")
    while True:
        data = wire.wait(10)
        now = ticks_ms()
        if data:
            col.received(data, now)
        elif data is None:
            col.link.reset()
        col.link.poll(now)
        try:
            col.step(now)
        except OSError:
            pass  # the connection went away mid-write; the next gateway gets the rest


main(sys.argv)
