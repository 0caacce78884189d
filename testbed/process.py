"""Running the real daemons of the test world: each in the foreground in its own session, its
output in a log file, ready when its probe answers, stopped by pid (its whole process group),
so nothing outlives a test run."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A currently free port on 127.0.0.1 (TCP by default, pass socket.SOCK_DGRAM for UDP)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_probe(url: str, context: ssl.SSLContext | None = None, headers: dict | None = None) -> Callable[[], bool]:
    """A probe that is true once GET url answers 200."""

    def probe() -> bool:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2, context=context) as r:
                return r.status == 200
        except OSError:
            return False

    return probe


def stop_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Stop a process started with start_new_session=True, and its group, by pid: `sig`, then
    SIGKILL after `timeout` s. Nothing to do when it is gone already."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


class Daemon:
    """A server in the foreground in its own session, stopped by pid (its whole group)."""

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict | None = None, name: str | None = None):
        self.cmd, self.port, self.log, self.env = cmd, port, log, env
        self.name = name or Path(cmd[0]).name
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, probe: str | Callable[[], bool], timeout: float = 60.0) -> "Daemon":
        """Start it and wait until `probe` (a path on http://127.0.0.1:port, or a callable) is true."""
        check = http_probe(f"http://127.0.0.1:{self.port}{probe}") if isinstance(probe, str) else probe
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=ROOT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode} while starting; "
                                   f"last lines of {self.log}:\n{self.tail()}")
            if check():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready within {timeout:.0f} s; last lines of {self.log}:\n"
                           f"{self.tail()}")

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15) -> None:
        stop_group(self.proc, signal.SIGTERM, timeout)
