"""S14: credential redaction.

S14 runs a short W-mix workload with broker URLs holding random passwords (on
RabbitMQ a failover list whose first entry, a second broker that is down, has a
second password), a task whose error quotes the URL and its passwords and ends
in the dead-letter queue, a publish with a password the broker refuses, the
CLI (``status``, ``dlq ls``, ``dlq show``, a worker that cannot reach its
broker), and the ``repr()``/``str()`` of the app, its settings and transport.
It counts every password in all of that, and in the raw dead-letter entries; the
result holds counts and places, never a password.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

import kombu

from mqtasks.config import Settings
from mqtasks.exceptions import MQTasksError
from mqtasks.transport import RedisTransport
from mqtasks.transport.base import dead_letter_spec
from mqtasks.transport.kombu import KombuTransport

from ..brokers import free_port
from ..harness import Harness
from ..ledger import Event, classify
from ..profiles import BrokerProfile
from ..run import Run
from ..tasks import build_app
from ..workload import Job
from .probes import (
    WORKER_PROBE_TIMEOUT,
    captured,
    finish_cli,
    probe_publish,
    scrub,
    scrubbed_errors,
    start_cli,
)

__all__ = ["LeakScan", "s14"]


class LeakScan:
    """Counts passwords in texts by category and place; never keeps a password."""

    def __init__(self, passwords: Mapping[str, str]) -> None:
        self.passwords = {label: p for label, p in passwords.items() if p}
        self.texts: dict[str, int] = {}
        self.chars: dict[str, int] = {}
        self.found: dict[str, list[dict[str, Any]]] = {}

    def scan(self, category: str, place: str, text: str | bytes) -> int:
        """Count every password in ``text``; return the total; remember the place if any."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        self.texts[category] = self.texts.get(category, 0) + 1
        self.chars[category] = self.chars.get(category, 0) + len(text)
        counts = {label: text.count(p) for label, p in self.passwords.items() if p in text}
        if counts:
            self.found.setdefault(category, []).append({"place": place, "counts": counts})
        return sum(counts.values())

    def figure(self, category: str) -> dict[str, Any]:
        """Occurrences by password label, places, and how much was scanned."""
        places = self.found.get(category, [])
        total: dict[str, int] = {}
        for p in places:
            for label, n in p["counts"].items():
                total[label] = total.get(label, 0) + n
        return {
            "occurrences": total,
            "places": places[:20],
            "texts_scanned": self.texts.get(category, 0),
            "chars_scanned": self.chars.get(category, 0),
        }

    def check(self, run: Run, category: str) -> None:
        """Pass if no password was found in ``category`` and something was scanned."""
        fig = self.figure(category)
        run.check(
            f"no_password_in_{category}",
            not fig["occurrences"] and fig["texts_scanned"] > 0,
            fig,
            "0 occurrences (of every password), in at least one text",
        )


def _url_with(url: str, password: str, port: int | None = None) -> str:
    """``url`` (one broker) with another password, and another port if given."""
    scheme, rest = url.split("://", 1)
    userinfo, hostpart = rest.split("@", 1)
    user = userinfo.split(":", 1)[0]
    if port is not None:
        host, tail = hostpart.split(":", 1)
        hostpart = f"{host}:{port}{tail[tail.index('/') :]}"
    return f"{scheme}://{user}:{password}@{hostpart}"


def _broker_password(h: Harness, broker: BrokerProfile) -> str:
    if broker in ("RQ", "RC"):
        return h.rabbit_node().password
    return h.redis_server(broker).password  # type: ignore[arg-type]


def s14(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Credential redaction: broker passwords appear 0 times in logs, errors, CLI
    output, reprs and dead-letter entries."""
    started = time.time()
    with h.run("S14", broker) as run:
        passwords = {
            "broker": _broker_password(h, broker),
            "failover": secrets.token_urlsafe(12),
            "wrong": secrets.token_urlsafe(12),
        }
        with scrubbed_errors(passwords):
            result = _s14(run, passwords, started)
    return scrub(result, passwords)


def _s14(run: Run, passwords: dict[str, str], started: float) -> dict[str, Any]:
    scan = LeakScan(passwords)
    single = run.url
    probe_q = f"{run.queue}.probe"
    dead_port = free_port()
    failover_entry = _url_with(single, passwords["failover"], dead_port)
    if not run.is_redis:  # a second user on the down broker: its own name and password
        failover_entry = failover_entry.replace("://rel:", "://rel2:", 1)
    down_first = f"{failover_entry};{single}"

    # Does the transport take a failover list? delay() with the first broker down.
    probe = probe_publish(down_first, probe_q, retries=3)
    scan.scan("publisher_errors", "delay() with the failover list", probe.shown)
    scan.scan("harness_logs", "log events of delay() with the failover list", _dump(probe.logs))
    supported = probe.outcome == "connected"
    run.extra["failover_list"] = {"supported": supported, **probe.summary()}
    run.notes.append(
        "workload: S0-like W-mix plus error paths; the protocol's S3, S5 and S7 runs are "
        "not repeated with these URLs here (their brokers' URLs hold random passwords too, "
        "but their output is not scanned)"
    )
    if supported:
        # The run's own list names the live broker first and the down one second,
        # as a primary and its standby: workers never have to switch.
        url = f"{single};{failover_entry}"
    else:
        url = single
        run.notes.append(
            f"{single.split('://')[0]}:// takes no failover list: a 'first;second' URL is "
            "accepted but only its first broker is used (delay() raised when it was down); "
            "the second password is still scanned for in every text"
        )
    # The scanner itself finds each password where it is known to be.
    wrong = _url_with(single, passwords["wrong"])
    if supported:
        wrong = f"{failover_entry};{wrong}"
    self_test = LeakScan(passwords)
    self_test.scan("self_test", "the URLs of this run", f"{down_first} {wrong}")
    found = self_test.figure("self_test")["occurrences"]
    run.check(
        "scanner_finds_passwords", len(found) == len(passwords), found, ">= 1 of each password"
    )

    # The run's app and workers use the URL with the passwords; debug logs.
    run.env["MQTASKS_BROKER_URL"] = url
    run.pool.env["MQTASKS_BROKER_URL"] = url
    run.pool.argv = [*run.pool.argv, "--log-level", "debug"]
    run.app.close()
    run.app = build_app(run.env)

    # An S0-like workload with one task whose error quotes the URL and passwords.
    n = run.profile.n(1000)
    jobs = run.wmix_jobs(n)
    leak_id = run.new_id()
    jobs.insert(len(jobs) // 2, Job("rel.leak", (leak_id,)))
    run.pool.start()
    time.sleep(1.5)
    with captured() as logs:
        run.start_publisher(jobs, rate=None)
        quiet = run.wait_quiescent(max(120.0, n * 0.15 + 60))
    run.check("quiescent", quiet, quiet, "queues empty, ledger quiet")
    scan.scan("harness_logs", "log events of the workload's publisher", _dump(logs))
    run.extra["dlq_entries"] = run.drain_dead_letters()
    events = run.events()
    c = classify(events)
    run.standard_checks(c, dead=1)
    run.check("executed_all", c.executed == n, c.executed, str(n))
    leak_text = _leak_exception(events, leak_id)
    run.check(
        "leak_error_in_dlq",
        "lost the broker at" in leak_text and "**" in leak_text,
        {"reason": _leak_reason(events, leak_id), "masked": "**" in leak_text},
        "rel.leak dead-lettered with its error text, passwords masked",
    )

    # Raw dead-letter entries (and on Redis every key of the run).
    _scan_raw(run, scan)

    # A broker that refuses the password; an unreachable one.
    refused = probe_publish(wrong, probe_q, retries=3 if supported else 0)
    scan.scan("publisher_errors", "delay() with a refused password", refused.shown)
    scan.scan("harness_logs", "log events of delay() with a refused password", _dump(refused.logs))
    unreachable_url = _url_with(single, passwords["broker"], free_port())
    if supported:
        unreachable_url = f"{failover_entry};{unreachable_url}"
    unreachable = probe_publish(unreachable_url, probe_q)
    scan.scan("publisher_errors", "delay() to an unreachable broker", unreachable.shown)
    scan.scan("harness_logs", "log events of delay() unreachable", _dump(unreachable.logs))
    run.check(
        "refused_and_unreachable_raise",
        refused.outcome == "refused" and unreachable.outcome == "refused",
        {"wrong_password": refused.summary(120), "unreachable": unreachable.summary(120)},
        "delay() raises",
    )

    # The CLI: status, dlq ls / show, a worker that cannot reach its broker.
    run.extra["cli"] = _run_cli(run, scan, url, wrong, unreachable_url, leak_id)

    # repr() and str() of what a user may print.
    _scan_reprs(run, scan)

    # The probe queue (RabbitMQ: the failover probe's message landed there).
    if not run.is_redis:
        spec = run.app.queue(probe_q)
        with contextlib.suppress(MQTasksError):
            run.app.transport.delete([spec, dead_letter_spec(spec)])

    # Worker logs: every file.
    for path in sorted((run.dir / "logs").glob("worker-*.log")):
        scan.scan("worker_logs", f"logs/{path.name}", path.read_bytes())

    for category in (
        "worker_logs",
        "publisher_errors",
        "harness_logs",
        "cli_output",
        "reprs",
        "dlq_raw",
    ):
        scan.check(run, category)
    if run.is_redis:
        scan.check(run, "broker_raw")
    return run.result(c, started=started)


def _dump(logs: list[MutableMapping[str, Any]]) -> str:
    return json.dumps(logs, default=str)


def _leak_exception(events: list[Event], task_id: str) -> str:
    dead = [e for e in events if e.kind == "dead" and e.id == task_id]
    return str(dead[0].info.get("exception") or "") if dead else ""


def _leak_reason(events: list[Event], task_id: str) -> str | None:
    dead = [e for e in events if e.kind == "dead" and e.id == task_id]
    return str(dead[0].info.get("reason")) if dead else None


def _scan_raw(run: Run, scan: LeakScan) -> None:
    """Read the dead-letter queue's entries as stored (body, headers, properties)."""
    dlq = dead_letter_spec(run.app.queue(run.queue)).name
    entries = 0
    if run.is_redis:
        transport = run.app.transport
        assert isinstance(transport, RedisTransport)
        client = run.harness.redis_server(run.broker).client()  # type: ignore[arg-type]
        try:
            for raw in client.lrange(transport.queue_key(dlq), 0, -1):
                entries += 1
                scan.scan("dlq_raw", f"{dlq} entry {entries}", raw)
            for key in client.scan_iter(match=f"{run.key_prefix}*"):
                scan.scan("broker_raw", f"key {key!r}", _redis_value(client, key))
        finally:
            client.close()
    else:
        node = run.harness.rabbit_node()
        with kombu.Connection(node.plain_url, connect_timeout=10) as conn:
            queue = kombu.Queue(dlq, no_declare=True).bind(conn.channel())
            while True:  # unacked: they go back to the queue when the channel closes
                message = queue.get(no_ack=False)
                if message is None:
                    break
                entries += 1
                scan.scan("dlq_raw", f"{dlq} entry {entries} body", message.body or b"")
                scan.scan(
                    "dlq_raw",
                    f"{dlq} entry {entries} headers and properties",
                    json.dumps(
                        {"headers": message.headers, "properties": message.properties},
                        default=str,
                    ),
                )
    run.extra["dlq_raw_entries"] = entries


def _redis_value(client: Any, key: bytes) -> bytes:
    kind = client.type(key)
    if kind == b"list":
        return b"\n".join(client.lrange(key, 0, -1))
    if kind == b"zset":
        return b"\n".join(client.zrange(key, 0, -1))
    if kind == b"hash":
        return b"\n".join(k + b"=" + v for k, v in client.hgetall(key).items())
    if kind == b"set":
        return b"\n".join(client.smembers(key))
    if kind == b"string":
        return bytes(client.get(key) or b"")
    return b""


def _run_cli(
    run: Run, scan: LeakScan, url: str, wrong: str, unreachable: str, leak_id: str
) -> dict[str, Any]:
    env = {**run.pool.env, "MQTASKS_BROKER_URL": url}
    failing = {"MQTASKS_CONNECT_TIMEOUT": "3", "MQTASKS_PUBLISH_RETRIES": "0"}
    mq = [sys.executable, "-m", "mqtasks"]
    app = ["-A", "reliability.tasks"]
    commands: dict[str, tuple[list[str], dict[str, str]]] = {
        "status": ([*mq, "status", *app], env),
        "status --json": ([*mq, "status", *app, "--json"], env),
        "dlq ls": ([*mq, "dlq", "ls", *app, run.queue], env),
        "dlq show": ([*mq, "dlq", "show", *app, leak_id, "--queue", run.queue], env),
        "dlq show --json": ([*mq, "dlq", "show", *app, leak_id, "--queue", run.queue, "--json"], env),
        "status, refused password": (
            [*mq, "status", *app], {**env, **failing, "MQTASKS_BROKER_URL": wrong}
        ),
        "worker, unreachable broker": (
            [*mq, "worker", *app, "--log-level", "debug", "--log-format", "json"],
            {**env, **failing, "MQTASKS_BROKER_URL": unreachable},
        ),
    }  # fmt: skip
    # The dlq commands one after another (on RabbitMQ a listing holds the entries
    # unacked while it reads them); the others meanwhile.
    procs = {name: start_cli(argv, e) for name, (argv, e) in commands.items() if "dlq" not in name}
    results: dict[str, tuple[int | None, str, str]] = {}
    for name, (argv, e) in commands.items():
        if "dlq" in name:
            results[name] = finish_cli(start_cli(argv, e), WORKER_PROBE_TIMEOUT)
    for name, proc in procs.items():
        results[name] = finish_cli(proc, WORKER_PROBE_TIMEOUT)
    out: dict[str, Any] = {}
    for name in commands:
        code, stdout, stderr = results[name]
        scan.scan("cli_output", f"{name}: stdout", stdout)
        scan.scan("cli_output", f"{name}: stderr", stderr)
        out[name] = {"exit_code": code, "stdout_chars": len(stdout), "stderr_chars": len(stderr)}
        if name == "dlq ls":
            out[name]["lists_the_entry"] = leak_id in stdout
        if name == "dlq show":
            out[name]["shows_masked_error"] = "**" in stdout and "lost the broker" in stdout
        if name.startswith("worker"):
            out[name]["start_failed_logged"] = "worker.start_failed" in stderr + stdout
    ok = (
        all(out[n]["exit_code"] == 0 for n in ("status", "status --json", "dlq ls", "dlq show"))
        and out["dlq show --json"]["exit_code"] == 0
        and out["dlq ls"]["lists_the_entry"]
        and out["dlq show"]["shows_masked_error"]
        and out["status, refused password"]["exit_code"] not in (0, None)
        and out["worker, unreachable broker"]["exit_code"] not in (0, None)
        and out["worker, unreachable broker"]["start_failed_logged"]
    )
    run.check(
        "cli_ran",
        ok,
        out,
        "status and dlq exit 0 and show the entry; refused/unreachable ones exit non-zero",
    )
    return out


def _scan_reprs(run: Run, scan: LeakScan) -> None:
    app = run.app
    transport = app.transport
    shown: dict[str, Any] = {
        "app": app,
        "app.settings": app.settings,
        "app.settings.tls": app.settings.tls,
        "app.transport": transport,
        "Settings.from_env": Settings.from_env(run.env),
    }
    if isinstance(transport, RedisTransport):
        client = transport.client()
        shown |= {
            "transport.client()": client,
            "transport.client().connection_pool": client.connection_pool,
            "transport.pool_connection()": transport.pool_connection(),
            "transport.publisher()": transport.publisher(),
        }
    else:
        assert isinstance(transport, KombuTransport), transport
        conn = transport.connection()
        shown |= {"transport.connection()": conn, "connection.as_uri()": conn.as_uri()}
    for name, obj in shown.items():
        scan.scan("reprs", f"repr({name})", repr(obj))
        scan.scan("reprs", f"str({name})", str(obj))
    if not isinstance(transport, RedisTransport):
        shown["transport.connection()"].release()
    run.extra["reprs_scanned"] = sorted(shown)
