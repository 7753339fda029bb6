"""Brokers owned by one test module: their own redis-server or RabbitMQ node on free
loopback ports. The throwaway certificate authority for TLS, the free port and the
wait for a listener are the harness's (:mod:`reliability.pki`, :mod:`reliability.brokers`).

Each is stopped by the process id it was started with; the machine's shared
brokers are never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from reliability.brokers import free_port, wait_port
from reliability.pki import Pki

__all__ = ["free_port", "start_rabbitmq_tls", "start_redis", "stop"]


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Stop a server started with ``start_new_session=True``: its own process group only."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


# -- redis-server -------------------------------------------------------------------


def start_redis(
    directory: Path, *args: str, port: int | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a private redis-server on loopback; return it and its (TLS or plain) port.

    ``args`` are extra ``redis-server`` options; with ``--tls-port`` in them the
    plain port is closed and the TLS port is returned.
    """
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed")
    port = port or free_port()
    tls = "--tls-port" in args
    command = [
        "redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        "0" if tls else str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        *args,
    ]
    if tls:
        command[command.index("--tls-port") + 1] = str(port)
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    wait_port(port, 10, alive=proc)
    return proc, port


# -- RabbitMQ ------------------------------------------------------------------------


def start_rabbitmq_tls(directory: Path, pki: Pki) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start a RabbitMQ node of our own with a TLS listener; return it, its TLS port and
    its plain port. Its name, ports and directories are its own; no plugins."""
    directory.mkdir(parents=True, exist_ok=True)
    tls_port, tcp_port, dist_port = free_port(), free_port(), free_port()
    node = f"mqttls{tls_port}@localhost"
    (directory / "rabbitmq.conf").write_text(
        "\n".join(
            [
                f"listeners.tcp.default = 127.0.0.1:{tcp_port}",
                f"listeners.ssl.default = 127.0.0.1:{tls_port}",
                f"ssl_options.cacertfile = {pki.ca}",
                f"ssl_options.certfile = {pki.server_cert}",
                f"ssl_options.keyfile = {pki.server_key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
                "loopback_users = none",
                "",
            ]
        )
    )
    (directory / "rabbitmq-env.conf").write_text("")
    (directory / "enabled_plugins").write_text("[].\n")
    env = {
        **os.environ,
        "HOME": str(directory),
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(tcp_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
        "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_PID_FILE": str(directory / "node.pid"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }
    with (directory / "stdout.log").open("wb") as log:
        proc = subprocess.Popen(
            ["/usr/lib/rabbitmq/bin/rabbitmq-server"],
            env=env,
            cwd=directory,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_port(tls_port, 90, alive=proc)
        wait_port(tcp_port, 30, alive=proc)
    except BaseException:
        stop(proc)
        raise
    return proc, tls_port, tcp_port
