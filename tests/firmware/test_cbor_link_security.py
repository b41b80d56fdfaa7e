# Who may change a column over the CBOR link (docs/firmware.md, "Who may change what"), on
# the real App and its CborLink on the virtual board, with wire frames in and out:
# ChangeConfiguration and Reset only from the peer that accepted this connection's
# BootNotification (else SecurityError); only four keys, validated, never a rating; a
# column with a broken config takes no config write and no reset. Runs under CPython and
# MicroPython (test_modbus_link_security.py: the same rules on the Modbus link).
import json

import machine
from fwtest import IS_MICROPYTHON

from firmware import app as firmware_app
from firmware import cbor
from firmware.frames import FrameReader, encode_frame

CONFIG = {
    "column_id": "sec-col", "bus_address": 4, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 25, "failsafe_a": 10,
    "meter": {"type": "sdm630"}, "link": {"mode": "cbor-tcp", "tcp_port": 7000},
}
ACCEPTED = {"status": "Accepted", "heartbeatIntervalS": 60, "currentTimeMs": 0}


def _app(config=None):
    machine.board.clear()
    with open("column.json", "w") as f:
        f.write(json.dumps(config or CONFIG))
    return firmware_app.App(machine, "column.json", use_wdt=False, log=lambda *a: None)


def _file():
    with open("column.json") as f:
        return f.read()


class Gateway:
    """The gateway's end of a CborLink, as frames: what the column wrote comes back decoded."""

    def __init__(self, app):
        from firmware.gw_cbor import CborLink  # after the App, as a board loads it

        self.sent = []
        self.link = CborLink(app)
        self.link.connected(self.sent.append, 0)
        self.reader = FrameReader()
        self.next_id = 100

    def frames(self):
        out = []
        for data in self.sent:
            self.reader.feed(data)
        self.sent.clear()
        while True:
            frame = self.reader.next_frame()
            if frame is None:
                return out
            out.append(cbor.loads(bytes(frame)))

    def boot(self, answer):
        """Let the column send its BootNotification and answer it."""
        self.link.refresh(0)
        boot = [f for f in self.frames() if f[0] == 2 and f[2] == "BootNotification"]
        assert len(boot) == 1, boot
        self.link.on_bytes(encode_frame(cbor.dumps([3, boot[0][1], answer])), 1)

    def call(self, action, payload):
        """The column's answer: [3, id, result] or [4, id, code, text, details]."""
        self.next_id += 1
        self.link.on_bytes(encode_frame(cbor.dumps([2, self.next_id, action, payload])), 2)
        answers = [f for f in self.frames() if f[0] in (3, 4) and f[1] == self.next_id]
        assert len(answers) == 1, answers
        return answers[0]


def test_cbor_config_writes_and_resets_wait_for_an_accepted_boot():
    app = _app()
    gw = Gateway(app)
    text = _file()
    for action, payload in (("ChangeConfiguration", {"key": "failsafe_a", "value": 8}),
                            ("Reset", {"type": "Hard"})):
        answer = gw.call(action, payload)
        assert answer[0] == 4 and answer[2] == "SecurityError", answer
        assert answer[3] == "BootNotification not accepted on this link", answer
    assert _file() == text and not app._reset_requested
    assert app.ctl.limits.failsafe_da == 100
    gw.boot({"status": "Rejected", "heartbeatIntervalS": 60, "currentTimeMs": 0})
    assert gw.call("Reset", {"type": "Soft"})[2] == "SecurityError"  # a refused boot: no trust
    assert not app._reset_requested
    # Reads are served to anyone on the link.
    assert gw.call("GetConfiguration", {"keys": ["failsafe_a"]})[2] == {
        "configuration": {"failsafe_a": 10}, "unknownKeys": []}


def test_cbor_after_an_accepted_boot_only_the_four_keys_change_and_never_past_the_ratings():
    app = _app()
    gw = Gateway(app)
    gw.boot(ACCEPTED)
    answer = gw.call("ChangeConfiguration", {"key": "failsafe_a", "value": 8})
    assert answer[2] == {"status": "Accepted"}, answer
    assert json.loads(_file())["failsafe_a"] == 8 and app.ctl.limits.failsafe_da == 80
    assert gw.call("ChangeConfiguration", {"key": "min_pause_s", "value": 120})[2] == \
        {"status": "RebootRequired"}
    text = _file()
    for key, value in (("hardware_rating_a", 80), ("installation_rating_a", 32), ("bus_address", 9),
                       ("column_id", "evil"), ("phases", 1), ("energy_quantum_wh", 1000)):
        answer = gw.call("ChangeConfiguration", {"key": key, "value": value})
        assert answer[2] == {"status": "NotSupported"}, (key, answer)
    for value in (26, 25.5, 80, 3, -1, True, "8", None, float("nan")):  # above the installation...
        answer = gw.call("ChangeConfiguration", {"key": "failsafe_a", "value": value})
        assert answer[2] == {"status": "Rejected"}, (value, answer)
    assert _file() == text and app.ctl.limits.failsafe_da == 80 and app.cfg["failsafe_a"] == 8
    assert gw.call("Reset", {"type": "Hard"})[2] == {"status": "Accepted"} and app._reset_requested


def test_cbor_config_write_rules_are_loaded_only_for_the_call():
    # A running column holds no config_runtime code: a ChangeConfiguration loads it and lets
    # it go again (on MicroPython the App's boot unloaded it with the validator), whether the
    # write is taken or refused.
    import sys

    app = _app()
    gw = Gateway(app)
    gw.boot(ACCEPTED)
    was = "firmware.config_runtime" in sys.modules
    for value, status in ((8, "Accepted"), (3, "Rejected")):
        answer = gw.call("ChangeConfiguration", {"key": "failsafe_a", "value": value})
        assert answer[2] == {"status": status}, answer
        assert ("firmware.config_runtime" in sys.modules) == was
    assert json.loads(_file())["failsafe_a"] == 8
    if IS_MICROPYTHON:
        assert not was  # the boot-time validator took it along when it was unloaded


def test_cbor_trust_ends_with_the_connection_and_with_a_new_boot():
    app = _app()
    gw = Gateway(app)
    gw.boot(ACCEPTED)
    gw.link.connected(gw.sent.append, 10)   # another gateway connection
    assert gw.call("Reset", {"type": "Soft"})[2] == "SecurityError"
    gw.boot(ACCEPTED)
    assert gw.call("TriggerMessage", {"requestedMessage": "BootNotification"})[2] == {"status": "Accepted"}
    gw.link.refresh(20)                     # the column boots again: trust waits for the answer
    assert gw.call("ChangeConfiguration", {"key": "failsafe_a", "value": 6})[2] == "SecurityError"
    assert not app._reset_requested and json.loads(_file())["failsafe_a"] == 10


def test_cbor_a_column_with_a_broken_config_takes_no_config_write_and_no_reset():
    app = _app(dict(CONFIG, installation_rating_a=40))  # above the hardware rating
    assert list(app.config_errors) == ["installation_rating_a: 40 is above hardware_rating_a 32"]
    gw = Gateway(app)
    gw.boot(ACCEPTED)
    text = _file()
    for action, payload in (("ChangeConfiguration", {"key": "failsafe_a", "value": 8}),
                            ("Reset", {"type": "Hard"}),
                            ("SetChargingLimit", {"limitA": 16, "validityS": 60})):
        answer = gw.call(action, payload)
        assert answer[0] == 4 and answer[2] == "GenericError", answer
        assert answer[3].startswith("column configuration invalid: installation_rating_a: 40 is above")
    assert _file() == text and not app._reset_requested
