"""A real mosquitto broker on loopback ports, configured from a temporary folder.

Used by the tests, the site demo and the benchmarks. Listeners are chosen per use:
plain, TLS with client certificates, and password + ACL. The broker is stopped by its
PID; nothing else is killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hil.rig.ports import LOOPBACK, free_port

INSTALL_HINT = "mosquitto is not installed: run 'sudo apt-get install mosquitto'"


def mosquitto_binary() -> str:
    """Find mosquitto; Debian installs it in /usr/sbin, which a normal user's PATH lacks."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise FileNotFoundError(INSTALL_HINT)
    return found


def mosquitto_passwd_binary() -> str:
    found = shutil.which("mosquitto_passwd") or shutil.which(
        "mosquitto_passwd", path="/usr/bin:/usr/sbin:/usr/local/bin")
    if not found:
        raise FileNotFoundError(INSTALL_HINT)
    return found


@dataclass
class TlsFiles:
    """PEM files for a TLS listener: the CA that signs clients, and the server's pair."""

    cafile: Path
    certfile: Path
    keyfile: Path


@dataclass
class Listener:
    """One broker listener. kind is "plain", "tls" (client certificate required) or
    "auth" (username/password with an ACL)."""

    kind: str
    port: int = 0
    tls: TlsFiles | None = None
    users: dict[str, str] = field(default_factory=dict)
    acl: str = ""


class Broker:
    """A running mosquitto. Start with `start()` (or as a context manager)."""

    def __init__(self, listeners: list[Listener], workdir: Path | None = None,
                 persistence_dir: Path | None = None) -> None:
        if not listeners:
            raise ValueError("a broker needs at least one listener")
        self.listeners = listeners
        self._own_tmp = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.persistence_dir = persistence_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "mosquitto.log"
        for listener in self.listeners:
            if listener.port == 0:
                listener.port = free_port()

    @property
    def host(self) -> str:
        return LOOPBACK

    def port(self, kind: str = "plain") -> int:
        for listener in self.listeners:
            if listener.kind == kind:
                return listener.port
        raise KeyError(f"no {kind} listener")

    # -- configuration -------------------------------------------------------------------
    def _config_text(self) -> str:
        lines = ["per_listener_settings true", "log_dest stderr",
                 "log_type error", "log_type warning", "log_type notice"]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops privileges and can't read 0600 files
        if self.persistence_dir is not None:
            lines += ["persistence true", f"persistence_location {self.persistence_dir}/",
                      "autosave_interval 1"]
        else:
            lines.append("persistence false")
        for n, listener in enumerate(self.listeners):
            lines.append(f"listener {listener.port} {LOOPBACK}")
            if listener.kind == "plain":
                lines.append("allow_anonymous true")
            elif listener.kind == "tls":
                if listener.tls is None:
                    raise ValueError("a tls listener needs TlsFiles")
                lines += [f"cafile {listener.tls.cafile}", f"certfile {listener.tls.certfile}",
                          f"keyfile {listener.tls.keyfile}", "require_certificate true",
                          "use_identity_as_username true", "allow_anonymous false"]
                if listener.acl:
                    acl = self.workdir / f"acl-{n}"
                    acl.write_text(listener.acl)
                    lines.append(f"acl_file {acl}")
            elif listener.kind == "auth":
                pw = self.workdir / f"passwd-{n}"
                pw.write_text("")
                pw.chmod(0o600)
                for user, password in listener.users.items():
                    subprocess.run([mosquitto_passwd_binary(), "-b", str(pw), user, password],
                                   check=True, capture_output=True)
                acl = self.workdir / f"acl-{n}"
                acl.write_text(listener.acl)
                lines += [f"password_file {pw}", f"acl_file {acl}", "allow_anonymous false"]
            else:
                raise ValueError(f"unknown listener kind {listener.kind!r}")
        return "\n".join(lines) + "\n"

    # -- lifetime ------------------------------------------------------------------------
    def start(self, timeout_s: float = 5.0) -> Broker:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self._config_text())
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout_s
        pending = {listener.port for listener in self.listeners}
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited at start: {self.log_path.read_text()[-2000:]}")
            for port in list(pending):
                try:
                    socket.create_connection((LOOPBACK, port), timeout=0.2).close()
                    pending.discard(port)
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"mosquitto did not open ports {sorted(pending)}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop this broker (SIGTERM, then SIGKILL) by its own PID."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def kill(self) -> None:
        """Kill without a clean shutdown, as a crash or power cut would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_tmp:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
