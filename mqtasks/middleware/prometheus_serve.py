"""Serving Prometheus metrics: an HTTP endpoint, an ASGI app, and the ``--processes``
supervisor's aggregate of its children (see :mod:`mqtasks.middleware.prometheus`)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from ..exceptions import ConfigurationError
from .prometheus import MULTIPROC_DIR_ENV, _require, multiprocess_dir

try:
    import prometheus_client
    from prometheus_client import multiprocess
except ImportError:  # the extra is not installed: _require() says how to get it
    prometheus_client = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "MetricsServer",
    "SupervisorMetrics",
    "exposition_registry",
    "metrics_asgi_app",
    "serve_metrics",
]

logger = structlog.get_logger("mqtasks.middleware.prometheus")


def exposition_registry(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """Return the registry to serve: ``registry`` if given; else, in multiprocess mode, a
    registry that sums the files of every process; else prometheus_client's default.

    Raises:
        ConfigurationError: prometheus-client is not installed.
    """
    _require()
    if registry is not None:
        return registry
    directory = multiprocess_dir()
    if directory is None:
        return prometheus_client.REGISTRY
    collected = prometheus_client.CollectorRegistry()
    multiprocess.MultiProcessCollector(collected, path=directory)  # type: ignore[no-untyped-call]
    return collected


class MetricsServer:
    """A running metrics HTTP server; call it (or :meth:`stop`) to stop it.

    Attributes:
        host: The address it listens on.
        port: The port it listens on (the one the OS chose when asked for 0).
    """

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host: str = server.server_address[0]
        self.port: int = server.server_address[1]

    @property
    def url(self) -> str:
        """The metrics page, ``http://host:port/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and close the socket; waits for the serving thread."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    __call__ = stop

    def __repr__(self) -> str:
        return f"<MetricsServer {self.url}>"


def serve_metrics(
    port: int, host: str = "127.0.0.1", *, registry: CollectorRegistry | None = None
) -> MetricsServer:
    """Serve the metrics over HTTP (any path; ``/metrics`` by convention) from a daemon thread.

    Args:
        port: The port to listen on (``0``: one the OS picks; see :attr:`MetricsServer.port`).
        host: The address to listen on; only this machine by default.
        registry: What to serve; see :func:`exposition_registry`.

    Returns:
        The server; call it to stop it.

    Raises:
        ConfigurationError: prometheus-client is not installed, or the port is taken.
    """
    served = exposition_registry(registry)
    try:
        server, thread = prometheus_client.start_http_server(port, addr=host, registry=served)
    except OSError as exc:
        raise ConfigurationError(f"Cannot serve metrics on {host}:{port}: {exc}.") from exc
    running = MetricsServer(server, thread)
    logger.info("metrics.serving", url=running.url, multiprocess=multiprocess_dir() is not None)
    return running


def metrics_asgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """Return an ASGI app that serves the metrics (mount it at ``/metrics``).

    Args:
        registry: What to serve; see :func:`exposition_registry`.

    Raises:
        ConfigurationError: prometheus-client is not installed.
    """
    served = exposition_registry(registry)
    app: Callable[..., Any] = prometheus_client.make_asgi_app(served)
    return app


class SupervisorMetrics:
    """The metrics of ``mqtasks worker --processes N --metrics-port P``, summed over the children.

    Made before the children start, it gives them a fresh directory (in
    ``PROMETHEUS_MULTIPROC_DIR``) to write their values to; :meth:`start` then
    serves the sum from the supervisor, :meth:`child_exited` drops the gauges of
    a child that is gone (its counters stay counted) and :meth:`stop` stops
    serving and removes the directory.

    Args:
        port: The port to serve on.
        host: The address to serve on.

    Raises:
        ConfigurationError: prometheus-client is not installed, or the port is taken.
    """

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        _require()
        # A port that is taken is said now, before any child starts; the server
        # itself starts once they are forked (a thread here would stop the forking).
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            socket.create_server((host, port), family=family).close()
        except OSError as exc:
            raise ConfigurationError(f"Cannot serve metrics on {host}:{port}: {exc}.") from exc
        self.port = port
        self.host = host
        #: The directory the children write to, new for each run.
        self.directory = tempfile.mkdtemp(prefix="mqtasks-prometheus-")
        os.environ[MULTIPROC_DIR_ENV] = self.directory  # every child inherits it
        self.server: MetricsServer | None = None

    def start(self) -> MetricsServer:
        """Serve the children's summed metrics (call it once the children are forked)."""
        self.server = serve_metrics(self.port, self.host)
        return self.server

    def child_exited(self, pid: int) -> None:
        """Forget the live gauges of the child ``pid``, which has exited."""
        multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        """Stop serving and remove the directory."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        shutil.rmtree(self.directory, ignore_errors=True)
        if os.environ.get(MULTIPROC_DIR_ENV) == self.directory:
            del os.environ[MULTIPROC_DIR_ENV]
