"""Runs the real `provisioner serve` (gunicorn) as a subprocess, for tests and the end-to-end VMs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from testbed.process import ROOT, Daemon
PROVISIONER = [sys.executable, "-m", "provisioner"]


class BootServer(Daemon):
    """`provisioner serve` on 127.0.0.1:PORT, ready once /healthz answers."""

    def __init__(self, config: Path, port: int, log: Path, workers: int = 2, env: dict | None = None):
        super().__init__([*PROVISIONER, "--config", str(config), "serve", "--listen", f"127.0.0.1:{port}",
                          "--workers", str(workers)], port, log, env=env)
        self.config, self.log_path, self.workers = config, log, workers
        self.url = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 20.0) -> "BootServer":
        return super().start("/healthz", timeout)


def clock_offset_env(offset_s: float) -> dict:
    """The environment of a process whose clock is `offset_s` seconds off (libfaketime, the Debian
    package faketime). Its monotonic clock moves by the same constant, which no duration sees
    (libfaketime 0.9.10 breaks Python's sleep with FAKETIME_DONT_FAKE_MONOTONIC)."""
    from testbed.parts import PartMissing

    lib = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
    if not lib.exists():
        raise PartMissing(f"{lib} (the Debian package faketime; run `make test`)")
    return {**os.environ, "LD_PRELOAD": str(lib), "FAKETIME": f"{offset_s:+.0f}s"}


def cli(config: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run `provisioner --config CONFIG ARGS...` as an admin would."""
    return subprocess.run([*PROVISIONER, "--config", str(config), *args], capture_output=True, text=True,
                          cwd=ROOT, check=check, timeout=120)
