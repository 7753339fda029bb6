"""A RabbitMQ cluster: quorum queues replicated over its nodes, and a failover
list of URLs that keeps publishing and consuming when the node leading a queue
is killed.

The cluster (three nodes on loopback ports of their own) is started by this
module and always stopped; under CI a cluster that cannot start fails the
tests instead of skipping them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from mqtasks import App, ConfigurationError, QueueSpec
from mqtasks.testing import drain, running_worker
from mqtasks.transport.amqp import AmqpTransport
from mqtasks.transport.amqp.topology import queue_arguments
from tests._helpers.brokers import unique_name

# -- without a cluster --------------------------------------------------------


def test_replicas_become_the_quorum_queues_initial_group_size() -> None:
    args = queue_arguments(QueueSpec("q", replicas=3), "quorum")
    assert args["x-quorum-initial-group-size"] == 3
    assert args["x-dead-letter-strategy"] == "at-least-once"
    assert args["x-overflow"] == "reject-publish"
    assert "x-quorum-initial-group-size" not in queue_arguments(QueueSpec("q"), "quorum")


def test_a_classic_queue_with_replicas_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="quorum"):
        QueueSpec("q", queue_type="classic", replicas=3)
    with pytest.raises(ConfigurationError, match="quorum"):
        queue_arguments(QueueSpec("q", replicas=3), "classic")
    with pytest.raises(ConfigurationError, match="replicas"):
        QueueSpec("q", replicas=0)


def test_each_new_connection_starts_one_node_further_along_the_list() -> None:
    urls = [f"amqp://u:p@127.0.0.1:{port}//" for port in (1, 2, 3)]
    transport = AmqpTransport(";".join(urls))
    ports = [transport.connection().port for _ in range(4)]
    first = ports[0] - 1  # a random node: processes spread over the cluster
    assert ports == [(first + i) % 3 + 1 for i in range(4)]


# -- on a cluster -------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """Three RabbitMQ nodes clustered on loopback ports of their own (files in a new
    folder under /tmp: the nodes run as the rabbitmq user, who cannot enter pytest's)."""
    from reliability.rabbit_cluster import RabbitCluster

    group = RabbitCluster()
    try:
        group.start()
    except Exception as exc:
        group.stop()
        message = f"a 3-node RabbitMQ cluster could not start: {type(exc).__name__}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI requires it", pytrace=False)
        pytest.skip(message)
    try:
        yield group
    finally:
        group.stop()


@pytest.mark.integration
def test_tasks_run_through_a_leader_node_killed_under_load(cluster: object) -> None:
    """Given a worker and a publisher on the failover list of a 3-node cluster,
    when the node leading the task queue is killed mid-stream, then every
    confirmed task runs, no publish fails, and a new process can still declare
    the queue (the delay ladder's classic queues on the dead node are skipped)."""
    from reliability.rabbit_cluster import RabbitCluster

    assert isinstance(cluster, RabbitCluster)
    name = unique_name("cluster")
    app = App(
        "t",
        broker=cluster.url,
        queues=[QueueSpec(name, replicas=3)],
        default_queue=name,
        heartbeat=5,
        publish_timeout=10,
        publish_retries=6,
    )
    ran: set[int] = set()
    lock = threading.Lock()

    @app.task
    def record(n: int) -> None:
        with lock:
            ran.add(n)

    try:
        app.declare([name])
        # Replicated on every node, moved on at least once by the broker.
        assert len(cluster.members(name)) == 3
        leader = cluster.queue_home(name)
        assert leader is not None
        with running_worker(app, concurrency=2) as worker:
            for n in range(50):
                record.delay(n)
            drain(worker, timeout=30)
            cluster.kill(leader)
            for n in range(50, 150):
                record.delay(n)
            drain(worker, timeout=60)
        assert ran == set(range(150))
        assert cluster.queue_home(name) not in (None, leader)  # a new leader took over
        fresh = App("t", broker=cluster.url, queues=[QueueSpec(name, replicas=3)])
        try:
            fresh.declare([name])
        finally:
            fresh.close()
    finally:
        app.close()
