"""TLS: ``amqps://`` and ``rediss://`` check the certificate and the host name by default.

The brokers here are the module's own: a RabbitMQ node with a TLS listener and
redis-servers with TLS ports, on free loopback ports, presenting certificates
of a throwaway CA. The wrong-certificate cases on RabbitMQ go through a TLS
proxy (Python's ssl module) in front of that node's plain port, presenting a
certificate for another name or from an unknown CA.
"""

from __future__ import annotations

import os
import shutil
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from mqtasks import App, ConfigurationError, ConnectionFailed, PublishError, Settings, Worker
from mqtasks.config import TLSOptions
from mqtasks.testing import drain, running_worker
from mqtasks.transport.kombu import KombuTransport
from reliability.pki import Pki, TlsFront, make_pki
from tests._helpers.servers import start_rabbitmq_tls, start_redis, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def rabbit(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """Our own RabbitMQ node: TLS port with the right certificate, plus proxies
    presenting a certificate for other.example and one from an unknown CA."""
    if not os.path.exists("/usr/lib/rabbitmq/bin/rabbitmq-server"):
        pytest.skip("rabbitmq-server is not installed")
    proc, tls_port, tcp_port = start_rabbitmq_tls(tmp_path_factory.mktemp("rabbit"), pki)
    other = TlsFront(pki.other_cert, pki.other_key, tcp_port)
    rogue = TlsFront(pki.rogue_cert, pki.rogue_key, tcp_port)
    try:
        yield {"good": tls_port, "other": other.port, "rogue": rogue.port}
    finally:
        other.close()
        rogue.close()
        stop(proc)


@pytest.fixture(scope="module")
def redis_tls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """Our own redis-servers with TLS ports: the right certificate (client
    certificates optional, and required), one for other.example, one from an unknown CA."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    servers: list[Any] = []
    ports: dict[str, int] = {}
    try:
        for kind, cert, key, clients in [
            ("good", pki.server_cert, pki.server_key, "optional"),
            ("mutual", pki.server_cert, pki.server_key, "yes"),
            ("other", pki.other_cert, pki.other_key, "optional"),
            ("rogue", pki.rogue_cert, pki.rogue_key, "optional"),
        ]:
            proc, port = start_redis(
                tmp_path_factory.mktemp(f"redis-{kind}"),
                "--tls-port",
                "0",
                "--tls-cert-file",
                str(cert),
                "--tls-key-file",
                str(key),
                "--tls-ca-cert-file",
                str(pki.ca),
                "--tls-auth-clients",
                clients,
            )
            servers.append(proc)
            ports[kind] = port
        yield ports
    finally:
        for proc in servers:
            stop(proc)


def _url(scheme: str, port: int, host: str = "localhost") -> str:
    if scheme == "amqps":
        return f"amqps://guest:guest@{host}:{port}//"
    return f"{scheme}://{host}:{port}/0"


@pytest.fixture
def tls_app(make_app: Callable[..., App]) -> Callable[..., App]:
    def make(url: str, **tls: Any) -> App:
        return make_app(url, tls=TLSOptions(**tls), publish_retries=0, connect_timeout=3.0)

    return make


def _runs_end_to_end(app: App) -> None:
    done: list[int] = []

    @app.task(max_retries=0)
    def add(x: int, y: int) -> None:
        done.append(x + y)

    add.delay(2, 3)
    with running_worker(app, concurrency=1) as worker:
        drain(worker, timeout=20)
    assert done == [5]


# -- a: verified connections work --------------------------------------------------


def test_amqps_with_the_right_ca_runs_tasks(
    rabbit: dict[str, int], pki: Pki, tls_app: Callable[..., App]
) -> None:
    _runs_end_to_end(tls_app(_url("amqps", rabbit["good"]), ca_file=str(pki.ca)))


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_rediss_with_the_right_ca_runs_tasks(
    redis_tls: dict[str, int], pki: Pki, tls_app: Callable[..., App], host: str
) -> None:
    _runs_end_to_end(tls_app(_url("rediss", redis_tls["good"], host), ca_file=pki.ca))


def test_rediss_kombu_with_the_right_ca_runs_tasks(
    redis_tls: dict[str, int], pki: Pki, tls_app: Callable[..., App]
) -> None:
    _runs_end_to_end(tls_app(_url("rediss+kombu", redis_tls["good"]), ca_file=str(pki.ca)))


def test_client_certificate_is_presented(
    redis_tls: dict[str, int], pki: Pki, tls_app: Callable[..., App]
) -> None:
    url = _url("rediss", redis_tls["mutual"])
    # Given a Redis that requires client certificates, without one: refused
    bare = tls_app(url, ca_file=str(pki.ca))
    with pytest.raises(PublishError):
        bare.task(name="tls.noop")(lambda: None).delay()
    # With one, tasks run
    _runs_end_to_end(
        tls_app(
            url, ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
        )
    )


# -- b, c, e: wrong CA, wrong name, no options: refused ---------------------------------


@pytest.fixture(params=["amqps", "rediss", "rediss+kombu"])
def scheme(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ports(scheme: str, request: pytest.FixtureRequest) -> dict[str, int]:
    fixture = "rabbit" if scheme == "amqps" else "redis_tls"
    return dict(request.getfixturevalue(fixture))


@pytest.mark.parametrize(
    ("server", "ca", "expected"),
    [
        ("other", True, "Hostname mismatch"),  # right CA, certificate for other.example
        ("rogue", True, "certificate"),  # a CA nobody told us to trust
        ("good", False, "certificate"),  # no options: the system's CAs, which do not know ours
    ],
)
def test_untrusted_certificates_are_refused(
    scheme: str,
    ports: dict[str, int],
    pki: Pki,
    tls_app: Callable[..., App],
    server: str,
    ca: bool,
    expected: str,
) -> None:
    app = tls_app(_url(scheme, ports[server]), **({"ca_file": str(pki.ca)} if ca else {}))
    ran: list[int] = []
    task = app.task(name="tls.refused", max_retries=0)(lambda: ran.append(1))
    # delay() fails, saying the certificate was not accepted
    with pytest.raises(PublishError, match=r"certificate (verify failed|of the broker)") as sent:
        task.delay()
    assert expected in str(sent.value)
    # and a worker does not start, with a message that says what to do
    worker = Worker(app, concurrency=1)
    with pytest.raises(ConnectionFailed) as started:
        worker.start(timeout=30)
    message = str(started.value)
    assert "TLS certificate of the broker" in message and expected in message
    assert "ca_file" in message
    assert ran == []


def test_verification_can_be_turned_off_and_warns(
    scheme: str, ports: dict[str, int], tls_app: Callable[..., App]
) -> None:
    url = _url(scheme, ports["other"])  # a certificate for another name, from our CA
    with structlog.testing.capture_logs() as logs:
        app = tls_app(url, verify=False)
        _runs_end_to_end(app)
        assert tls_app(url, verify=False).transport.uses_tls  # a second app, same broker
    warnings = [e for e in logs if e["event"] == "tls.unverified"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"


# -- configuration -------------------------------------------------------------------


def test_tls_settings_in_the_url_are_refused() -> None:
    for url in (
        "rediss://localhost:6380/0?ssl_cert_reqs=none",
        "amqps://guest:guest@localhost//?ssl_cert_reqs=CERT_NONE",
        "amqp://guest:guest@localhost//?ssl=1",
    ):
        with pytest.raises(ConfigurationError, match="TLSOptions"):
            _ = App("t", broker=url).transport


def test_tls_options_without_a_tls_url_are_refused(tmp_path: Path, pki: Pki) -> None:
    app = App("t", broker="redis://localhost:6379/0", tls=TLSOptions(ca_file=str(pki.ca)))
    with pytest.raises(ConfigurationError, match="does not use TLS"):
        _ = app.transport


def test_missing_or_broken_tls_files_fail_at_start(tmp_path: Path, pki: Pki) -> None:
    missing = App("t", broker="rediss://localhost/0", tls=TLSOptions(ca_file=str(tmp_path / "x")))
    with pytest.raises(ConfigurationError, match="does not exist"):
        _ = missing.transport
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    broken = App("t", broker="amqps://localhost//", tls=TLSOptions(ca_file=str(garbage)))
    with pytest.raises(ConfigurationError, match="could not be loaded"):
        _ = broken.transport
    wrong_key = TLSOptions(cert_file=str(pki.client_cert), key_file=str(pki.server_key))
    with pytest.raises(ConfigurationError, match="could not be loaded"):
        _ = App("t", broker="amqps://localhost//", tls=wrong_key).transport
    with pytest.raises(ConfigurationError, match="needs cert_file"):
        TLSOptions(key_file=str(pki.client_key))


def test_tls_options_come_from_the_environment(pki: Pki) -> None:
    env = {
        "MQTASKS_TLS_CA_FILE": str(pki.ca),
        "MQTASKS_TLS_CERT_FILE": str(pki.client_cert),
        "MQTASKS_TLS_KEY_FILE": str(pki.client_key),
        "MQTASKS_TLS_VERIFY": "false",
    }
    settings = Settings.from_env(env)
    assert settings.tls == TLSOptions(str(pki.ca), str(pki.client_cert), str(pki.client_key), False)
    assert Settings.from_env({}).tls == TLSOptions()
    with pytest.raises(ConfigurationError, match="MQTASKS_TLS_VERIFY"):
        Settings.from_env({"MQTASKS_TLS_VERIFY": "maybe"})
    with pytest.raises(ConfigurationError, match="TLSOptions"):
        Settings(tls={"ca_file": "x"})  # type: ignore[arg-type]


def test_amqps_checks_the_host_name_py_amqp_would_not() -> None:
    # py-amqp checks the host name only when told it: mqtasks always tells it.
    app = App("t", broker="amqps://guest:guest@broker.internal:5671//")
    assert isinstance(app.transport, KombuTransport)
    options = app.transport.kombu_ssl()
    assert isinstance(options, dict)
    assert options["server_hostname"] == "broker.internal"
    assert options["cert_reqs"] == ssl.CERT_REQUIRED
