"""Brokers started from the shipped deploy/mosquitto templates, a PKI that can revoke, and a
TCP link that can be cut: the real parts of the bridge, ACL and API tests.

The templates are rendered the way deployment.md says (`envsubst` with a list of names:
only `${NAME}` for those names is replaced) with loopback addresses, free ports and
temporary folders. The one line added is `user root` when the tests run as root (mosquitto
would otherwise drop to its own user and could not read the 0600 files of a temp folder).
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from hil.rig.broker import Broker, Listener, TlsFiles, mosquitto_passwd_binary
from hil.rig.ports import LOOPBACK, free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "mosquitto"
SITE_CONF = DEPLOY / "site" / "mosquitto.conf.template"
SITE_ACL = DEPLOY / "site" / "acl.template"
CONTROL_ROOM_CONF = DEPLOY / "control-room" / "mosquitto.conf.template"
ACL_SITE = DEPLOY / "control-room" / "acl-site.template"
ACL_DNO = DEPLOY / "control-room" / "acl-dno.template"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render(template: Path, values: Mapping[str, str]) -> str:
    """envsubst '${A} ${B}' < template: every placeholder outside comments must be given."""
    text = template.read_text()
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        missing = set(_PLACEHOLDER.findall(line)) - set(values)
        assert not missing, f"{template.name}: no value for {sorted(missing)} in {line!r}"
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def gateway_user(site_id: str) -> str:
    return f"gateway-{site_id}"


# -- PKI ------------------------------------------------------------------------------------

@dataclass
class ClientCert:
    certfile: Path
    keyfile: Path
    serial: int


@dataclass
class RevocablePki:
    """A CA (its key kept, so it can sign a CRL), the broker's certificate and client certs
    whose CN is the MQTT username."""

    folder: Path
    ca: trustme.CA = field(default_factory=trustme.CA)
    clients: dict[str, ClientCert] = field(default_factory=dict)
    revoked: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cafile = self.folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.cafile))
        server = self.ca.issue_cert(LOOPBACK, "localhost")
        self.server = TlsFiles(self.cafile, self.folder / "server.pem", self.folder / "server.key")
        server.cert_chain_pems[0].write_to_path(str(self.server.certfile))
        server.private_key_pem.write_to_path(str(self.server.keyfile))
        self.crlfile = self.folder / "crl.pem"
        self.write_crl()

    def issue(self, common_name: str, ca: trustme.CA | None = None) -> ClientCert:
        issued = (ca or self.ca).issue_cert(f"{common_name}@evedge.test", common_name=common_name)
        cert = ClientCert(self.folder / f"{common_name}.pem", self.folder / f"{common_name}.key",
                          x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes()).serial_number)
        issued.cert_chain_pems[0].write_to_path(str(cert.certfile))
        issued.private_key_pem.write_to_path(str(cert.keyfile))
        cert.keyfile.chmod(0o600)
        if ca is None:
            self.clients[common_name] = cert
        return cert

    def revoke(self, common_name: str) -> None:
        self.revoked.add(self.clients[common_name].serial)
        self.write_crl()

    def write_crl(self) -> None:
        key = serialization.load_pem_private_key(self.ca.private_key_pem.bytes(), password=None)
        issuer = x509.load_pem_x509_certificate(self.ca.cert_pem.bytes()).subject
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer)
                   .last_update(now - datetime.timedelta(minutes=5))
                   .next_update(now + datetime.timedelta(days=1)))
        for serial in sorted(self.revoked):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
        crl = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
        self.crlfile.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


# -- brokers --------------------------------------------------------------------------------

class TemplateBroker(Broker):
    """A mosquitto whose configuration is a rendered template (one listener to wait for)."""

    def __init__(self, config_text: str, port: int, workdir: Path) -> None:
        super().__init__([Listener("template", port=port)], workdir=workdir)
        self._text = config_text

    def _config_text(self) -> str:
        return ("user root\n" if os.geteuid() == 0 else "") + self._text


def _etc(folder: Path, files: Mapping[str, Path | str]) -> Path:
    """A 0700 folder holding copies of the given files (paths) or texts (str)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    for name, src in files.items():
        (folder / name).write_bytes(src.read_bytes() if isinstance(src, Path) else src.encode())
        (folder / name).chmod(0o600)
    return folder


def control_room_acl(sites: list[str], dno_users: list[str]) -> str:
    parts = [render(ACL_DNO, {"DNO_USER": user}) for user in dno_users]
    parts += [render(ACL_SITE, {"SITE_ID": site}) for site in sites]
    return "\n".join(parts)


def control_room_broker(workdir: Path, pki: RevocablePki, *, sites: list[str],
                        dno_users: list[str], port: int = 0) -> TemplateBroker:
    etc = _etc(workdir / "etc", {"ca.pem": pki.cafile, "server.pem": pki.server.certfile,
                                 "server.key": pki.server.keyfile, "crl.pem": pki.crlfile,
                                 "acl": control_room_acl(sites, dno_users)})
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    text = render(CONTROL_ROOM_CONF, {"EVEDGE_MQTT_DIR": str(etc), "LISTEN_ADDRESS": LOOPBACK,
                                      "LISTEN_PORT": str(port), "PERSISTENCE_DIR": f"{data}/"})
    return TemplateBroker(text, port, workdir)


def refresh_crl(broker: TemplateBroker, pki: RevocablePki) -> None:
    (broker.workdir / "etc" / "crl.pem").write_bytes(pki.crlfile.read_bytes())


def site_broker(workdir: Path, pki: RevocablePki, *, site_id: str, control_room: str,
                gateway_password: str, port: int = 0) -> TemplateBroker:
    """The site-local broker bridged to `control_room` (host:port) with the site's cert."""
    cert = pki.clients[gateway_user(site_id)]
    etc = _etc(workdir / "etc", {"ca.pem": pki.cafile, "bridge.pem": cert.certfile,
                                 "bridge.key": cert.keyfile,
                                 "local-acl": render(SITE_ACL, {"SITE_ID": site_id}),
                                 "local-passwd": ""})
    subprocess.run([mosquitto_passwd_binary(), "-b", str(etc / "local-passwd"), gateway_user(site_id),
                    gateway_password], check=True, capture_output=True)
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    text = render(SITE_CONF, {"SITE_ID": site_id, "EVEDGE_MQTT_DIR": str(etc), "LOCAL_PORT": str(port),
                              "CONTROL_ROOM_ADDRESS": control_room, "PERSISTENCE_DIR": f"{data}/"})
    return TemplateBroker(text, port, workdir)


# -- a link that can be cut -----------------------------------------------------------------

class CuttableLink:
    """A loopback TCP forwarder standing in for the WAN between a site and the control room.

    cut() closes every connection and stops accepting (a new connection is refused), as a
    dead uplink looks to mosquitto; restore() accepts again on the same port.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.connections = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._server: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> CuttableLink:
        server = socket.create_server((LOOPBACK, self.port), reuse_port=False)
        server.settimeout(0.05)
        self._server = server
        thread = threading.Thread(target=self._accept, args=(server,), daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def _accept(self, server: socket.socket) -> None:
        while self._server is server:
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(timeout=1)
        self._threads.clear()

    def restore(self) -> None:
        self.start()

    def close(self) -> None:
        self.cut()
