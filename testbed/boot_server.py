"""Runs the real `provisioner serve` (gunicorn) as a subprocess, for tests and the end-to-end VMs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from testbed.process import ROOT, Daemon
PROVISIONER = [sys.executable, "-m", "provisioner"]


class BootServer(Daemon):
    """`provisioner serve` on 127.0.0.1:PORT, ready once /healthz answers."""

    def __init__(self, config: Path, port: int, log: Path, workers: int = 2):
        super().__init__([*PROVISIONER, "--config", str(config), "serve", "--listen", f"127.0.0.1:{port}",
                          "--workers", str(workers)], port, log)
        self.config, self.log_path, self.workers = config, log, workers
        self.url = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 20.0) -> "BootServer":
        return super().start("/healthz", timeout)


def cli(config: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run `provisioner --config CONFIG ARGS...` as an admin would."""
    return subprocess.run([*PROVISIONER, "--config", str(config), *args], capture_output=True, text=True,
                          cwd=ROOT, check=check, timeout=120)
