"""``rediss://`` backends verify the certificate and the host name, as the transports do.

The redis-servers are this module's own, with TLS ports on free loopback ports,
presenting certificates of a throwaway CA (``reliability.pki``).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator

import pytest

from mqtasks.backend import resolve
from mqtasks.exceptions import BackendError
from mqtasks.transport.tls import TLSOptions
from reliability.pki import Pki, make_pki
from tests._helpers.servers import start_redis, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def servers(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """TLS ports of redis-servers presenting the right certificate, one for other.example
    and one from an unknown CA."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    procs = []
    ports: dict[str, int] = {}
    try:
        for kind, cert, key in [
            ("good", pki.server_cert, pki.server_key),
            ("other", pki.other_cert, pki.other_key),
            ("rogue", pki.rogue_cert, pki.rogue_key),
        ]:
            proc, port = start_redis(
                tmp_path_factory.mktemp(f"redis-{kind}"),
                *("--tls-port", "0", "--tls-cert-file", str(cert), "--tls-key-file", str(key)),
                *("--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "no"),
            )
            procs.append(proc)
            ports[kind] = port
        yield ports
    finally:
        for proc in procs:
            stop(proc)


def test_rediss_with_the_right_ca_stores_and_waits(servers: dict[str, int], pki: Pki) -> None:
    backend = resolve(
        f"rediss://localhost:{servers['good']}/0", tls=TLSOptions(ca_file=str(pki.ca))
    )
    timer = threading.Timer(0.2, backend.store_result, ["t", b"x"], {"final": True, "expires": 60})
    try:
        timer.start()
        assert backend.wait_result("t", timeout=30) == b"x"
    finally:
        timer.join()
        backend.close()


@pytest.mark.parametrize(
    ("server", "ca"),
    [
        ("other", True),  # right CA, certificate for other.example
        ("rogue", True),  # a CA nobody told us to trust
        ("good", False),  # no options: the system's CAs, which do not know ours
    ],
)
def test_untrusted_certificates_are_refused(
    servers: dict[str, int], pki: Pki, server: str, ca: bool
) -> None:
    tls = TLSOptions(ca_file=str(pki.ca)) if ca else None
    backend = resolve(f"rediss://localhost:{servers[server]}/0", tls=tls)
    try:
        with pytest.raises(BackendError, match=r"TLS certificate of the result backend") as caught:
            backend.check()
        assert "TLSOptions(ca_file=...)" in str(caught.value)
    finally:
        backend.close()
