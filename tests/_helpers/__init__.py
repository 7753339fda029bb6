"""Helpers the tests share, so that no test module imports another.

* :mod:`~tests._helpers.brokers`: the local brokers' URLs, run-unique names, cleanup;
* :mod:`~tests._helpers.wait`: waiting on a condition with a deadline;
* :mod:`~tests._helpers.cli`: running ``mqtasks`` and its workers as subprocesses;
* :mod:`~tests._helpers.publish`: publishing past mqtasks, as a hostile producer would;
* :mod:`~tests._helpers.statsd`: a real StatsD receiver;
* :mod:`~tests._helpers.servers`: brokers of a test module's own (redis-server, RabbitMQ);
* :mod:`~tests._helpers.faults`: cutting this process's own broker connections;
* :mod:`~tests._helpers.redis`: the ``redis://`` transport consumed by the test itself;
* :mod:`~tests._helpers.crash`: worker subprocesses on ``tests/crash_app.py``, for crash tests.

The loopback TCP proxy is the harness's :class:`reliability.proxy.TcpProxy`.
"""

from __future__ import annotations
