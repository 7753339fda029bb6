"""The faults of S1, S3 and S5 on the PG profile (the ``postgresql://`` broker).

The scenarios are the protocol's; what differs on PostgreSQL is how a fault is
made and one figure. A SIGKILLed worker's messages come back when their lease
(``locked_until``, 30 s by default) runs out and a consumer polls again
(``poll_interval``, 5 s), as on Redis with its visibility timeout, so S1 allows
lease + poll + 5 s. The server restart (S3) is ``pg_ctl stop -m fast`` and a
start after 5 s, then a ``kill -9`` of the postmaster and its backends (WAL
recovery at the start). Connections are closed from the server side (S5) with
``pg_terminate_backend``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .broker_faults import _broker_restart_run, _detections
from .steps import finish, sleep_until, wmix_timeout

if TYPE_CHECKING:
    from .harness import Harness
    from .postgres_server import PostgresServer
    from .profiles import BrokerProfile
    from .run import Run

__all__ = ["s3_pg", "s5_pg"]


def _server(run: Run) -> PostgresServer:
    return run.harness.group(run.broker)  # type: ignore[return-value]


def _graceful(run: Run) -> float:
    server = _server(run)
    server.stop_fast()
    time.sleep(5)
    return server.restart()


def _kill(run: Run) -> float:
    server = _server(run)
    server.kill()
    return server.restart()


def s3_pg(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """PostgreSQL restart under load: ``pg_ctl stop -m fast`` + start after 5 s, then kill -9."""
    return _broker_restart_run(
        h,
        broker,
        "S3",
        [("pg_ctl stop -m fast/start", _graceful), ("kill -9 postgres", _kill)],
    )


def s5_pg(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Connections ended by the server 5 times, cut by the proxy (RST) 3 times, then a black hole."""
    release = h.profile.name == "release"
    gap = 20.0 if release else 5.0
    hole = 45.0 if release else 30.0
    with h.run("S5", broker, proxy=True) as run:
        assert run.proxy is not None
        started = time.time()
        n = h.profile.n(10000)
        rate = min(200.0, n / (2 + 8 * gap + hole + 20))
        run.extra["publish_rate"] = round(rate, 1)
        run.pool.start()
        time.sleep(1.5)
        run.start_publisher(run.wmix_jobs(n), rate=rate)
        server = _server(run)
        for i in range(8):
            sleep_until(run, 2 + i * gap)
            if i < 5:
                f = run.fault("pg_terminate_backend (server side)", at=time.time())
                f["closed"] = server.terminate_clients()
            else:
                f = run.fault("proxy RST", at=time.time())
                f["cut"] = run.proxy.cut()
        sleep_until(run, 2 + 8 * gap)
        f = run.fault("black hole", at=time.time(), seconds=hole)
        run.proxy.blackhole(True)
        time.sleep(hole)
        f["reset_after"] = run.proxy.blackhole(False)
        f["back_at"] = time.time()
        events, c = finish(run, wmix_timeout(run, n, 120))
        f["detected_after_s"] = _detections(run, f["at"], f["back_at"])
        f["recovery_s"] = run.first_done_after(events, f["back_at"])
        run.standard_checks(
            c, dup_bound=run.bound(5 + 3 + 1, processes_hit=run.workers), publish_failed=None
        )
        detected = list(f["detected_after_s"].values())
        run.check(
            "black_hole_detected_s",
            len(detected) >= len(run.pool.pids())
            and all(d is not None and d <= 25 for d in detected),
            f["detected_after_s"],
            "every worker <= 25 s (TCP keepalive: idle 10 s + 3 x 5 s)",
        )
        worst = max(run.publisher.stats.latencies, default=0.0) if run.publisher else 0.0
        run.check(
            "delay_bounded", worst <= 11.0, round(worst, 2), "<= publish_timeout (10 s) + 1 s"
        )
        run.check(
            "worker_resumes_s",
            f["recovery_s"] is not None and f["recovery_s"] <= 15,
            f["recovery_s"],
            "<= 15 s after the black hole ends",
        )
        return run.result(c, started=started)
