"""A throwaway PKI for loopback TLS: a CA, a server certificate and client certificates.

Made fresh for each test or demo run (trustme, a few ms); never reused, never shipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

from hil.rig.broker import TlsFiles


@dataclass
class ClientCert:
    certfile: Path
    keyfile: Path


@dataclass
class Pki:
    cafile: Path
    server: TlsFiles
    clients: dict[str, ClientCert]


def make_pki(folder: Path, client_names: tuple[str, ...] = ("client",)) -> Pki:
    """Write CA, server (127.0.0.1, ::1, localhost) and one certificate per client name
    (the name becomes the certificate's common name, which mosquitto uses as username)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cafile = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    server = ca.issue_cert("127.0.0.1", "::1", "localhost")
    server_cert = folder / "server.pem"
    server_key = folder / "server.key"
    server.cert_chain_pems[0].write_to_path(str(server_cert))
    server.private_key_pem.write_to_path(str(server_key))
    clients: dict[str, ClientCert] = {}
    for name in client_names:
        issued = ca.issue_cert(f"{name}@evedge.test", common_name=name)
        cert = folder / f"{name}.pem"
        key = folder / f"{name}.key"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        clients[name] = ClientCert(cert, key)
    for path in folder.iterdir():
        path.chmod(0o600)
    return Pki(cafile, TlsFiles(cafile, server_cert, server_key), clients)
