"""Cut this process's own broker connections from the broker side (never anyone else's).

To cut a connection on the way instead (RST, refusal, black hole, frozen
bytes), tests put the harness's :class:`reliability.proxy.TcpProxy` in front of
the broker.
"""

from __future__ import annotations

import os
import subprocess

import redis

__all__ = ["close_amqp_connections", "kill_redis_connections", "own_local_ports"]


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
