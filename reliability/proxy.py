"""A loopback TCP proxy, to break connections without touching the broker.

The harness (S5) and the test suite both use it; it lives here because the
tests may import the harness, never the other way round.

* :meth:`TcpProxy.cut` resets every proxied connection (``SO_LINGER`` 0: the
  peers see RST, as after a network failure), and with ``refuse`` also turns new
  connections away until :meth:`TcpProxy.resume`: a broker that is down;
* :meth:`TcpProxy.blackhole` keeps every socket open but forwards nothing, in
  either direction: a half-open connection only heartbeats or timeouts detect;
* :meth:`TcpProxy.forward` is the hook a subclass overrides to hold (block) or
  drop the bytes of one direction (a frozen broker, a reply that never arrives).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

__all__ = ["TcpProxy", "pipe"]


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; one thread per direction per connection.

    Args:
        target_port: The broker's port.
        target_host: The broker's host (loopback by default).
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.holing = threading.Event()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        #: Connections forwarded so far.
        self.accepted = 0
        #: Connections turned away (while refusing, or the target did not answer).
        self.refused = 0
        self.accepting = True
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="tcp-proxy-accept", daemon=True).start()

    def url_for(self, url: str) -> str:
        """``url`` (one broker's) pointing at the proxy instead: same credentials,
        path and query, host and port the proxy's."""
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        return parts._replace(netloc=f"{userinfo}{at}127.0.0.1:{self.port}").geturl()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.accepting:
                self._turn_away(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                self._turn_away(client)
                continue
            with self._lock:
                self.pairs.append((client, upstream))
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _turn_away(self, client: socket.socket) -> None:
        with self._lock:
            self.refused += 1
        _reset(client)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            pipe(src, dst, lambda data: not self.holing.is_set() and self.forward(src, data))
        finally:
            with self._lock:
                self.pairs = [p for p in self.pairs if src not in p]

    def forward(self, src: socket.socket, data: bytes) -> bool:
        """Whether to pass on ``data`` read from ``src``; a subclass may block here to
        hold the bytes, or return False to drop them."""
        return True

    def cut(self, *, refuse: bool = False) -> int:
        """Reset every proxied connection; return how many were cut.

        Args:
            refuse: Also turn new connections away until :meth:`resume`.
        """
        if refuse:
            self.accepting = False
        with self._lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:  # linger 0 on both before either closes
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            for s in pair:
                _reset(s)
        return len(pairs)

    def resume(self) -> None:
        """Accept and forward new connections again."""
        self.accepting = True

    def blackhole(self, on: bool = True) -> int:
        """Stop forwarding bytes, sockets staying open; or end the black hole.

        Ending it resets the connections that lived through it (their byte
        streams have gaps, as a peer would find after its timeouts); returns
        how many were reset.
        """
        if on:
            self.holing.set()
            return 0
        cut = self.cut()
        self.holing.clear()
        return cut

    def close(self) -> None:
        """Stop accepting and reset every connection."""
        self.accepting = False
        with contextlib.suppress(OSError):
            self.listener.close()
        self.cut()


def pipe(
    src: socket.socket, dst: socket.socket, forward: Callable[[bytes], bool] | None = None
) -> None:
    """Copy bytes from ``src`` to ``dst`` until either side closes, then close both.

    Args:
        src: Where bytes are read.
        dst: Where they are written.
        forward: Sees each chunk first; it may block (hold the bytes) or return
            False (drop them).
    """
    try:
        while data := src.recv(65536):
            if forward is None or forward(data):
                dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.close()


def _reset(sock: socket.socket) -> None:
    # Linger 0 makes close() send RST; shutdown(SHUT_RD) first wakes the pipe
    # thread blocked in recv() on this socket (close() alone would not).
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()
