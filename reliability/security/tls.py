"""S13: transport security.

S13 makes a throw-away certificate authority in the run's directory, starts a
RabbitMQ node and Redis servers of its own with TLS listeners (never the
harness's plain brokers, never the machine's shared ones), and checks the
protocol's matrix: a verified connection runs tasks through a real worker
process; a certificate from an unknown CA, or one for ``other.example`` while
connecting to ``localhost``, is refused; a ``rediss://`` (or ``amqps://``) URL
with no TLS options verifies against the system's CAs and so refuses the
self-signed broker; the explicit opt-out (``verify=False``) connects and logs
``tls.unverified``. Message signing is reported as offered or not: mqtasks
offers none.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import ssl
import time
from typing import Any

from mqtasks import App
from mqtasks.config import Settings, TLSOptions, mask_url
from mqtasks.transport import RedisTransport
from mqtasks.transport.kombu import KombuTransport

from ..brokers import RabbitNode, RedisServer, TlsFiles, listening_beyond_loopback
from ..harness import Harness
from ..ledger import LedgerWriter, classify
from ..pki import Pki, TlsFront, make_pki
from ..profiles import BrokerProfile
from ..publisher import Publisher
from ..run import Run
from ..tasks import build_app
from ..workers import WorkerPool, worker_argv
from ..workload import Job
from .probes import (
    Probe,
    captured,
    json_lines,
    probe_publish,
    scrub,
    scrubbed_errors,
    start_cli,
    worker_cli_argv,
    worker_probe,
)

__all__ = ["s13"]

#: What an error says when the TLS handshake refused the broker's certificate.
TLS_REFUSED = re.compile(r"certificate verify failed|TLS certificate of the broker", re.I)
#: What it says when the certificate names another host.
HOSTNAME_REFUSED = re.compile(r"hostname mismatch|doesn't match|not valid for 'localhost'", re.I)


def _tls_cell(probe: Probe, want: re.Pattern[str]) -> bool:
    return (
        probe.outcome == "refused"
        and bool(TLS_REFUSED.search(probe.text))
        and bool(want.search(probe.text))
    )


def _signing_offered() -> bool:
    """Whether mqtasks has a message-signing setting (it has none as of this harness)."""
    return any("sign" in f.name for f in dataclasses.fields(Settings))


def s13(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Transport security: verified TLS works; a wrong CA, a wrong host name and
    no options are refused; the explicit opt-out connects with a warning."""
    started = time.time()
    base = h.workdir / f"S13-{broker}-tls-{secrets.token_hex(3)}"
    base.mkdir(parents=True)
    base.chmod(0o755)  # the RabbitMQ node runs as another user below it
    pki = make_pki(base / "pki", ca_name="mqtasks reliability S13 CA")
    good = TlsFiles(pki.ca, pki.server_cert, pki.server_key)
    tls_h = Harness(base, h.profile, h.seed)
    front: TlsFront | None = None
    other: RedisServer | None = None
    passwords: dict[str, str] = {}
    try:
        if broker in ("RQ", "RC"):
            node = tls_h.rabbit = RabbitNode(base / "rabbit", tls=good)
            tls_h.startup_s["rabbitmq-tls"] = round(node.start(), 1)
            front = TlsFront(pki.other_cert, pki.other_key, node.port)
            good_url = node.url
            other_url = f"amqps://{node.user}:{node.password}@localhost:{front.port}//"
            no_options = {"amqps": good_url}
            passwords["broker"] = node.password
            pids = node.pids()
        else:
            server = tls_h.redis["RD"] = RedisServer("RD", base / "redis", tls=good)
            tls_h.startup_s["redis-tls"] = round(server.start(), 1)
            other = RedisServer(
                "RD", base / "redis-other", tls=TlsFiles(pki.ca, pki.other_cert, pki.other_key)
            )
            tls_h.startup_s["redis-tls-other"] = round(other.start(), 1)
            good_url = server.url
            other_url = other.url
            no_options = {
                "rediss": good_url,
                "rediss+kombu": good_url.replace("rediss://", "rediss+kombu://", 1),
            }
            passwords |= {"broker": server.password, "other": other.password}
            pids = server.pids() + other.pids()
        with tls_h.run("S13", broker, workers=1) as run:
            run.extra["tls_brokers"] = {"startup_s": tls_h.startup_s}
            bad = listening_beyond_loopback(pids)
            run.check("tls_brokers_loopback_only", not bad, bad, "nothing beyond 127.0.0.1")
            with scrubbed_errors(passwords):
                result = _s13_matrix(run, pki, good_url, other_url, no_options, started)
        return scrub(result, passwords)
    finally:
        if front is not None:
            front.close()
        if other is not None:
            other.stop()
        tls_h.close()


def _s13_matrix(
    run: Run,
    pki: Pki,
    good_url: str,
    other_url: str,
    no_options: dict[str, str],
    started: float,
) -> dict[str, Any]:
    ca = str(pki.ca)
    matrix: dict[str, Any] = {}
    # The run's app and workers trust the scenario's CA.
    run.app.settings = run.app.settings.replace(tls=TLSOptions(ca_file=ca))
    for env in (run.env, run.pool.env):
        env["MQTASKS_TLS_CA_FILE"] = ca

    # a. the right CA, a certificate for localhost: tasks run end to end.
    n = run.profile.n(100, minimum=10)
    run.pool.start()
    with captured() as logs_a:
        run.publish_all(run.wmix_jobs(n, noop=True))
    quiet = run.wait_quiescent(60)
    run.check("quiescent", quiet, quiet, "within 60 s")
    tls_evidence = _tls_evidence(run)
    run.pool.stop(timeout=10)
    executed_a = len({e.id for e in run.events() if e.kind == "done"})
    matrix["a_verified"] = {
        "url": _shown_url(good_url),
        "published": n,
        "executed": executed_a,
        "tls": tls_evidence["figure"],
        "publisher_log_events": len(logs_a),
    }
    run.check(
        "a_verified_tls_runs_tasks",
        executed_a == n and tls_evidence["ok"],
        {"executed": executed_a, "tls": tls_evidence["figure"]},
        f"{n} executed by a worker process over TLS",
    )

    # b, c, e: refused, by delay() and by a worker process; the workers start together.
    probe_q = f"{run.queue}.probe"
    worker_env = dict(run.pool.env)
    worker_env.pop("MQTASKS_TLS_CA_FILE", None)
    worker_env["MQTASKS_CONNECT_TIMEOUT"] = "5"
    cells: dict[str, tuple[str, dict[str, str], TLSOptions | None, re.Pattern[str]]] = {
        "b_wrong_ca": (good_url, {"MQTASKS_TLS_CA_FILE": str(pki.rogue_ca)},
                       TLSOptions(ca_file=str(pki.rogue_ca)), TLS_REFUSED),
        "c_other_host": (other_url, {"MQTASKS_TLS_CA_FILE": ca},
                         TLSOptions(ca_file=ca), HOSTNAME_REFUSED),
    }  # fmt: skip
    for scheme, url in no_options.items():
        cells[f"e_{scheme}_no_options"] = (url, {}, None, TLS_REFUSED)
    # The harness's app cannot run on rediss+kombu:// (kombu's Redis transport holds
    # retry delays in the worker, and mqtasks refuses that configuration before it
    # connects): that cell is checked with delay() and the transport's settings only.
    procs = {
        cell: start_cli(
            worker_cli_argv("--log-format", "json"),
            {**worker_env, **env, "MQTASKS_BROKER_URL": url},
        )
        for cell, (url, env, _, _) in cells.items()
        if "+kombu" not in url
    }
    for cell, (url, _, tls, want) in cells.items():
        published = probe_publish(url, probe_q, tls=tls)
        figure: dict[str, Any] = {"url": _shown_url(url), "delay": published.summary()}
        ok = _tls_cell(published, want)
        if cell in procs:
            worker = worker_probe(procs[cell])
            figure["worker"] = worker.summary()
            ok = ok and _tls_cell(worker, want)
        else:
            figure["worker"] = "not run: the harness's app needs mqtasks' own Redis transport"
        if cell.startswith("e_"):
            verify = _default_verification(url)
            figure["default_verification"] = verify
            ok = ok and verify["verified"]
        matrix[cell] = figure
        run.check(cell, ok, figure, "refused by certificate verification (delay and worker)")

    # d. message signing.
    if _signing_offered():
        matrix["d_signing"] = "offered, not exercised by this scenario"
        run.check("d_signing", False, matrix["d_signing"], "tampered or replayed -> DLQ")
    else:
        matrix["d_signing"] = "not offered"
        run.notes.append(
            "d (signing): mqtasks offers no message signing, so tampered or replayed "
            "messages cannot be refused by signature; reported, not passed"
        )

    # Opt-out: TLSOptions(verify=False) / MQTASKS_TLS_VERIFY=false reaches the
    # other.example endpoint, runs tasks there, and warns.
    matrix["opt_out"] = _opt_out(run, other_url)
    run.check(
        "opt_out_connects_and_warns",
        matrix["opt_out"]["ok"],
        {k: v for k, v in matrix["opt_out"].items() if k != "ok"},
        "tasks run over the unverified connection; tls.unverified logged as a warning "
        "by the publisher and the worker",
    )

    run.extra["matrix"] = matrix
    run.extra["dlq_entries"] = run.drain_dead_letters()
    c = classify(run.events())
    run.standard_checks(c)
    return run.result(c, started=started)


def _shown_url(url: str) -> str:
    return mask_url(url)


def _tls_evidence(run: Run) -> dict[str, Any]:
    """Proof that the workload went over TLS: RabbitMQ lists its connections' ``ssl``
    flag; the Redis server has no plain port, so a plain client must fail."""
    if run.is_redis:
        server = run.harness.redis_server(run.broker)  # type: ignore[arg-type]
        import redis

        plain = redis.Redis(
            host="127.0.0.1", port=server.port, password=server.password, socket_timeout=3
        )
        try:
            plain.ping()
            refused = False
        except redis.RedisError:
            refused = True
        finally:
            plain.close()
        return {"ok": refused, "figure": {"plain_client_refused": refused}}
    node = run.harness.rabbit_node()
    out = node.ctl("list_connections", "-q", "--no-table-headers", "ssl", "ssl_protocol")
    rows = [line.split() for line in out.splitlines() if line.strip()]
    flags = [r[0] for r in rows]
    protocols = sorted({r[1] for r in rows if len(r) > 1})
    ok = bool(rows) and all(f == "true" for f in flags)
    return {"ok": ok, "figure": {"connections": len(rows), "ssl": flags, "protocols": protocols}}


def _default_verification(url: str) -> dict[str, Any]:
    """What mqtasks configures for ``url`` with no TLS options: certificate and host
    name checked (never ``CERT_NONE``)."""
    app = App("reliability-probe", broker=url)
    try:
        transport = app.transport
        if isinstance(transport, RedisTransport) or "rediss" in url:
            kwargs = transport.tls.redis_kwargs()
            reqs, host = str(kwargs["ssl_cert_reqs"]), bool(kwargs["ssl_check_hostname"])
            verified = reqs == "required" and host
            if "+kombu" in url:  # what kombu's Redis transport is handed
                assert isinstance(transport, KombuTransport), transport
                handed = transport.kombu_ssl()
                verified = verified and isinstance(handed, dict) and handed == kwargs
        else:
            assert isinstance(transport, KombuTransport), transport
            handed = transport.kombu_ssl()
            options = handed if isinstance(handed, dict) else {}
            reqs = str(options.get("cert_reqs"))
            host = options.get("server_hostname") == "localhost"
            verified = options.get("cert_reqs") == ssl.CERT_REQUIRED and host
        return {"verified": verified, "cert_reqs": reqs, "checks_hostname": host}
    finally:
        app.close()


def _opt_out(run: Run, other_url: str) -> dict[str, Any]:
    env = {k: v for k, v in run.env.items() if k != "MQTASKS_TLS_CA_FILE"}
    env |= {"MQTASKS_BROKER_URL": other_url, "MQTASKS_TLS_VERIFY": "false"}
    pool = WorkerPool(
        worker_argv(concurrency=1, prefetch=4, shutdown_timeout=10, early_ack=False),
        env,
        1,
        run.dir / "logs-opt-out",
        restart=False,
    )
    k = 3
    ids: set[str] = set()
    try:
        pool.start()
        with captured() as logs:
            app = build_app(env)
            app.settings = app.settings.replace(tls=TLSOptions(verify=False))
            publisher = Publisher(
                app, LedgerWriter(run.ledger_dir / "publisher-opt-out.jsonl"), None
            )
            jobs = [Job("rel.work", (run.new_id(), 0)) for _ in range(k)]
            ids = {str(j.args[0]) for j in jobs}
            publisher.start(jobs)
            publisher.join(30)
            shown = _shown_url(other_url)
            app_warned = [
                e for e in logs if e.get("event") == "tls.unverified" and e.get("broker") == shown
            ]
        deadline = time.monotonic() + 30
        done: set[str] = set()
        while time.monotonic() < deadline:
            done = {e.id for e in run.events() if e.kind == "done" and e.id in ids}
            if len(done) == k:
                break
            time.sleep(0.5)
        app.close()
    finally:
        pool.stop(timeout=10)
    worker_warned = [
        e
        for e in json_lines(pool.logs())
        if e.get("event") == "tls.unverified" and e.get("level") == "warning"
    ]
    ok = (
        publisher.stats.errors.total() == 0
        and len(done) == k
        and bool(app_warned)
        and all(e.get("log_level") == "warning" for e in app_warned)
        and bool(worker_warned)
    )
    return {
        "ok": ok,
        "url": _shown_url(other_url),
        "published": k,
        "publish_errors": dict(publisher.stats.errors),
        "executed": len(done),
        "publisher_warnings": len(app_warned),
        "worker_warnings": len(worker_warned),
    }


# -- S14 -----------------------------------------------------------------------------
