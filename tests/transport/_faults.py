"""Cut this process's own broker connections from the broker side (never anyone else's)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Callable

import redis


def own_local_ports(remote_port: int) -> set[int]:
    """Local ports of this process's TCP connections to ``remote_port`` on loopback."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if (
                state == "01"
                and inode in inodes
                and int(remote.rsplit(":", 1)[1], 16) == remote_port
            ):
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def close_amqp_connections(port: int = 5672) -> int:
    """Have RabbitMQ close every connection this process holds to it; return how many."""
    ports = own_local_ports(port)
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "name"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    closed = 0
    for line in listing:
        pid, _, name = line.strip().partition("\t")
        try:
            local_port = int(name.split(" -> ")[0].rsplit(":", 1)[1])
        except (IndexError, ValueError):
            continue
        if local_port in ports:
            subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", pid, "mqtasks test: connection cut"],
                capture_output=True,
                timeout=60,
                check=True,
            )
            closed += 1
    return closed


def kill_redis_connections(url: str) -> int:
    """Have Redis kill every connection this process holds to it (except the killer's)."""
    client = redis.Redis.from_url(url)
    port = client.connection_pool.connection_kwargs.get("port", 6379)
    me = client.client_id()
    ports = own_local_ports(port)
    killed = 0
    for info in client.client_list():
        addr_port = int(info["addr"].rsplit(":", 1)[1])
        if addr_port in ports and int(info["id"]) != me:
            killed += client.client_kill_filter(_id=info["id"])
    client.close()
    return killed


class TcpProxy:
    """A loopback TCP proxy owned by a test: forward, cut every connection, refuse, resume."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepting = True
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.accepting:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        pipe(src, dst, lambda data: self.forward(src, data))

    def forward(self, src: socket.socket, data: bytes) -> bool:
        """Whether to pass on ``data`` read from ``src`` (subclasses hold or drop bytes)."""
        return True

    def cut(self, *, refuse: bool) -> None:
        """Close every proxied connection; with ``refuse``, turn new ones away too."""
        self.accepting = not refuse
        with self._lock:
            pairs, self.pairs = self.pairs, []
        for client, upstream in pairs:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def resume(self) -> None:
        """Accept and forward new connections again."""
        self.accepting = True

    def close(self) -> None:
        self.cut(refuse=True)
        self.listener.close()


def pipe(
    src: socket.socket, dst: socket.socket, forward: Callable[[bytes], bool] | None = None
) -> None:
    """Copy bytes from ``src`` to ``dst`` until either side closes, then close both.

    ``forward`` (if given) sees each chunk first and may hold it (block) or drop it
    (return False).
    """
    try:
        while data := src.recv(65536):
            if forward is None or forward(data):
                dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass
