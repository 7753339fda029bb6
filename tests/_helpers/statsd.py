"""A real StatsD receiver for tests: a UDP socket on 127.0.0.1 that records every line.

The ``statsd_server`` fixture is registered for every test by ``conftest.py``.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from .wait import wait_for

__all__ = ["StatsdServer", "statsd_server"]

_LINE = re.compile(r"^(?P<name>[^:]+):(?P<value>[^|]+)\|(?P<type>c|ms|g|s)(\|@[0-9.]+)?$")


class StatsdServer:
    """Binds a UDP port on 127.0.0.1 and keeps each received stat line, in order."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self.packets = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="statsd-server", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"statsd://127.0.0.1:{self.port}/mqtasks"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.packets += 1
            self.lines.extend(data.decode("ascii").split("\n"))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def stats(self, name: str) -> list[tuple[float, str]]:
        """(value, type) of every line for metric ``name``."""
        out = []
        for line in list(self.lines):
            m = _LINE.match(line)
            assert m is not None, f"not a StatsD line: {line!r}"
            if m["name"] == name:
                out.append((float(m["value"]), m["type"]))
        return out

    def count(self, name: str) -> float:
        """Sum of counter ``name``."""
        return sum(v for v, t in self.stats(name) if t == "c")

    def gauge(self, name: str) -> float | None:
        """Last value of gauge ``name``."""
        values = [v for v, t in self.stats(name) if t == "g"]
        return values[-1] if values else None

    def timings(self, name: str) -> list[float]:
        return [v for v, t in self.stats(name) if t == "ms"]

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        """Wait until ``condition()`` holds; fail showing every line received."""
        wait_for(condition, lambda: f"{what}; received: {self.lines}", timeout, interval=0.01)


@pytest.fixture
def statsd_server() -> Iterator[StatsdServer]:
    """A StatsD receiver on a free UDP port of 127.0.0.1."""
    server = StatsdServer()
    yield server
    server.close()
