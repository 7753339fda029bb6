"""A loopback TCP proxy the harness owns, to break connections without touching the broker.

* :meth:`TcpProxy.cut` resets every proxied connection (``SO_LINGER`` 0: the
  peers see RST, as after a network failure);
* :meth:`TcpProxy.blackhole` keeps every socket open but forwards nothing, in
  either direction: a half-open connection only heartbeats or timeouts detect.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; one thread per direction per connection.

    Args:
        target_port: The broker's port on loopback.
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.holing = threading.Event()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.accepted = 0
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="rel-proxy-accept", daemon=True).start()

    def url_for(self, url: str) -> str:
        """``url`` with its port replaced by the proxy's."""
        return url.replace(f":{self.target[1]}/", f":{self.port}/")

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self.pairs.append((client, upstream))
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self.holing.is_set():
                    continue  # swallowed: the other side hears nothing
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()
            with self._lock:
                self.pairs = [p for p in self.pairs if src not in p]

    def cut(self) -> int:
        """Reset every proxied connection; return how many were cut."""
        with self._lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:  # linger 0 on both before either closes
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            for s in pair:
                _reset(s)
        return len(pairs)

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
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.close()
        self.cut()


def _reset(sock: socket.socket) -> None:
    # Linger 0 makes close() send RST; shutdown(SHUT_RD) first wakes the pipe
    # thread blocked in recv() on this socket (close() alone would not).
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()
