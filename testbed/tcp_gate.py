"""A TCP forwarder on 127.0.0.1 that can hold new connections: a slow or stalled network path
to a real server, for tests of what the product does while a call hangs. It forwards bytes and
understands nothing of what they say (TLS passes through to the real server untouched)."""

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

    def start(self) -> "TcpGate":
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(64)
        threading.Thread(target=self._accept, name="tcp-gate", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.open.set()
        if self._sock:
            self._sock.close()

    def hold(self) -> None:
        """New connections wait (connected, nothing forwarded) until release()."""
        self.open.clear()

    def release(self) -> None:
        self.open.set()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self.held += 1
        self.open.wait()
        with self._lock:
            self.held -= 1
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
