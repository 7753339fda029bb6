"""Brokers the harness owns: a RabbitMQ node and Redis servers on loopback ports of their own.

The machine's shared brokers (RabbitMQ on 5672, Redis on 6379) are never
touched: every fault here (kill -9, SIGSTOP, restart) hits only processes this
module started, found by the pids it recorded. Everything listens on 127.0.0.1
only; :func:`listening_beyond_loopback` checks that with ``ss``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import redis

__all__ = [
    "BrokerError",
    "RabbitNode",
    "RedisServer",
    "TlsFiles",
    "descendants",
    "free_port",
    "listening_beyond_loopback",
]

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
#: Distribution (inter-node) traffic and epmd stay on loopback.
_LOOPBACK_DIST = "-kernel inet_dist_use_interface {127,0,0,1}"


class BrokerError(RuntimeError):
    """A broker the harness owns did not start, stop or answer as expected."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a broker's TLS listener.

    Args:
        ca: The CA certificate(s) clients of the harness trust.
        cert: The certificate the broker presents.
        key: Its private key.
    """

    ca: Path
    cert: Path
    key: Path

    def copy_to(self, directory: Path) -> TlsFiles:
        """Copy the files into ``directory`` (a broker running as another user reads them there)."""
        directory.mkdir(parents=True, exist_ok=True)
        out = []
        for name, src in (("ca.pem", self.ca), ("cert.pem", self.cert), ("key.pem", self.key)):
            dst = directory / name
            shutil.copyfile(src, dst)
            dst.chmod(0o644)
            out.append(dst)
        return TlsFiles(*out)


def free_port() -> int:
    """Return a loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, *, alive: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``.

    Raises:
        BrokerError: Not within ``timeout`` seconds, or ``alive`` exited first.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            pass
        if alive is not None and alive.poll() is not None:
            raise BrokerError(f"the broker process exited with {alive.returncode} while starting")
        if time.monotonic() > deadline:
            raise BrokerError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")
        time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    """Return the pids of every process below ``pid`` (children first found, then theirs)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _reap(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    if proc is None:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


def listening_beyond_loopback(pids: list[int]) -> list[str]:
    """Return ``ss -ltnp`` lines of sockets owned by ``pids`` bound beyond 127.0.0.1."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=False).stdout
    bad = []
    for line in out.splitlines():
        if not any(f"pid={pid}," in line for pid in pids):
            continue
        local = line.split()[3]
        if not local.startswith("127.0.0.1:"):
            bad.append(line.strip())
    return bad


class RabbitNode:
    """A RabbitMQ node of the harness's own: own name, ports, cookie, mnesia and log dirs.

    Runs as the ``rabbitmq`` user when started by root (RabbitMQ refuses data
    dirs it does not own). Start it once per harness run; restart it only in
    broker-fault scenarios (a start takes about 5-20 s on a 2-core machine).

    Args:
        base: Directory for its files; a new temporary one by default.
        tls: Also listen with TLS on :attr:`tls_port`, presenting these files
            (no client certificates asked); :attr:`url` is then the ``amqps://``
            URL by host name ``localhost``, :attr:`plain_url` the plain one.
    """

    def __init__(self, base: Path | None = None, *, tls: TlsFiles | None = None) -> None:
        self.base = Path(base or tempfile.mkdtemp(prefix="mqtasks-rel-rabbit-"))
        self.port = free_port()
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.tls = tls.copy_to(self.base / "tls") if tls is not None else None
        self.tls_port: int | None = None
        if tls is not None:
            self.tls_port = free_port()
            while self.tls_port in (self.port, self.dist_port):
                self.tls_port = free_port()
        self.name = f"mqtrel{secrets.token_hex(4)}@localhost"
        self.password = secrets.token_urlsafe(12)
        self.user = "rel"
        self.proc: subprocess.Popen[bytes] | None = None
        self._user = _rabbitmq_user()
        self._prepare()

    @property
    def url(self) -> str:
        """URL of the node (its own user and a random password): ``amqps://`` with TLS."""
        if self.tls_port is not None:
            return f"amqps://{self.user}:{self.password}@localhost:{self.tls_port}//"
        return self.plain_url

    @property
    def plain_url(self) -> str:
        """AMQP URL of the node's plain (non-TLS) listener."""
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.port}//"

    def _prepare(self) -> None:
        for sub in ("home", "mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        cookie = self.base / "home" / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        tls = ""
        if self.tls is not None:
            tls = (
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
                f"ssl_options.cacertfile = {self.tls.ca}\n"
                f"ssl_options.certfile = {self.tls.cert}\n"
                f"ssl_options.keyfile = {self.tls.key}\n"
                "ssl_options.verify = verify_none\n"
                "ssl_options.fail_if_no_peer_cert = false\n"
            )
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            f"default_user = {self.user}\n"
            f"default_pass = {self.password}\n"
            # A failing broker alarm would block publishers for reasons of its own.
            "disk_free_limit.absolute = 50MB\n" + tls
        )
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf
        self.base.chmod(0o755)
        if self._user is not None:
            uid, gid = self._user
            for root, dirs, files in os.walk(self.base):
                for name in [*dirs, *files]:
                    os.chown(os.path.join(root, name), uid, gid)
            os.chown(self.base, uid, gid)

    def env(self) -> dict[str, str]:
        """Environment of the node and of ``rabbitmqctl`` calls to it."""
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(self.base / "home"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.base / "rabbit.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": _LOOPBACK_DIST,
            "RABBITMQ_CTL_ERL_ARGS": _LOOPBACK_DIST,
        }

    @property
    def _uid(self) -> int | None:
        return self._user[0] if self._user is not None else None

    @property
    def _gid(self) -> int | None:
        return self._user[1] if self._user is not None else None

    def start(self, timeout: float = 90.0) -> float:
        """Start the node; return the seconds it took to accept connections.

        Raises:
            BrokerError: It did not come up in time (its log is in ``base/log``).
        """
        t0 = time.monotonic()
        log = (self.base / "server.out").open("ab")
        self.proc = subprocess.Popen(
            [str(RABBITMQ_BIN / "rabbitmq-server")],
            env=self.env(),
            cwd=self.base,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            user=self._uid,
            group=self._gid,
        )
        log.close()
        deadline = t0 + timeout
        wait_port(self.port, timeout, alive=self.proc)
        while True:
            # Right after a kill -9, epmd may still hold the old registration for
            # a moment and the CLI cannot reach the new node yet: ask again.
            try:
                self.ctl("await_startup", "--timeout", "10", timeout=20)
                break
            except BrokerError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.5)
        if self.tls_port is not None:
            wait_port(self.tls_port, max(1.0, deadline - time.monotonic()), alive=self.proc)
        return time.monotonic() - t0

    def beam_pid(self) -> int | None:
        """The pid of the Erlang VM, if it runs."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        kids = [p for p in descendants(self.proc.pid) if _comm(p) == "beam.smp"]
        return kids[0] if kids else None

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        """Run ``rabbitmqctl`` against this node; return its output.

        Raises:
            BrokerError: It failed (with ``check``).
        """
        try:
            out = subprocess.run(
                [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args],
                env=self.env(),
                cwd=self.base,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                user=self._uid,
                group=self._gid,
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"rabbitmqctl {' '.join(args)} timed out after {timeout} s") from exc
        if check and out.returncode != 0:
            raise BrokerError(
                f"rabbitmqctl {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()[:500]}"
            )
        return str(out.stdout)

    def queue_depths(self) -> dict[str, tuple[int, int]]:
        """Return ``{queue: (ready, unacked)}`` for every queue of the node."""
        out = self.ctl(
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            timeout=30,
        )
        depths = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                depths[parts[0]] = (int(parts[1]), int(parts[2]))
        return depths

    def memory_bytes(self) -> int | None:
        """The node's total memory use as RabbitMQ reports it."""
        out = self.ctl("eval", "erlang:memory(total).", timeout=30, check=False).strip()
        return int(out) if out.isdigit() else None

    def stop_app(self) -> None:
        """``rabbitmqctl stop_app``: the node stays up, the broker inside stops."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        """``rabbitmqctl start_app`` and wait until it accepts connections."""
        self.ctl("start_app", timeout=120)
        wait_port(self.port, 60)
        if self.tls_port is not None:
            wait_port(self.tls_port, 60)

    def kill(self) -> None:
        """``kill -9`` the Erlang VM (and its helper processes)."""
        if self.proc is None:
            return
        pids = descendants(self.proc.pid)
        _signal(pids, signal.SIGKILL)
        _signal([self.proc.pid], signal.SIGKILL)
        _reap(self.proc, 10)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP the Erlang VM: connections stay open, nothing answers."""
        pid = self.beam_pid()
        if pid is None:
            raise BrokerError("the node is not running")
        os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT the Erlang VM."""
        pid = self.beam_pid()
        if pid is not None:
            os.kill(pid, signal.SIGCONT)

    def restart(self, timeout: float = 90.0) -> float:
        """Start again after :meth:`kill` (same data dirs); return the start time in seconds."""
        if self.proc is not None:
            self.kill()
        return self.start(timeout)

    def close_connections(self, reason: str = "chaos") -> int:
        """``rabbitmqctl close_all_connections``; return how many were open just before."""
        listed = self.ctl("list_connections", "-q", "--no-table-headers", "name", timeout=30)
        self.ctl("close_all_connections", reason, timeout=30)
        return sum(1 for line in listed.splitlines() if line.strip())

    def version(self) -> str:
        """The RabbitMQ version string."""
        out = self.ctl("eval", "rabbit_misc:version().", timeout=30, check=False).strip()
        return out.strip('"') or "unknown"

    def stop(self) -> None:
        """Stop the node (gracefully, then by force) and remove its files."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(BrokerError):
                self.ctl("stop", timeout=30, check=False)
            _reap(self.proc, 15)
            self.kill()
        shutil.rmtree(self.base, ignore_errors=True)

    def pids(self) -> list[int]:
        """Pids of the node's processes (for the loopback check)."""
        if self.proc is None:
            return []
        return [self.proc.pid, *descendants(self.proc.pid)]


RedisProfile = Literal["RD", "RV"]


class RedisServer:
    """A Redis server of the harness's own, with a random password.

    Args:
        profile: ``RD`` durable (``appendonly yes``, ``appendfsync always``) or
            ``RV`` volatile (no persistence; the negative control).
        base: Directory for its files; a new temporary one by default.
        tls: Listen with TLS only (``--tls-port``, no plain port), presenting
            these files (no client certificates asked); :attr:`url` is then a
            ``rediss://`` URL by host name ``localhost``.
    """

    def __init__(
        self, profile: RedisProfile, base: Path | None = None, *, tls: TlsFiles | None = None
    ) -> None:
        if profile not in ("RD", "RV"):
            raise ValueError(f"Redis profile must be 'RD' or 'RV', not {profile!r}")
        self.profile = profile
        self.base = Path(base or tempfile.mkdtemp(prefix=f"mqtasks-rel-redis-{profile.lower()}-"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)
        self.tls = tls.copy_to(self.base / "tls") if tls is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Redis URL (database 0) with the password: ``rediss://`` with TLS."""
        if self.tls is not None:
            return f"rediss://:{self.password}@localhost:{self.port}/0"
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        """The ``redis-server`` command line of this profile."""
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.profile == "RD"
            else ["--appendonly", "no"]
        )
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            listen = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        return [
            shutil.which("redis-server") or "redis-server",
            "--bind", "127.0.0.1",
            *listen,
            "--requirepass", self.password,
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--dir", str(self.base),
            "--daemonize", "no",
            "--logfile", str(self.base / "redis.log"),
            *persistence,
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> float:
        """Start the server; return the seconds until it answers PING."""
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(self.port, timeout, alive=self.proc)
        deadline = time.monotonic() + timeout
        while True:  # an AOF being loaded answers LOADING for a while
            try:
                if self.client().ping():
                    break
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    raise BrokerError(f"Redis on {self.port} does not answer: {exc}") from exc
                time.sleep(0.1)
        return time.monotonic() - t0

    def client(self) -> redis.Redis[bytes]:
        """A new client to the server.

        With TLS it checks the certificate chain against :attr:`tls` ``.ca`` but
        not the host name: it is the harness's own look at a server it started,
        whatever name that server's certificate was made for.
        """
        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {
                "ssl": True,
                "ssl_ca_certs": str(self.tls.ca),
                "ssl_cert_reqs": "required",
                "ssl_check_hostname": False,
            }
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5, **tls
        )

    def shutdown_nosave(self) -> None:
        """``SHUTDOWN NOSAVE``; the server exits without writing a snapshot."""
        with contextlib.suppress(redis.RedisError):
            self.client().shutdown(nosave=True)
        _reap(self.proc, 10)
        self.kill()

    def kill(self) -> None:
        """``kill -9`` the server."""
        if self.proc is None:
            return
        _signal([self.proc.pid], signal.SIGCONT)
        _signal([self.proc.pid], signal.SIGKILL)
        _reap(self.proc, 10)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP the server."""
        if self.proc is None:
            raise BrokerError("Redis is not running")
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT the server."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> float:
        """Start again with the same profile and directory (an AOF is reloaded)."""
        self.kill()
        return self.start()

    def version(self) -> str:
        """The Redis version string."""
        return str(self.client().info("server").get("redis_version", "unknown"))

    def used_memory(self) -> int | None:
        """Redis ``used_memory`` in bytes."""
        try:
            return int(self.client().info("memory")["used_memory"])
        except (redis.RedisError, KeyError):
            return None

    def stop(self) -> None:
        """Kill the server and remove its files."""
        self.kill()
        shutil.rmtree(self.base, ignore_errors=True)

    def pids(self) -> list[int]:
        """Pid of the server (for the loopback check)."""
        return [self.proc.pid] if self.proc is not None else []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _rabbitmq_user() -> tuple[int, int] | None:
    """``(uid, gid)`` of the ``rabbitmq`` user when running as root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("rabbitmq")
    except KeyError as exc:
        raise BrokerError(
            "running as root, but there is no 'rabbitmq' user to run the node as; "
            "install rabbitmq-server (Debian package) first"
        ) from exc
    return entry.pw_uid, entry.pw_gid
