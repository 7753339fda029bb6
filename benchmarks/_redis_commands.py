"""Counting the Redis commands a piece of client code costs, on a shared server.

:class:`Monitor` reads the server's ``MONITOR`` stream between two marker commands;
:func:`count_commands` keeps what this process's connections sent (:func:`own_ports`)
and what the server ran inside their scripts on keys carrying a tag of the run's own.
``INFO commandstats`` (:func:`commandstats`) counts every client of the server: a
cross-check, exact only while nothing else runs.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from typing import Any

__all__ = ["Monitor", "commandstats", "count_commands", "own_ports"]


def own_ports(server_port: int) -> set[str]:
    """Local ports of this process's TCP connections to ``server_port`` (from /proc)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == server_port:
                    ports.add(str(int(local.rsplit(":", 1)[1], 16)))
    return ports


def commandstats(client: Any) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


class Monitor:
    """The server's MONITOR stream between two marker commands, in a thread."""

    def __init__(self, url: str, tag: str) -> None:
        import redis

        self.tag = tag
        self.client = redis.Redis.from_url(url, socket_timeout=30)
        self.marker = redis.Redis.from_url(url, socket_timeout=5)
        self.lines: list[dict[str, Any]] = []
        self.seen: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        marker = self.tag + "-"
        try:
            with self.client.monitor() as m:
                for cmd in m.listen():
                    parts = cmd["command"].split()
                    if len(parts) == 2 and parts[0].lower() == "echo":
                        if parts[1].startswith(marker):
                            what = parts[1][len(marker) :]
                            self.seen.add(what)
                            if what == "end":
                                return
                        continue
                    if "start" in self.seen:
                        self.lines.append(cmd)
        except BaseException as exc:
            self._error = exc

    def _mark(self, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while what not in self.seen and time.monotonic() < deadline:
            self.marker.echo(f"{self.tag}-{what}")
            time.sleep(0.05)
            if self._error is not None:
                raise RuntimeError(f"MONITOR failed: {self._error!r}")
        if what not in self.seen:
            raise TimeoutError(f"MONITOR did not see the {what} marker")

    def __enter__(self) -> Monitor:
        self._thread.start()
        self._mark("start")
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._mark("end")
        self._thread.join(10.0)
        self.client.close()
        self.marker.close()


def count_commands(
    lines: list[dict[str, Any]], ports: set[str], keytag: str, db: int
) -> Counter[str]:
    """Commands of the connections on ``ports``, and script commands on this run's keys."""
    got: Counter[str] = Counter()
    for cmd in lines:
        if cmd["db"] != db:
            continue
        mine = cmd["client_type"] == "tcp" and cmd["client_port"] in ports
        scripted = cmd["client_type"] == "lua" and keytag in cmd["command"]
        name = cmd["command"].split(" ", 1)[0].lower()
        if (mine and name not in ("info", "echo")) or scripted:  # INFO, ECHO: the benchmark's
            got[("lua " if scripted else "") + name] += 1
    return got
