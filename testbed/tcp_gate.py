"""A TCP forwarder on 127.0.0.1 that can hold new connections (a slow or stalled network path to
a real server, for tests of what the product does while a call hangs) or go down (its
connections cut, new ones refused: the server unreachable) and come back on the same port. It
forwards bytes and understands nothing of what they say (TLS passes through to the real server
untouched)."""

from __future__ import annotations

import socket
import threading

from testbed.process import free_port


class TcpGate:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.port = free_port()
        self.open = threading.Event()
        self.open.set()
        self.held = 0  # connections waiting at the gate now
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()  # both ends of every forwarded connection

    def start(self) -> "TcpGate":
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(64)
        threading.Thread(target=self._accept, args=(self._sock,), name="tcp-gate", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.open.set()
        if self._sock:
            self._sock.close()

    def down(self) -> None:
        """The path is gone: every connection through the gate is cut, new ones are refused
        (nothing listens on the port) until up()."""
        sock, self._sock = self._sock, None
        if sock:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it (close alone does not)
            except OSError:
                pass
            sock.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def up(self) -> None:
        """Back after down(): listening on the same port again."""
        if self._sock is None:
            self.start()

    def hold(self) -> None:
        """New connections wait (connected, nothing forwarded) until release()."""
        self.open.clear()

    def release(self) -> None:
        self.open.set()

    def _accept(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self._conns.add(client)
            self.held += 1
        self.open.wait()
        with self._lock:
            self.held -= 1
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)  # a quiet connection (a watch) stays up, as on a real network
        with self._lock:
            self._conns.add(upstream)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.difference_update((src, dst))
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
