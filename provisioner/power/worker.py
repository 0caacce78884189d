"""The short-lived worker process that talks to one BMC for one attempt (IPMI and Redfish alike).

    run("provisioner.power.redfish", request, budget)   # parent: -> the worker's answer, a dict
    serve(do, preload)                                   # worker: its __main__

Why a process: the BMC libraries keep state we cannot reset (pyghmi's IPMI sessions live in
class-level state shared by all threads) or wait on their own fixed timeouts (pyghmi's Redfish
client dials with 60 s); killing the worker ends the attempt at its budget, whatever the library
does. The request, password included, goes over stdin: never on a command line. The budget's
clock starts once the worker has loaded its library, so a slow Python start on a loaded host does
not eat the BMC's time. The answer is one JSON line; a worker that dies says so in one redacted
line (never a traceback with its locals).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable

STARTUP_S = 30.0  # for the worker to start and load its library (not the BMC's time)
_READY = b"ready\n"


def run(module: str, request: dict, budget: float) -> dict:
    """Run `python -m module` on `request`; {"ok": False, "kind": "timeout"} when it does not
    answer within `budget` s (it is killed, by its pid)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,
    )
    if not _wait_ready(proc, STARTUP_S):
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    else:
        try:
            out, err = proc.communicate(json.dumps(request).encode() + b"\n", timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"ok": False, "kind": "timeout"}
    try:
        return json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        lines = err.decode("utf-8", "replace").strip().splitlines()
        tail = redact(lines[-1] if lines else f"exit status {proc.returncode}", request.get("password"))
        return {"ok": False, "kind": "error", "detail": f"BMC worker failed: {tail[:200]}"}


def _wait_ready(proc: subprocess.Popen, limit: float) -> bool:
    """Read the worker's b"ready\\n" straight from the pipe (no buffering ahead of communicate())."""
    fd, got, deadline = proc.stdout.fileno(), b"", time.monotonic() + limit
    while not got.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return False
        chunk = os.read(fd, 1)
        if not chunk:
            return False
        got += chunk
    return got == _READY


def redact(text: str, password: str | None) -> str:
    """One line, the password replaced by ***."""
    text = " ".join(str(text).split())
    if password:
        text = text.replace(password, "***")
    return text


def serve(do: Callable[[dict], dict], preload: Callable[[], None]) -> None:
    """The worker's main: load the library, say ready, answer one request, exit."""
    preload()
    sys.stdout.buffer.write(_READY)
    sys.stdout.flush()
    request = json.loads(sys.stdin.readline())
    try:
        res = do(request)
    except Exception as exc:  # never let a traceback (with locals) out: one redacted line
        res = {"ok": False, "kind": "error", "step": request.get("action"),
               "detail": redact(f"{type(exc).__name__}: {exc}", request.get("password"))}
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    os._exit(0)  # library threads (pyghmi's IO thread) would otherwise linger
