"""`python -m tools.dno` end to end: a real mosquitto with the shipped control-room ACL, the real
gateway service (`python -m gateway run`) with two CPython virtual columns (the firmware app on
Modbus TCP, cars charging at 5 A), and the console as a subprocess, as an engineer runs it.

The broker has three listeners: "auth" (password + the ACL rendered from
deploy/mosquitto/control-room/acl-*.template: the gateway may answer only under its site's
ack/, the DNO user may only command and read), "tls" (client certificates) and nothing on a
free port for the unreachable case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from gateway.north import topics
from hil.rig.broker import Broker, Listener
from hil.rig.certs import Pki, make_pki
from hil.rig.ports import free_port
from hil.rig.vcolumn import VirtualColumn
from tests.gateway.svc_rig import (
    KEY_ID,
    GatewayProcess,
    new_key,
    offered_da,
    toml_text,
    wait_until,
    write_secrets,
)
from tools import dno_view

REPO = Path(__file__).resolve().parents[2]
SITE = "dno-site"
DNO_USER = "dno-ops"
VIEWER = "dno-viewer"          # may read every site, may not command
LOCAL = "127.0.0.1"
COLUMN_BASE: dict[str, Any] = {
    "phases": 3, "hardware_rating_a": 32, "installation_rating_a": 32, "failsafe_a": 6,
    "meter": {"type": "sdm630", "address": 1, "baud": 9600},
    "heartbeat_timeout_s": 10, "min_pause_s": 0, "pwm_min_change_interval_s": 0,
}
COLUMNS = ("col-a", "col-b")
CAPACITY_A = 40                # two sessions share it: 20 A each at the start


def _acl() -> str:
    folder = REPO / "deploy" / "mosquitto" / "control-room"
    site = (folder / "acl-site.template").read_text().replace("${SITE_ID}", SITE)
    dno = (folder / "acl-dno.template").read_text().replace("${DNO_USER}", DNO_USER)
    return site + "\n" + dno + f"\nuser {VIEWER}\ntopic read evedge/v1/+/#\n"


def _secret_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@dataclass
class Site:
    broker: Broker
    pki: Pki
    columns: list[VirtualColumn]
    gateway: GatewayProcess
    folder: Path
    key_file: Path
    password_file: Path

    def auth_args(self) -> list[str]:
        return ["--broker", f"{LOCAL}:{self.broker.port('auth')}", "--username", DNO_USER,
                "--password-file", str(self.password_file)]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("dno")
    pki = make_pki(tmp / "pki", ("dno-tls",))
    passwords = {f"gateway-{SITE}": "gw-" + new_key().hex()[:16], DNO_USER: "dno-" + new_key().hex()[:16],
                 VIEWER: "viewer-" + new_key().hex()[:16]}
    with ExitStack() as stack:
        broker = stack.enter_context(Broker([Listener("auth", users=passwords, acl=_acl()),
                                             Listener("tls", tls=pki.server)], workdir=tmp / "broker"))
        ports = {cid: free_port() for cid in COLUMNS}
        cols = []
        for n, cid in enumerate(COLUMNS, 1):
            cfg = {**COLUMN_BASE, "column_id": cid, "bus_address": n,
                   "link": {"mode": "modbus-tcp", "tcp_port": ports[cid], "host": LOCAL}}
            cols.append(stack.enter_context(VirtualColumn("cpython", tmp / cid, cfg)))
        for col in cols:     # a car plugged in and asking for current, drawing 5 A per phase
            col.meter.set_load([0.0, 0.0, 0.0])
            col.board(cp_mv=9000, diode=1, pp_ohms=220)
        time.sleep(0.3)
        for col in cols:
            col.board(cp_mv=6000)
            col.meter.set_load([5.0, 5.0, 5.0])
        key = new_key()
        write_secrets(tmp, key, password=passwords[f"gateway-{SITE}"])
        doc = {
            "site": {"id": SITE, "capacity_a": CAPACITY_A, "dno_failsafe_a": 20},
            "allocation": {"increase_delay_max_s": 0, "min_pause_s": 0, "rotation_s": 3600,
                           "reclaim_settle_s": 3600},
            "columns": [{"id": cid, "hardware_a": 32, "link": "modbus-tcp", "host": LOCAL, "port": ports[cid],
                         "unit": n} for n, cid in enumerate(COLUMNS, 1)],
            "mqtt": {"host": broker.host, "port": broker.port("auth"), "client_id": f"gateway-{SITE}",
                     "username": f"gateway-{SITE}", "password_file": "secrets/mqtt-password",
                     "outbox": {"path": str(tmp / "outbox.sqlite3")}},
            "dno": {"keys_file": "secrets/dno-keys", "audit_path": str(tmp / "audit.jsonl")},
            "gateway": {"control_interval_s": 0.5, "telemetry_interval_s": 1, "poll_period_s": 0.5,
                        "heartbeat_period_s": 2, "limit_validity_s": 60},
        }
        (tmp / "site.toml").write_text(toml_text(doc))
        gateway = GatewayProcess(tmp / "site.toml", tmp / "gateway.log")
        stack.callback(gateway.close)
        key_file = _secret_file(tmp / "dno-keys", f"{KEY_ID}:{key.hex()}\n")
        password_file = _secret_file(tmp / "dno-password", passwords[DNO_USER] + "\n")
        _secret_file(tmp / "viewer-password", passwords[VIEWER] + "\n")
        shared = {"col-a": 200, "col-b": 200}
        wait_until("the gateway sharing the site", lambda: offered_da(cols) == shared, 20)
        try:
            yield Site(broker, pki, cols, gateway, tmp, key_file, password_file)
        finally:
            for line in gateway.log_path.read_text(errors="replace").splitlines()[-20:]:
                print(line)


def dno(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "tools.dno", *args], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str, quiet: bool = True) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dno: "), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == "" or not quiet, result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- without a site --------------------------------------------------------------------------

def test_help_names_every_command_and_option() -> None:
    top = dno("--help")
    assert top.returncode == 0
    for word in ("watch", "limit", "failsafe", "exit status", "docs/dno-console.md"):
        assert word in top.stdout
    limit = dno("limit", "--help")
    assert limit.returncode == 0
    for option in ("--site", "--column", "--amps", "--kw", "--validity", "--key-file", "--key-id", "--settle",
                   "--broker", "--tls-ca", "--tls-cert", "--tls-key", "--username", "--password-file",
                   "--mqtt"):
        assert option in limit.stdout
    assert "--password " not in limit.stdout   # never a password on the command line
    usage = dno("limit", "--site", SITE, "--amps", "10", "--kw", "7", "--validity", "60", "--key-file", "k")
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1


def test_a_bad_key_file_is_one_line_before_any_connection(tmp_path: Path) -> None:
    loose = tmp_path / "keys"
    loose.write_text(f"{KEY_ID}:{new_key().hex()}\n")
    loose.chmod(0o644)
    common = ["--site", SITE, "--amps", "10", "--validity", "60", "--broker", f"{LOCAL}:{free_port()}"]
    one_line_error(dno("limit", *common, "--key-file", str(loose)), "chmod 600")
    loose.chmod(0o600)
    one_line_error(dno("limit", *common, "--key-file", str(loose), "--key-id", "other"), "no key 'other'")
    one_line_error(dno("limit", *common, "--key-file", str(tmp_path / "missing")), "No such file")


def test_the_measured_result_is_judged_against_the_limit() -> None:
    """The verdict logic on telemetry as the gateway publishes it: above the limit is said."""
    view = dno_view.SiteView(SITE)
    col = {"ts_ms": 1767225600000, "column_id": "c01", "current_a": [12.0, 11.8, 11.9],
           "voltage_v": [230] * 3, "power_w": 8200.0, "energy_wh": 1000.0, "offered_a": 8.0,
           "applied_limit_a": 8.0, "limit_source": "gateway", "state": "C", "status": "Charging", "seq": 5}
    site_tele = {"ts_ms": 1767225600000, "power_w": 8200.0, "current_a": [12.0, 11.8, 11.9], "limit_a": 8.0,
                 "limit_source": "dno", "limit_valid_until_ms": 1767226500000, "active_sessions": 1, "seq": 6}
    assert view.take(topics.column_telemetry(SITE, "c01"), col, at=10.0)
    assert not view.take(topics.column_telemetry(SITE, "c01"), col, at=10.5)    # a duplicate seq
    assert view.take(topics.site_telemetry(SITE), site_tele, at=10.0)
    over = dno_view.measured_result(view, since=9.0, limit_a=8.0)
    assert over.within is False and over.detail["columns"] == {"c01": False}
    assert "site ABOVE the limit: highest phase 12.0 A > 8.0 A" in over.lines[-1]
    stale = dno_view.measured_result(view, since=11.0, limit_a=8.0)
    assert stale.within is None and "no telemetry" in stale.lines[0]


# -- against the site ------------------------------------------------------------------------

def test_a_site_limit_is_acked_and_the_measured_result_printed(site: Site) -> None:
    t0 = time.monotonic()
    result = dno("limit", *site.auth_args(), "--site", SITE, "--amps", "20", "--validity", "5m",
                 "--key-file", str(site.key_file), "--settle", "3")
    elapsed = time.monotonic() - t0
    assert result.returncode == 0, (result.stdout, result.stderr)
    out = result.stdout
    assert "ack: accepted (ok)" in out
    assert "applied limit: 20.0 A per phase" in out
    # Two sessions share the 20 A: 10 A offered each, the cars draw 5 A.
    for cid in COLUMNS:
        row = next(line for line in out.splitlines() if line.strip().startswith(cid))
        assert row.split()[1:] == ["C", "10.0", "A", "5.0/5.0/5.0", "A", "10.0", "A", "ok"], row
    assert "current 10.0/10.0/10.0 A of 20.0 A (limit dno" in out
    assert "site within the limit: highest phase 10.0 A <= 20.0 A" in out
    assert elapsed < 3 + 12, elapsed    # the ack within a few seconds, then the settle time
    assert offered_da(site.columns) == {"col-a": 100, "col-b": 100}   # what the pilots really offer
    assert result.stderr == ""


def test_a_column_limit_in_kw_as_json(site: Site) -> None:
    result = dno("limit", *site.auth_args(), "--site", SITE, "--column", "col-b", "--kw", "5.52",
                 "--validity", "300", "--key-file", str(site.key_file), "--key-id", KEY_ID, "--settle", "2.5",
                 "--json")
    assert result.returncode == 0, (result.stdout, result.stderr)
    report = json.loads(result.stdout)
    assert report["topic"] == topics.cmd_column_limit(SITE, "col-b")
    # MQTT 5: the ack came on the console's own response topic, under the site's ack/ (the ACL).
    assert report["ack_topic"].startswith(topics.ack(SITE) + "/dno-console-")
    assert report["command"]["limit_kw"] == 5.52 and "sig" not in report["command"]
    # 5.52 kW on three phases at 230 V: 8 A.
    assert (report["ack"]["result"], report["ack"]["applied_limit_a"]) == ("accepted", 8)
    assert report["measured"]["within"] is True
    assert report["measured"]["columns"]["col-b"] is True
    wait_until("col-b at 8 A", lambda: offered_da(site.columns)["col-b"] == 80, 3)


def test_mqtt_3_1_1_gets_its_ack_on_the_ack_topic(site: Site) -> None:
    result = dno("limit", *site.auth_args(), "--mqtt", "3.1.1", "--site", SITE, "--amps", "20",
                 "--validity", "300", "--key-file", str(site.key_file), "--settle", "0")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "ack: accepted (ok)" in result.stdout and "applied limit: 20.0 A" in result.stdout


def test_a_user_the_broker_does_not_let_command_is_told_so(site: Site) -> None:
    viewer = ["--broker", f"{LOCAL}:{site.broker.port('auth')}", "--username", VIEWER,
              "--password-file", str(site.folder / "viewer-password")]
    one_line_error(dno("limit", *viewer, "--site", SITE, "--amps", "6", "--validity", "60",
                       "--key-file", str(site.key_file)), "the broker refused the command", "Not authorized",
                   quiet=False)


def test_no_ack_is_a_clear_message(site: Site) -> None:
    """A site whose state says online but whose gateway does not answer (a stale retained state)."""
    client = site.pki.clients["dno-tls"]
    ghost = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    ghost.tls_set(ca_certs=str(site.pki.cafile), certfile=str(client.certfile), keyfile=str(client.keyfile))
    ghost.connect(LOCAL, site.broker.port("tls"))
    ghost.loop_start()
    state = topics.gateway_state("ghost")
    try:
        online = b'{"state": "online", "ts_ms": 1767225600000}'
        ghost.publish(state, online, qos=1, retain=True).wait_for_publish(5)
        result = dno("limit", *site.auth_args(), "--site", "ghost", "--amps", "6", "--validity", "60",
                     "--key-file", str(site.key_file), "--ack-timeout", "1.5")
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert result.stderr.strip().splitlines() == [
            "dno: no ack from site 'ghost' within 1.5 s: is its gateway online and subscribed "
            "(gateway/state)? The command may still apply; watch the site"]
    finally:
        ghost.publish(state, b"", qos=1, retain=True).wait_for_publish(5)
        ghost.loop_stop()
        ghost.disconnect()


def test_a_wrong_key_gets_the_rejection_reason(site: Site) -> None:
    wrong = _secret_file(site.folder / "wrong-keys",
                         f"{KEY_ID}:{new_key().hex()}\nspare-1:{new_key().hex()}\n")
    before = offered_da(site.columns)
    result = dno("limit", *site.auth_args(), "--site", SITE, "--amps", "6", "--validity", "60",
                 "--key-file", str(wrong), "--key-id", KEY_ID)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "ack: REJECTED: bad_signature" in result.stdout
    assert "wrong key for this key id" in result.stdout
    result = dno("limit", *site.auth_args(), "--site", SITE, "--amps", "6", "--validity", "60",
                 "--key-file", str(wrong), "--key-id", "spare-1")
    assert result.returncode == 1 and "ack: REJECTED: unknown_key" in result.stdout
    assert offered_da(site.columns) == before


def test_watch_prints_live_lines_and_json(site: Site) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "tools.dno", "watch", *site.auth_args(), "--site", SITE]
    with subprocess.Popen([*cmd, "--duration", "2.5"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as text_proc, \
            subprocess.Popen([*cmd, "--json", "--once"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) as json_proc:
        try:
            text_out, text_err = text_proc.communicate(timeout=15)
            json_out, json_err = json_proc.communicate(timeout=15)
        finally:
            for proc in (text_proc, json_proc):
                if proc.poll() is None:
                    proc.kill()
    assert text_proc.returncode == 0 and text_err == "", text_err
    lines = text_out.splitlines()
    assert lines[0].split()[1:] == ["gateway", "online"]               # the retained state first
    assert any(" col-a      status Charging C NoError online" in line for line in lines), lines
    site_lines = [line for line in lines if line.split()[1] == "site"]
    assert len(site_lines) >= 2, lines                                  # telemetry every second
    assert " limit 20.0 A dno until " in site_lines[-1] and "2 sessions" in site_lines[-1]
    for cid in COLUMNS:
        tele = [line for line in lines if line.split()[1] == cid and "offered" in line]
        assert tele and "measured 5.0/5.0/5.0 A" in tele[-1], lines
    assert json_proc.returncode == 0, json_err
    messages = [json.loads(line) for line in json_out.splitlines()]
    assert messages[0]["topic"] == topics.gateway_state(SITE) and messages[0]["retain"] is True
    assert messages[-1]["topic"] == topics.site_telemetry(SITE)         # --once: one round, then stop
    assert messages[-1]["payload"]["limit_source"] == "dno"


def test_refused_credentials_unreachable_and_unknown_site_are_one_line(site: Site, tmp_path: Path) -> None:
    wrong = _secret_file(tmp_path / "pw", "not-the-password\n")
    auth = f"{LOCAL}:{site.broker.port('auth')}"
    refused = one_line_error(dno("watch", "--site", SITE, "--broker", auth, "--username", DNO_USER,
                                 "--password-file", str(wrong), "--duration", "1"),
                             "refused the connection", "--password-file")
    assert "Not authorized" in refused or "Bad user name or password" in refused
    one_line_error(dno("watch", "--site", SITE, "--broker", f"{LOCAL}:{free_port()}", "--duration", "1"),
                   "cannot reach the broker", "connection refused")
    one_line_error(dno("watch", *site.auth_args(), "--site", "no-such-site", "--duration", "1"),
                   "unknown site 'no-such-site'")
    one_line_error(dno("limit", *site.auth_args(), "--site", "no-such-site", "--amps", "6",
                       "--validity", "60", "--key-file", str(site.key_file)), "unknown site")


def test_tls_with_a_client_certificate_and_the_tls_failures(site: Site, tmp_path: Path) -> None:
    tls = f"{LOCAL}:{site.broker.port('tls')}"
    client = site.pki.clients["dno-tls"]
    good = dno("watch", "--site", SITE, "--broker", tls, "--tls-ca", str(site.pki.cafile),
               "--tls-cert", str(client.certfile), "--tls-key", str(client.keyfile), "--once", "--json")
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout.splitlines()[-1])["topic"] == topics.site_telemetry(SITE)
    other_ca = make_pki(tmp_path / "other", ()).cafile
    one_line_error(dno("watch", "--site", SITE, "--broker", tls, "--tls-ca", str(other_ca), "--tls-cert",
                       str(client.certfile), "--tls-key", str(client.keyfile)), "TLS", "not trusted")
    # No client certificate: the broker ends the handshake (how depends on timing); either way it says so.
    one_line_error(dno("watch", "--site", SITE, "--broker", tls, "--tls-ca", str(site.pki.cafile)),
                   "client certificate", "give --tls-cert")
    one_line_error(dno("watch", "--site", SITE, "--broker", tls), "closed the connection")


def test_a_stopped_site_is_shown_offline_and_not_commanded(site: Site) -> None:
    """Last: stops the gateway. Its retained state says offline, and a limit is not sent."""
    assert site.gateway.terminate(timeout_s=20) == 0
    watch = dno("watch", *site.auth_args(), "--site", SITE, "--duration", "0.5")
    assert watch.returncode == 0 and watch.stdout.splitlines()[0].split()[1:] == ["gateway", "offline",
                                                                                   "(shutdown)"]
    one_line_error(dno("limit", *site.auth_args(), "--site", SITE, "--amps", "6", "--validity", "60",
                       "--key-file", str(site.key_file)), f"site '{SITE}' is offline since", "(shutdown)")
