"""Helpers for tests that need real parts: skip locally, FAIL under CI=true."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """A real part is not available: skip locally, fail in CI (where `make test` installed it)."""
    msg = f"{what} is not available; run `make test` (it installs the Debian packages)"
    if IN_CI:
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def require_binary(name: str, extra_paths: tuple[str, ...] = ()) -> str:
    for candidate in extra_paths:
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if not found:
        missing(name)
    return found


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A currently free port on 127.0.0.1 (TCP by default, pass socket.SOCK_DGRAM for UDP)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """A server in the foreground in its own session, stopped by pid (its whole group)."""

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict | None = None):
        self.cmd, self.port, self.log, self.env = cmd, port, log, env
        self.proc: subprocess.Popen | None = None

    def start(self, probe: str, timeout: float = 60.0) -> "Daemon":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=log, start_new_session=True, cwd=ROOT,
                                         env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{' '.join(self.cmd[:4])} exited {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{probe}", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{' '.join(self.cmd[:4])} did not answer on 127.0.0.1:{self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
