"""A PostgreSQL server of the harness's own, for the PG profile (the ``postgresql://`` broker).

``initdb`` into the harness's work directory and ``postgres`` on a free
loopback port, run as the ``postgres`` OS user (PostgreSQL refuses to run as
root). The machine's shared server on 5432 is never touched: every fault here
(kill -9, restart, connections terminated) hits only the postmaster this module
started and its backends. Clients log in as ``rel`` with a random password
(SCRAM), so every run's URL carries a secret the redaction checks look for.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg

from .brokers import BrokerError, descendants, free_port, wait_port
from .profiles import BrokerProfile

__all__ = ["PG_BIN", "PostgresServer", "queue_depths"]


def _pg_bin() -> Path:
    """``RELIABILITY_PG_BIN``, else the newest Debian ``/usr/lib/postgresql/<major>/bin``."""
    given = os.environ.get("RELIABILITY_PG_BIN")
    if given:
        return Path(given)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


#: Where the server binaries are (Debian's ``postgresql-<major>`` package).
PG_BIN = _pg_bin()


class PostgresServer:
    """A PostgreSQL server on 127.0.0.1 with its own data directory (a :class:`BrokerGroup`).

    Args:
        workdir: Where the data directory and the server log go (removed by :meth:`stop`).
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.port = free_port()
        self.user = "rel"
        self.password = secrets.token_urlsafe(12)
        self.proc: subprocess.Popen[bytes] | None = None
        self._ids = _postgres_user()

    @property
    def url(self) -> str:
        """The ``postgresql://`` URL of the broker's database, the password included."""
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/mqtasks"

    def _as_postgres(self) -> dict[str, Any]:
        if self._ids is None:
            return {}
        return {"user": self._ids[0], "group": self._ids[1]}

    def _initdb(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        pwfile = self.workdir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._ids is not None:
            for path in (self.workdir, pwfile):
                os.chown(path, *self._ids)
        self.workdir.chmod(0o700)
        argv = [
            str(PG_BIN / "initdb"),
            "-D", str(self.data),
            "-U", self.user,
            f"--pwfile={pwfile}",
            "--auth-local=scram-sha-256",
            "--auth-host=scram-sha-256",
            "-E", "UTF8",
            "--locale=C.UTF-8",
            "--no-instructions",
        ]  # fmt: skip
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            check=False,
            cwd=self.workdir,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            **self._as_postgres(),
        )
        pwfile.unlink()
        if out.returncode != 0:
            raise BrokerError(f"initdb failed ({out.returncode}): {out.stderr.strip()[-500:]}")

    def argv(self) -> list[str]:
        """The ``postgres`` command line: loopback only, durable (fsync on, the defaults)."""
        return [
            str(PG_BIN / "postgres"),
            "-D", str(self.data),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"port={self.port}",
            "-c", f"unix_socket_directories={self.workdir}",
            "-c", "max_connections=200",
            "-c", "shared_buffers=64MB",
            "-c", "logging_collector=off",
        ]  # fmt: skip

    def start(self, timeout: float = 60.0) -> float:
        """Create the cluster (first time), start the postmaster and the ``mqtasks``
        database; return the seconds until it accepts logins."""
        t0 = time.monotonic()
        if not self.data.exists():
            self._initdb()
        self._spawn(timeout)
        with self.connect(dbname="postgres") as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'mqtasks'").fetchone()
            if found is None:
                conn.execute("CREATE DATABASE mqtasks")
        return time.monotonic() - t0

    def _spawn(self, timeout: float) -> None:
        log = (self.workdir / "postgres.log").open("ab")
        if self._ids is not None:
            os.chown(self.workdir / "postgres.log", *self._ids)
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            **self._as_postgres(),
        )
        log.close()
        wait_port(self.port, timeout, alive=self.proc)
        deadline = time.monotonic() + timeout
        while True:  # crash recovery after a kill -9: "the database system is starting up"
            try:
                with self.connect(dbname="postgres") as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error as exc:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise BrokerError(f"PostgreSQL on {self.port} does not answer: {exc}") from exc
                time.sleep(0.1)

    def connect(self, dbname: str = "mqtasks") -> psycopg.Connection[Any]:
        """A new autocommit connection (the harness's own look at the server)."""
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=dbname,
            autocommit=True,
            connect_timeout=5,
            application_name="reliability-harness",
        )

    def kill(self) -> None:
        """``kill -9`` the postmaster and every backend (a crash: WAL recovery at the next start)."""
        if self.proc is None:
            return
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.proc = None
        # Backends still exiting keep the shared memory attached; the next start waits for them.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)

    def stop_fast(self) -> None:
        """``pg_ctl stop -m fast``: backends rolled back and ended, a shutdown checkpoint."""
        if self.proc is None:
            return
        subprocess.run(
            [str(PG_BIN / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "30"],
            capture_output=True,
            check=False,
            cwd=self.workdir,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            **self._as_postgres(),
        )
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        if self.proc.poll() is None:
            self.kill()
        self.proc = None

    def restart(self, timeout: float = 60.0) -> float:
        """Start again on the same data directory (after :meth:`kill` or :meth:`stop_fast`);
        return the seconds until it accepts logins."""
        t0 = time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        self._spawn(timeout)
        return time.monotonic() - t0

    def terminate_clients(self) -> int:
        """``pg_terminate_backend`` every client connection but the harness's; return how many."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
                "AND application_name <> 'reliability-harness'"
            ).fetchall()
        return sum(1 for (ok,) in rows if ok)

    def version(self) -> str:
        """The server's version string."""
        with self.connect(dbname="postgres") as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "unknown"

    def env(self, broker: BrokerProfile) -> dict[str, str]:
        """No settings beyond the URL: the transport's defaults (30 s lease) are what is tested."""
        return {}

    def stop(self) -> None:
        """Stop the server (fast, then by force) and remove its files."""
        with contextlib.suppress(Exception):
            self.stop_fast()
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def pids(self) -> list[int]:
        """The postmaster's and its backends' pids (for the loopback check)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *descendants(self.proc.pid)]


#: One queue's rows by place: due and held by nobody (a lease run out counts as
#: ready: a killed worker's message waits for the next fetch), due later, leased,
#: and rows of its dead-letter queue.
_DEPTHS = """SELECT
    count(*) FILTER (WHERE queue = %(q)s AND run_at <= now()
        AND (locked_until IS NULL OR locked_until <= now())),
    count(*) FILTER (WHERE queue = %(q)s AND run_at > now()
        AND (locked_until IS NULL OR locked_until <= now())),
    count(*) FILTER (WHERE queue = %(q)s AND locked_until > now()),
    count(*) FILTER (WHERE queue = %(dlq)s)
FROM {t} WHERE queue IN (%(q)s, %(dlq)s)"""


def queue_depths(conn: psycopg.Connection[Any], table: str, queue: str) -> dict[str, int]:
    """``{ready, delayed, unacked, dead}`` rows of ``queue`` in the broker's ``table``
    (zeros while the table does not exist yet)."""
    from psycopg import sql

    exists = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
    if exists is None or exists[0] is None:
        return {"ready": 0, "delayed": 0, "unacked": 0, "dead": 0}
    query = sql.SQL(_DEPTHS).format(t=sql.Identifier(table))  # type: ignore[arg-type]
    row = conn.execute(query, {"q": queue, "dlq": queue + ".dlq"}).fetchone()
    ready, delayed, unacked, dead = row if row is not None else (0, 0, 0, 0)
    return {"ready": ready, "delayed": delayed, "unacked": unacked, "dead": dead}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _postgres_user() -> tuple[int, int] | None:
    """``(uid, gid)`` of the ``postgres`` user when running as root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise BrokerError(
            "running as root, but there is no 'postgres' user to run the server as; "
            "install postgresql (Debian package) first"
        ) from exc
    return entry.pw_uid, entry.pw_gid
