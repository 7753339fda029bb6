"""A RabbitMQ cluster of the harness's own: three nodes on loopback, joined with ``join_cluster``.

Each node is a :class:`~reliability.brokers.RabbitNode` (own node name, ports,
mnesia and log folders) sharing one Erlang cookie and one user and password;
nodes 2 and 3 join node 1. The cluster serves the KQ (quorum queues) and KC
(classic queues, the negative control) profiles, and its faults hit one node
at a time: ``kill -9``, a graceful stop and start, a pause (SIGSTOP).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .brokers import BrokerError, RabbitNode, _reap, wait_port
from .profiles import BrokerProfile

__all__ = ["RabbitCluster"]

T = TypeVar("T")

#: Set in every node's configuration: a node cut off from the majority stops
#: serving (and comes back by itself) rather than going on alone; RabbitMQ's
#: advice for clusters of 3 or more.
_PARTITION_HANDLING = "cluster_partition_handling = pause_minority\n"


#: Seconds of silence after which the other nodes count a node as gone (Erlang's
#: default, 60, keeps a frozen node's queue leaders in place for up to 75 s).
NET_TICKTIME = 15


class _ClusterNode(RabbitNode):
    """A node of the cluster: it tells a silent peer gone after :data:`NET_TICKTIME`."""

    def env(self) -> dict[str, str]:
        env = super().env()
        tick = f" -kernel net_ticktime {NET_TICKTIME}"
        env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] += tick
        env["RABBITMQ_CTL_ERL_ARGS"] += tick
        return env


class RabbitCluster:
    """Three RabbitMQ nodes clustered on loopback ports of their own.

    Args:
        workdir: Folder of the nodes' files (one sub-folder each); a new
            temporary one by default.
        size: Number of nodes.
    """

    def __init__(self, workdir: Path | None = None, size: int = 3) -> None:
        self.base = Path(workdir or tempfile.mkdtemp(prefix="mqtasks-rel-cluster-"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)  # the nodes run as the rabbitmq user below it
        self.password = secrets.token_urlsafe(12)
        cookie = secrets.token_hex(16).upper()
        tag = secrets.token_hex(3)
        self.nodes: list[RabbitNode] = []
        ports: set[int] = set()
        for i in range(size):
            node: RabbitNode = _ClusterNode(self.base / f"node{i + 1}")
            while {node.port, node.dist_port} & ports:  # free_port() may hand out one twice
                node = _ClusterNode(self.base / f"node{i + 1}")
            ports |= {node.port, node.dist_port}
            node.name = f"mqtc{i + 1}-{tag}@localhost"
            node.password = self.password
            node._prepare()  # the configuration again, with the shared password
            with (node.base / "rabbitmq.conf").open("a") as conf:
                conf.write(_PARTITION_HANDLING)
            path = node.base / "home" / ".erlang.cookie"
            path.chmod(0o600)
            path.write_text(cookie)
            path.chmod(0o400)
            self.nodes.append(node)

    # -- BrokerGroup ----------------------------------------------------------

    @property
    def url(self) -> str:
        """The failover list of every node's URL (``;``-separated, the password included)."""
        return ";".join(n.plain_url for n in self.nodes)

    def start(self) -> float:
        """Start every node, then join the others to the first; return the seconds it took.

        Raises:
            BrokerError: A node did not start or join.
        """
        t0 = time.monotonic()
        errors: list[BaseException] = []

        def start(node: RabbitNode) -> None:
            try:
                node.start(timeout=150)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(n,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise BrokerError(f"a cluster node did not start: {errors[0]}") from errors[0]
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app", timeout=60)
            node.ctl("join_cluster", first.name, timeout=60)
            node.ctl("start_app", timeout=120)
            wait_port(node.port, 60)
        self.await_members(len(self.nodes))
        return time.monotonic() - t0

    def stop(self) -> None:
        """Stop every node and remove their files."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.thaw()
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def pids(self) -> list[int]:
        """Pids of every node's processes."""
        return [pid for n in self.nodes for pid in n.pids()]

    def version(self) -> str:
        """RabbitMQ's version (asked of a running node)."""
        for node in self.live():
            version = node.version()
            if version != "unknown":
                return f"{version} ({len(self.nodes)}-node cluster)"
        return "unknown"

    def env(self, broker: BrokerProfile) -> dict[str, str]:
        """Settings of a run on the cluster: none beyond the URL list, which carries the
        nodes (the queue type comes from the profile, heartbeats from the run)."""
        return {}

    # -- looking at it --------------------------------------------------------

    def live(self) -> list[RabbitNode]:
        """Nodes whose Erlang VM runs (paused ones included)."""
        return [n for n in self.nodes if n.beam_pid() is not None]

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl`` against the first node that answers.

        Raises:
            BrokerError: No node answered.
        """
        return self._ask(lambda node: node.ctl(*args, timeout=timeout))

    def _ask(self, call: Callable[[RabbitNode], T]) -> T:
        """``call`` on the first running (not paused) node that answers.

        Raises:
            BrokerError: No node answered.
        """
        error: BrokerError | None = None
        for node in self.live():
            if _stopped(node):
                continue
            try:
                return call(node)
            except BrokerError as exc:
                error = exc
        raise error or BrokerError("no cluster node is running")

    def running_members(self) -> list[str]:
        """Names of the nodes the cluster reports as running."""
        out = self.ctl("eval", "rabbit_nodes:all_running().", timeout=30)
        return [n for n in (node.name for node in self.nodes) if f"'{n}'" in out]

    def await_members(self, count: int, timeout: float = 120.0) -> None:
        """Wait until ``count`` nodes are running members of the cluster.

        Raises:
            BrokerError: Not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(BrokerError):
                if len(self.running_members()) >= count:
                    return
            if time.monotonic() > deadline:
                raise BrokerError(f"fewer than {count} cluster nodes running after {timeout:.0f} s")
            time.sleep(1.0)

    def queue_depths(self) -> dict[str, tuple[int, int]]:
        """``{queue: (ready, unacked)}`` of every queue, as a running node tells it.

        Raises:
            BrokerError: No node answered.
        """
        return self._ask(lambda node: node.queue_depths())

    def queue_home(self, queue: str) -> RabbitNode | None:
        """The node that leads ``queue`` (quorum) or holds it (classic)."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "leader", "pid")
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == queue:
                for node in self.nodes:
                    if any(node.name in p for p in parts[1:]):
                        return node
        return None

    def members(self, queue: str) -> list[str]:
        """Node names holding a replica of quorum queue ``queue`` (empty for a classic one)."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "members")
        for line in out.splitlines():
            if line.split() and line.split()[0] == queue:
                return [n.name for n in self.nodes if n.name in line]
        return []

    # -- faults ---------------------------------------------------------------

    def kill(self, node: RabbitNode) -> None:
        """``kill -9`` the node's Erlang VM."""
        node.kill()

    def graceful_stop(self, node: RabbitNode) -> None:
        """``rabbitmqctl stop``: the node leaves cleanly (its data stays)."""
        node.ctl("stop", timeout=60, check=False)
        _reap(node.proc, 30)
        if node.proc is not None and node.proc.poll() is not None:
            node.proc = None
        else:
            node.kill()

    def restart(self, node: RabbitNode) -> float:
        """Start ``node`` again (same data) and wait until the cluster has it back; return seconds."""
        t0 = time.monotonic()
        node.restart(timeout=150)
        self.await_members(len(self.nodes))
        return time.monotonic() - t0

    def pause(self, node: RabbitNode) -> None:
        """SIGSTOP the node's VM: its clients and the other nodes hear nothing from it."""
        node.freeze()

    def resume(self, node: RabbitNode) -> None:
        """SIGCONT the node's VM."""
        node.thaw()


def _stopped(node: RabbitNode) -> bool:
    """Whether the node's VM is paused (SIGSTOP): rabbitmqctl would wait on it."""
    pid = node.beam_pid()
    if pid is None:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return True
