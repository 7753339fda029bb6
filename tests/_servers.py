"""Brokers owned by one test module: their own redis-server or RabbitMQ node on free
loopback ports, and a throwaway certificate authority for TLS.

Each is stopped by the process id it was started with; the machine's shared
brokers are never touched.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Stop a server started with ``start_new_session=True``: its own process group only."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


# -- certificates -------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files of a test CA and certificates it (or a stranger) signed."""

    ca: Path  #: the CA clients are told to trust
    server_cert: Path  #: for localhost and 127.0.0.1, signed by ``ca``
    server_key: Path
    other_cert: Path  #: for other.example only, signed by ``ca``
    other_key: Path
    rogue_cert: Path  #: for localhost and 127.0.0.1, signed by an unknown CA
    rogue_key: Path
    client_cert: Path  #: a client certificate signed by ``ca``
    client_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
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
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common: str,
    names: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    """Write a throwaway CA and certificates for the TLS tests into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    ca_key, ca_cert = _ca("mqtasks test CA")
    rogue_ca_key, rogue_ca_cert = _ca("somebody else's CA")
    server = _leaf(ca_key, ca_cert, "localhost", local, ExtendedKeyUsageOID.SERVER_AUTH)
    other = _leaf(
        ca_key,
        ca_cert,
        "other.example",
        [x509.DNSName("other.example")],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    rogue = _leaf(rogue_ca_key, rogue_ca_cert, "localhost", local, ExtendedKeyUsageOID.SERVER_AUTH)
    client = _leaf(ca_key, ca_cert, "mqtasks-client", [], ExtendedKeyUsageOID.CLIENT_AUTH)
    for path in directory.iterdir():
        path.chmod(0o644)
    pki = Pki(
        ca=_write_cert(ca_cert, directory / "ca.pem"),
        server_cert=_write_cert(server[1], directory / "server.pem"),
        server_key=_write_key(server[0], directory / "server.key"),
        other_cert=_write_cert(other[1], directory / "other.pem"),
        other_key=_write_key(other[0], directory / "other.key"),
        rogue_cert=_write_cert(rogue[1], directory / "rogue.pem"),
        rogue_key=_write_key(rogue[0], directory / "rogue.key"),
        client_cert=_write_cert(client[1], directory / "client.pem"),
        client_key=_write_key(client[0], directory / "client.key"),
    )
    for path in directory.iterdir():
        path.chmod(0o644)  # readable by a broker running as another user
    return pki


# -- redis-server -------------------------------------------------------------------


def start_redis(
    directory: Path, *args: str, port: int | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a private redis-server on loopback; return it and its (TLS or plain) port.

    ``args`` are extra ``redis-server`` options; with ``--tls-port`` in them the
    plain port is closed and the TLS port is returned.
    """
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed")
    port = port or free_port()
    tls = "--tls-port" in args
    command = [
        "redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        "0" if tls else str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        *args,
    ]
    if tls:
        command[command.index("--tls-port") + 1] = str(port)
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    wait_for_port(port, 10, proc)
    return proc, port


# -- RabbitMQ ------------------------------------------------------------------------


def start_rabbitmq_tls(directory: Path, pki: Pki) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start a RabbitMQ node of our own with a TLS listener; return it, its TLS port and
    its plain port. Its name, ports and directories are its own; no plugins."""
    directory.mkdir(parents=True, exist_ok=True)
    tls_port, tcp_port, dist_port = free_port(), free_port(), free_port()
    node = f"mqttls{tls_port}@localhost"
    (directory / "rabbitmq.conf").write_text(
        "\n".join(
            [
                f"listeners.tcp.default = 127.0.0.1:{tcp_port}",
                f"listeners.ssl.default = 127.0.0.1:{tls_port}",
                f"ssl_options.cacertfile = {pki.ca}",
                f"ssl_options.certfile = {pki.server_cert}",
                f"ssl_options.keyfile = {pki.server_key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
                "loopback_users = none",
                "",
            ]
        )
    )
    (directory / "rabbitmq-env.conf").write_text("")
    (directory / "enabled_plugins").write_text("[].\n")
    env = {
        **os.environ,
        "HOME": str(directory),
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(tcp_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
        "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_PID_FILE": str(directory / "node.pid"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }
    with (directory / "stdout.log").open("wb") as log:
        proc = subprocess.Popen(
            ["/usr/lib/rabbitmq/bin/rabbitmq-server"],
            env=env,
            cwd=directory,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(tls_port, 90, proc)
        wait_for_port(tcp_port, 30, proc)
    except BaseException:
        stop(proc)
        raise
    return proc, tls_port, tcp_port


def tls_handshake_ok(port: int, ca: Path) -> bool:
    """Whether a verified TLS handshake with 127.0.0.1:``port`` succeeds."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost"),
    ):
        return True
