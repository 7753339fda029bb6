"""A throw-away certificate authority and a TLS front-end proxy.

Shared by the harness's S13 (transport security) and the test suite's TLS tests
(``tests/test_tls.py``): both need a CA, certificates it signed for ``localhost``
and for ``other.example``, certificates a stranger signed, and a TLS endpoint
presenting a chosen certificate in front of a broker's plain port.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import socket
import ssl
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .proxy import pipe

__all__ = ["Pki", "TlsFront", "make_pki"]


# -- certificates ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pki:
    """PEM files of a throw-away CA and of certificates it (or a stranger) signed."""

    #: The CA clients are told to trust.
    ca: Path
    #: Certificate for ``localhost`` and 127.0.0.1, signed by :attr:`ca`, and its key.
    server_cert: Path
    server_key: Path
    #: Certificate for ``other.example`` only, signed by :attr:`ca`, and its key.
    other_cert: Path
    other_key: Path
    #: A CA that signed none of the certificates above.
    rogue_ca: Path
    #: Certificate for ``localhost`` and 127.0.0.1, signed by :attr:`rogue_ca`, and its key.
    rogue_cert: Path
    rogue_key: Path
    #: A client certificate signed by :attr:`ca`, and its key.
    client_cert: Path
    client_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _valid(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def _ca(common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return key, _valid(builder).sign(key, hashes.SHA256())


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common: str,
    names: list[x509.GeneralName],
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.SERVER_AUTH,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, _valid(builder).sign(ca_key, hashes.SHA256())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o644)  # read by a broker running as another user
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_pki(directory: Path, ca_name: str = "mqtasks test CA") -> Pki:
    """Write a throw-away CA named ``ca_name`` and the certificates of :class:`Pki`
    into ``directory`` (made readable by a broker running as another user)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    local: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    ca_key, ca_cert = _ca(ca_name)
    rogue_ca_key, rogue_ca_cert = _ca("an unrelated CA")
    server_key, server_cert = _leaf(ca_key, ca_cert, "localhost", local)
    other_key, other_cert = _leaf(ca_key, ca_cert, "other.example", [x509.DNSName("other.example")])
    rogue_key, rogue_cert = _leaf(rogue_ca_key, rogue_ca_cert, "localhost", local)
    client_key, client_cert = _leaf(
        ca_key, ca_cert, "mqtasks-client", [], ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return Pki(
        ca=_write(directory / "ca.pem", _cert_pem(ca_cert)),
        server_cert=_write(directory / "server.pem", _cert_pem(server_cert)),
        server_key=_write(directory / "server.key", _key_pem(server_key)),
        other_cert=_write(directory / "other.pem", _cert_pem(other_cert)),
        other_key=_write(directory / "other.key", _key_pem(other_key)),
        rogue_ca=_write(directory / "rogue-ca.pem", _cert_pem(rogue_ca_cert)),
        rogue_cert=_write(directory / "rogue.pem", _cert_pem(rogue_cert)),
        rogue_key=_write(directory / "rogue.key", _key_pem(rogue_key)),
        client_cert=_write(directory / "client.pem", _cert_pem(client_cert)),
        client_key=_write(directory / "client.key", _key_pem(client_key)),
    )


# -- a TLS front-end proxy -------------------------------------------------------------


class TlsFront:
    """A TLS endpoint on a loopback port presenting ``cert``, forwarding the
    decrypted bytes to 127.0.0.1:``target_port`` (a broker's plain listener).

    Put in front of a RabbitMQ node with the ``other.example`` certificate (or
    one a stranger signed), it is a broker reached as ``localhost`` that shows a
    certificate for another name (or from an unknown CA), without a second node.
    """

    def __init__(self, cert: Path, key: Path, target_port: int) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="tls-front", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            client.settimeout(10)
            secure = self.context.wrap_socket(client, server_side=True)
            secure.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            upstream.settimeout(None)
        except (OSError, ssl.SSLError):  # the client refused our certificate: expected
            client.close()
            return
        with self._lock:
            self._sockets += [secure, upstream]
        threading.Thread(target=pipe, args=(upstream, secure), daemon=True).start()
        pipe(secure, upstream)

    def close(self) -> None:
        """Stop accepting and close every forwarded connection."""
        self._closed = True
        self.listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()
            self._sockets.clear()
