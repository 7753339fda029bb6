"""S13 (transport security) and S14 (credential redaction).

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
import dataclasses
import json
import re
import secrets
import ssl
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import kombu
import structlog

from mqtasks import App
from mqtasks.config import Settings, TLSOptions
from mqtasks.exceptions import MQTasksError
from mqtasks.transport import ReliableRedisTransport
from mqtasks.transport.base import dead_letter_spec

from .brokers import RabbitNode, RedisServer, TlsFiles, free_port, listening_beyond_loopback
from .harness import BrokerProfile, Harness, Job, Publisher, Run
from .ledger import Event, LedgerWriter, classify
from .pki import Pki, TlsFront, make_pki
from .tasks import build_app
from .workers import ROOT, WorkerPool, worker_argv

__all__ = ["Pki", "TlsFront", "make_pki", "s13", "s14"]

#: What an error says when the TLS handshake refused the broker's certificate.
TLS_REFUSED = re.compile(r"certificate verify failed|TLS certificate of the broker", re.I)
#: What it says when the certificate names another host.
HOSTNAME_REFUSED = re.compile(r"hostname mismatch|doesn't match|not valid for 'localhost'", re.I)
#: Seconds a worker process that cannot (or must not) connect may take to exit.
WORKER_PROBE_TIMEOUT = 60.0


# -- probes shared by both scenarios -----------------------------------------------------


@dataclasses.dataclass
class Probe:
    """What one attempt to publish, or to start a worker, came to."""

    #: ``connected`` or ``refused``.
    outcome: str
    #: The error text (str of the exception, or the worker's output), empty if none.
    text: str = ""
    #: Every text a user could see: the exception with its chained causes, or stdout + stderr.
    shown: str = ""
    #: Worker: its exit code (None: it kept running until the timeout).
    code: int | None = None
    #: Log events the harness process emitted meanwhile (captured, never printed).
    logs: list[MutableMapping[str, Any]] = dataclasses.field(default_factory=list)

    def summary(self, limit: int = 300) -> dict[str, Any]:
        """JSON-able figures (error text shortened)."""
        out: dict[str, Any] = {"outcome": self.outcome}
        if self.code is not None or self.outcome == "connected":
            out["exit_code"] = self.code
        if self.text:
            out["error"] = self.text[:limit]
        return out


_capture_lock = threading.Lock()
_captures: list[list[MutableMapping[str, Any]]] = []


def _capture(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: hand events to every open :func:`_captured`, then drop them."""
    with _capture_lock:
        if not _captures:
            return event_dict
        for logs in _captures:
            logs.append({**event_dict, "log_level": method_name})
    raise structlog.DropEvent


@contextlib.contextmanager
def _captured() -> Iterator[list[MutableMapping[str, Any]]]:
    """Collect the harness process's structlog events meanwhile (from every thread:
    the publisher's too), instead of printing them among the JSON results.

    Thread-safe, unlike ``structlog.testing.capture_logs``: the harness runs two
    lanes of scenarios side by side, so a capture may also see the other lane's
    events; callers filter on what they look for.
    """
    logs: list[MutableMapping[str, Any]] = []
    with _capture_lock:
        processors = list(structlog.get_config()["processors"])
        if _capture not in processors:
            structlog.configure(processors=[_capture, *processors])
        _captures.append(logs)
    try:
        yield logs
    finally:
        with _capture_lock:
            for i, open_logs in enumerate(_captures):
                if open_logs is logs:
                    del _captures[i]
                    break


def _probe_publish(
    url: str, queue: str, *, tls: TLSOptions | None = None, retries: int = 0
) -> Probe:
    """Publish one no-op task to ``queue`` at ``url`` from this process."""
    overrides: dict[str, Any] = {"tls": tls} if tls is not None else {}
    with _captured() as logs:
        app = App(
            "reliability-probe",
            broker=url,
            default_queue=queue,
            publish_retries=retries,
            connect_timeout=5.0,
            publish_timeout=10.0,
            **overrides,
        )
        task = app.task(name="rel.probe", max_retries=0)(_noop)
        try:
            task.delay()
        except MQTasksError as exc:
            shown = "".join(traceback.format_exception(exc)) + repr(exc)
            probe = Probe("refused", str(exc), shown)
        else:
            probe = Probe("connected")
        finally:
            app.close()
    probe.logs = list(logs)
    return probe


def _noop() -> None:
    """The probes' task: never run."""


def _worker_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "mqtasks", "worker", "-A", "reliability.tasks", "-c", "1", *extra]


def _start_cli(argv: list[str], env: Mapping[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv,
        env=dict(env),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish_cli(proc: subprocess.Popen[str], timeout: float) -> tuple[int | None, str, str]:
    """Wait for ``proc``; SIGTERM then SIGKILL it past ``timeout``. Return (code or None, out, err)."""
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return None, out, err


def _worker_probe(proc: subprocess.Popen[str]) -> Probe:
    """A worker that must not connect: ``refused`` if it exits with ``worker.start_failed``."""
    code, out, err = _finish_cli(proc, WORKER_PROBE_TIMEOUT)
    shown = out + err
    failed = [line for line in shown.splitlines() if "worker.start_failed" in line]
    if code is not None and code != 0 and failed:
        return Probe("refused", _error_field(failed[0]), shown, code)
    return Probe("connected" if code is None else f"exited {code}", shown[-300:], shown, code)


def _json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among the lines of ``text`` (a worker's log)."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                data = json.loads(line)
                if isinstance(data, dict):
                    out.append(data)
    return out


def _error_field(line: str) -> str:
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return line
    return str(data.get("error") or line)


def _scrub(result: dict[str, Any], passwords: Mapping[str, str]) -> dict[str, Any]:
    """Make sure no password is in the result; one found fails the run (count and label only)."""
    text = json.dumps(result, default=str)
    found = {label: text.count(p) for label, p in passwords.items() if p and p in text}
    if not found:
        return result
    for p in passwords.values():
        if p:
            text = text.replace(p, "<password>")
    clean: dict[str, Any] = json.loads(text)
    clean.setdefault("checks", []).append(
        {"check": "result_without_passwords", "ok": False, "value": found, "want": "0"}
    )
    clean["passed"] = False
    return clean


@contextlib.contextmanager
def _scrubbed_errors(passwords: Mapping[str, str]) -> Iterator[None]:
    """Re-raise an unexpected error without its chain, passwords replaced: the
    harness puts the error and its traceback into the result."""
    try:
        yield
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        for p in passwords.values():
            if p:
                text = text.replace(p, "<password>")
        raise RuntimeError(text) from None


# -- S13 -----------------------------------------------------------------------------


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
            with _scrubbed_errors(passwords):
                result = _s13_matrix(run, pki, good_url, other_url, no_options, started)
        return _scrub(result, passwords)
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
    with _captured() as logs_a:
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
        cell: _start_cli(
            _worker_argv("--log-format", "json"),
            {**worker_env, **env, "MQTASKS_BROKER_URL": url},
        )
        for cell, (url, env, _, _) in cells.items()
        if "+kombu" not in url
    }
    for cell, (url, _, tls, want) in cells.items():
        published = _probe_publish(url, probe_q, tls=tls)
        figure: dict[str, Any] = {"url": _shown_url(url), "delay": published.summary()}
        ok = _tls_cell(published, want)
        if cell in procs:
            worker = _worker_probe(procs[cell])
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
    from mqtasks.config import mask_url

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
        if isinstance(transport, ReliableRedisTransport) or "rediss" in url:
            kwargs = transport.tls.redis_kwargs()
            reqs, host = str(kwargs["ssl_cert_reqs"]), bool(kwargs["ssl_check_hostname"])
            verified = reqs == "required" and host
            if "+kombu" in url:  # what kombu's Redis transport is handed
                handed = transport.kombu_ssl()
                verified = verified and isinstance(handed, dict) and handed == kwargs
        else:
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
        with _captured() as logs:
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
        for e in _json_lines(pool.logs())
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
        with _scrubbed_errors(passwords):
            result = _s14(run, passwords, started)
    return _scrub(result, passwords)


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
    probe = _probe_publish(down_first, probe_q, retries=3)
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
    with _captured() as logs:
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
    refused = _probe_publish(wrong, probe_q, retries=3 if supported else 0)
    scan.scan("publisher_errors", "delay() with a refused password", refused.shown)
    scan.scan("harness_logs", "log events of delay() with a refused password", _dump(refused.logs))
    unreachable_url = _url_with(single, passwords["broker"], free_port())
    if supported:
        unreachable_url = f"{failover_entry};{unreachable_url}"
    unreachable = _probe_publish(unreachable_url, probe_q)
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
        assert isinstance(transport, ReliableRedisTransport)
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
    procs = {name: _start_cli(argv, e) for name, (argv, e) in commands.items() if "dlq" not in name}
    results: dict[str, tuple[int | None, str, str]] = {}
    for name, (argv, e) in commands.items():
        if "dlq" in name:
            results[name] = _finish_cli(_start_cli(argv, e), WORKER_PROBE_TIMEOUT)
    for name, proc in procs.items():
        results[name] = _finish_cli(proc, WORKER_PROBE_TIMEOUT)
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
    if isinstance(transport, ReliableRedisTransport):
        client = transport.client()
        shown |= {
            "transport.client()": client,
            "transport.client().connection_pool": client.connection_pool,
            "transport.pool_connection()": transport.pool_connection(),
            "transport.publisher()": transport.publisher(),
        }
    else:
        conn = transport.connection()
        shown |= {"transport.connection()": conn, "connection.as_uri()": conn.as_uri()}
    for name, obj in shown.items():
        scan.scan("reprs", f"repr({name})", repr(obj))
        scan.scan("reprs", f"str({name})", str(obj))
    if not isinstance(transport, ReliableRedisTransport):
        shown["transport.connection()"].release()
    run.extra["reprs_scanned"] = sorted(shown)
