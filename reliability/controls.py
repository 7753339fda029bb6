"""The negative controls N1-N3: set-ups that must lose tasks.

A harness that cannot see loss proves nothing, so each control breaks a
guarantee on purpose (confirms off, a volatile Redis, an early ack) and passes
only if the ledger shows lost ids.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .harness import Harness
from .profiles import BrokerProfile
from .steps import finish, sigkill_while_publishing, wmix_timeout

__all__ = ["n1", "n2", "n3"]


def n1(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Confirms off, transient messages, kill -9 of RabbitMQ mid-publish: must lose."""
    with h.run("N1", broker, queue_type="classic") as run:
        started = time.time()
        n = h.profile.n(10000)
        stop = threading.Event()
        progress = {"n": 0}
        half = threading.Event()

        def on_progress(i: int) -> None:
            progress["n"] = i
            if i >= n // 2:
                half.set()

        pub = threading.Thread(
            target=run.publish_raw_unconfirmed,
            args=(n,),
            kwargs={"stop": stop, "progress": on_progress},
        )
        pub.start()
        while not half.wait(0.1) and pub.is_alive():
            pass
        node = h.rabbit_node()
        f = run.fault("kill -9 rabbitmq", published_before=progress["n"])
        node.kill()
        pub.join(30)
        stop.set()
        f["restart_s"] = round(node.restart(), 1)
        run.pool.start()
        _, c = finish(run, wmix_timeout(run, n))
        run.check("harness_detects_loss", c.lost > 0, c.lost, "> 0 (negative control)")
        return run.result(c, started=started)


def n2(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Redis without persistence, SHUTDOWN NOSAVE before consumption: must lose."""
    with h.run("N2", broker) as run:
        started = time.time()
        n = h.profile.n(10000)
        run.publish_all(run.wmix_jobs(n, noop=True))
        server = h.redis_server("RV")
        run.fault("SHUTDOWN NOSAVE + restart")
        server.shutdown_nosave()
        server.restart()
        run.pool.start()
        _, c = finish(run, 120)
        run.check("harness_detects_loss", c.lost > 0, c.lost, "> 0 (negative control)")
        return run.result(c, started=started)


def n3(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Early ack (test-only worker), SIGKILL a worker 5 times: must lose."""
    with h.run("N3", broker, early_ack=True) as run:
        started = time.time()
        n = h.profile.n(10000)
        sigkill_while_publishing(run, n, spread=0.7)
        _, c = finish(run, wmix_timeout(run, n))
        run.check("harness_detects_loss", c.lost > 0, c.lost, "> 0 (negative control)")
        return run.result(c, started=started)
