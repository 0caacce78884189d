"""`provisioner run`: the balancer as one long-running loop that reacts to events within about a
second. One job, the loop: a pass is reconcile's (the very pass `provisioner balance` runs from
cron, under the same lock), the watch is the Kubernetes adapter's.

When a pass runs:
- at start, then every run.interval_s (the timer: passes are level-triggered, so a timer pass
  catches whatever no event told about);
- every run.busy_interval_s after a pass that took steps, and while any node is switching (a
  switch advances over several passes: drain, reboot, boot callback, join);
- soon after an event: a scheduler's ask recorded in the store (Store.last_ask_id grows; polled
  every run.ask_poll_s; slurmctld's programs record them) or a pod the Kubernetes watch reports
  Unschedulable (run.watch_kubernetes). Events coalesce: the pass runs COALESCE_S after the
  first one, at most one every MIN_GAP_S, and answers everything that came since the last pass;
  events that come during a pass bring the next one forward;
- within ERROR_RETRY_S after a pass that failed (an exception, an observe error): logged, and
  the loop goes on.

Each pass logs one line to stderr with what woke it ("start", "ask from slurmctld: sn01 resume",
"unschedulable pod ns/name"; without an event: "timer", "switch in progress", "follow-up" after
a pass that took steps, "retry" after a failed one), then its report in the text form
`provisioner balance` prints (provisioner/report.py):

    2026-03-02T10:00:01 pass (unschedulable pods ml/web-0, ml/web-1):
    2026-03-02T10:00:01 sn01: requested: ...
    2026-03-02T10:01:01 pass (timer): nothing to do

One loop per site: it holds a flock on STORE.run.lock while it runs (a second `provisioner run`
exits 2), and `daemon_running(site)` tells other commands (slurmctld's ResumeProgram) that asks
will be picked up. SIGTERM/SIGINT: the running pass finishes, then exit 0. The site config is read
once: restart the loop after changing it.
"""

from __future__ import annotations

import logging
import signal
import sys
import socket
import threading
import time
from pathlib import Path
from typing import TextIO

from provisioner.model import Site
from provisioner.report import report_lines
from provisioner.states import SWITCHING
from provisioner.store import Store, iso, open_store
from provisioner.switch.locks import LockLost, PassLocked, pass_lock
from provisioner.switch.locks import AlreadyRunning, daemon_running, run_lock  # noqa: F401  (used by the CLI and slurm_programs)

COALESCE_S = 0.2  # a pass waits this long after the first event, for the rest of its burst
MIN_GAP_S = 1.0  # event-driven passes start at least this long after the last one ended
ERROR_RETRY_S = 10.0  # after a failed pass, the next one within this (or interval_s, if shorter)
LOCK_WAIT_S = 5.0  # a pass waits this long for a cron or `role --now` pass to finish
WATCH_RETRY_S = 30.0  # the watch could not even start (kubeconfig): try again after this
SHOW = 3  # nodes or pods named per kind of event in a pass's line

# What starts a pass no event asked for: the timer, a switch in progress, the pass after one that
# took steps, another try after a failed or skipped pass.
START, TIMER, SWITCH, FOLLOW_UP, RETRY = "start", "timer", "switch in progress", "follow-up", "retry"


def wake_path(site: Site) -> Path:
    """A datagram socket the loop listens on: whoever records an ask sends a byte, and the loop
    reads the asks at once instead of at its next poll (the poll stays, for other hosts)."""
    return Path(str(site.store) + ".run.sock")


def notify(site: Site) -> bool:
    """Tell a running loop that asks are waiting. Best effort: False when nobody listens."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"ask", str(wake_path(site)))
        return True
    except OSError:
        return False


class Wakeups:
    """What asked for a pass since the last one started. Thread-safe: the watch adds from its
    thread; `kick` is set on every add (and on a stop) so the loop's wait ends at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str, str], None] = {}  # (kind, source, detail), in order, no repeats
        self.first: float | None = None  # monotonic time of the first one since the last pass
        self.kick = threading.Event()

    def add(self, kind: str, source: str = "", detail: str = "") -> None:
        with self._lock:
            self._items[(kind, source, detail)] = None
            if self.first is None:
                self.first = time.monotonic()
        self.kick.set()

    def take(self) -> list[tuple[str, str, str]]:
        with self._lock:
            items, self._items, self.first = list(self._items), {}, None
        return items


def describe(wakeups: list[tuple[str, str, str]], otherwise: str = TIMER) -> str:
    """What woke a pass, in words: "start; ask from slurmctld: sn01 resume; unschedulable pods
    ml/a, ml/b, ml/c (+3 more)"; `otherwise` when nothing did (the timer)."""

    def some(items: list[str]) -> str:
        return ", ".join(items[:SHOW]) + (f" (+{len(items) - SHOW} more)" if len(items) > SHOW else "")

    parts = [START] if any(k == START for k, _, _ in wakeups) else []
    asks: dict[str, list[str]] = {}
    for kind, source, detail in wakeups:
        if kind == "ask":
            asks.setdefault(source, []).append(detail)
    parts += [f"ask from {source}" + (f": {some([d for d in details if d])}" if any(details) else "")
              for source, details in asks.items()]
    pods = [detail for kind, _, detail in wakeups if kind == "pod"]
    if pods:
        parts.append(f"unschedulable pod{'s' if len(pods) > 1 else ''} {some(pods)}")
    requests = [detail for kind, _, detail in wakeups if kind == "provreq"]
    if requests:
        parts.append(f"ProvisioningRequest{'s' if len(requests) > 1 else ''} {some(requests)}")
    return "; ".join(parts) or otherwise


class Loop:
    def __init__(self, site: Site, store: Store, stop: threading.Event, out: TextIO):
        self.site = site
        self.store = store
        self.stop = stop
        self.out = out
        self.settings = site.run
        self.wakeups = Wakeups()
        self._store_error = False

    def log(self, line: str, stamp: str | None = None) -> None:
        """One line to the log, stamped like `provisioner balance`'s (now, unless given)."""
        print((stamp if stamp is not None else iso(time.time())[:19] + " ") + line, file=self.out, flush=True)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> int:
        s = self.settings
        self.log(f"provisioner run: {self.site.path}: a pass every {s.interval_s:g} s, every {s.busy_interval_s:g} s "
                 f"while a node switches, and at once on asks" + (" and unschedulable pods" if s.watch_kubernetes
                                                                  else " (run.watch_kubernetes is off)"))
        if s.watch_kubernetes:
            threading.Thread(target=self._watch, args=(lambda k: k.watch_unschedulable(self._on_pod, self.stop),),
                             name="watch-unschedulable", daemon=True).start()
        if self.site.kubernetes.provisioning_requests:
            threading.Thread(target=self._watch, args=(self._watch_requests,), name="watch-provisioning-requests",
                             daemon=True).start()
        self._listen()
        seen = self._poll_asks(None)
        self.wakeups.add(START)
        next_due, due_why = time.monotonic(), TIMER
        last_end = float("-inf")
        while not self.stop.is_set():
            self.wakeups.kick.clear()
            seen = self._poll_asks(seen)
            now = time.monotonic()
            due = next_due
            first = self.wakeups.first
            if first is not None:
                due = min(due, max(first + COALESCE_S, last_end + min(MIN_GAP_S, s.busy_interval_s)))
            if now < due:
                self.wakeups.kick.wait(min(s.ask_poll_s, due - now))
                continue
            delay, due_why = self._pass(describe(self.wakeups.take(), due_why))
            last_end = time.monotonic()
            next_due = last_end + delay
        return 0

    def _listen(self) -> None:
        """notify()'s datagrams end the loop's wait at once (it then reads the asks)."""
        path = wake_path(self.site)
        try:
            path.unlink(missing_ok=True)  # a socket left by a loop that died (we hold the run lock)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(path))
        except OSError as exc:
            self.log(f"no wake-up socket {path} ({exc}); asks are read every {self.settings.ask_poll_s:g} s")
            return

        def serve() -> None:
            sock.settimeout(1.0)
            while not self.stop.is_set():
                try:
                    sock.recv(64)
                except TimeoutError:
                    continue
                except OSError:
                    return
                self.wakeups.kick.set()
            sock.close()
            path.unlink(missing_ok=True)

        threading.Thread(target=serve, name="wake-socket", daemon=True).start()

    def _poll_asks(self, seen: int | None) -> int | None:
        """Asks recorded since `seen` (the newest ask id the loop knew) wake a pass."""
        try:
            last = self.store.last_ask_id()
            if seen is not None and last > seen:
                new = [a for a in self.store.asks(limit=min(last - seen, 100)) if a.id > seen]
                for a in new:
                    self.wakeups.add("ask", a.source, f"{a.node} {a.kind}")
                if not new:
                    self.wakeups.add("ask", "the store")
            if self._store_error:
                self.log(f"store {self.store.where} readable again")
            self._store_error = False
            return last
        except Exception as exc:  # noqa: BLE001 - a busy or broken store: the next poll tries again
            if not self._store_error:
                self.log(f"cannot read the asks in the store {self.store.where} ({exc.__class__.__name__}: {exc}); "
                         "trying again")
            self._store_error = True
            return seen

    def _pass(self, why: str) -> tuple[float, str]:
        """One pass and its log. Returns when the next pass is due without an event (seconds
        from now) and why it will run then."""

        s = self.settings
        stamp = iso(time.time())[:19] + " "
        try:
            with pass_lock(self.site, wait_s=LOCK_WAIT_S):
                report = self._run_pass()
        except LockLost as exc:  # stopped before its next write: another host's pass may run now
            self.log(f"pass ({why}): stopped: {exc}; trying again in {s.busy_interval_s:g} s", stamp)
            return s.busy_interval_s, RETRY
        except PassLocked as exc:
            self.log(f"pass ({why}): skipped: {exc}; trying again in {s.busy_interval_s:g} s", stamp)
            return s.busy_interval_s, RETRY
        except Exception as exc:  # noqa: BLE001 - logged; the loop goes on
            retry = min(s.interval_s, ERROR_RETRY_S)
            self.log(f"pass ({why}): FAILED: {exc.__class__.__name__}: {exc}; trying again in {retry:g} s", stamp)
            return retry, RETRY
        lines = report_lines(report, stamp)
        self.log(f"pass ({why}):" + ("" if lines else " nothing to do"), stamp)
        for _, line in lines:
            self.log(line, "")
        if self._switching():
            delay, next_why = s.busy_interval_s, SWITCH
        elif report.steps:
            delay, next_why = s.busy_interval_s, FOLLOW_UP
        else:
            delay, next_why = s.interval_s, TIMER
        if report.errors and delay > ERROR_RETRY_S:
            delay, next_why = ERROR_RETRY_S, RETRY
        return delay, next_why

    def _run_pass(self):
        """Reconciler(site, store).run_pass(), with a Kubernetes client of its own, closed after."""
        from provisioner.clusters.kubernetes import KubernetesAdapter
        from provisioner.errors import OperationError
        from provisioner.reconcile import Reconciler

        try:
            kube = KubernetesAdapter(self.site.kubernetes)
        except OperationError:  # the pass reports it, as `provisioner balance` does (observe failed)
            return Reconciler(self.site, self.store).run_pass()
        with kube:
            return Reconciler(self.site, self.store, kube=kube).run_pass()

    def _switching(self) -> bool:
        try:
            return any(st.phase in SWITCHING for st in self.store.nodes().values())
        except Exception:  # noqa: BLE001 - unknown: the timer decides
            return False

    # -- the watch (its own thread) ----------------------------------------------------

    def _on_pod(self, key: str) -> None:
        self.wakeups.add("pod", "", key)

    def _watch_requests(self, kube) -> None:
        from provisioner.clusters.provisioning_requests import ProvisioningRequests

        ProvisioningRequests(kube).watch(lambda key: self.wakeups.add("provreq", "", key), self.stop)

    def _watch(self, watch) -> None:
        """Runs watch(KubernetesAdapter) until stopped, with a new connection after a failure."""
        from provisioner.clusters.kubernetes import KubernetesAdapter

        warned = False
        while not self.stop.is_set():
            try:
                kube = KubernetesAdapter(self.site.kubernetes)
            except Exception as exc:  # noqa: BLE001 - a config problem: every pass reports it too
                if not warned:
                    self.log(f"watch: cannot watch Kubernetes ({exc}); passes still run on the timer and on asks; "
                             f"trying again every {WATCH_RETRY_S:g} s")
                warned = True
                self.stop.wait(WATCH_RETRY_S)
                continue
            try:
                watch(kube)
            except Exception as exc:  # noqa: BLE001 - it does not raise; if it ever did, start it again
                self.log(f"watch: stopped ({exc.__class__.__name__}: {exc}); starting it again")
                self.stop.wait(1.0)
            finally:
                kube.close()


def run(site: Site, store: Store | None = None, *, stop: threading.Event | None = None,
        out: TextIO | None = None) -> int:
    """The loop, until `stop` is set (None: until SIGTERM or SIGINT, which let the running pass
    finish). Returns the exit code, 0. Raises AlreadyRunning when another loop runs for the site."""
    out = out or sys.stderr
    with run_lock(site):
        store = store or open_store(site)
        stop = stop or threading.Event()
        loop = Loop(site, store, stop, out)
        handler = logging.StreamHandler(out)  # the adapters' warnings (the watch's outages), stamped alike
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
        logger = logging.getLogger("provisioner")
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
        # urllib3 warns at every retry of a connection; the watch says once per outage instead.
        quiet = logging.getLogger("urllib3")
        quiet_level = quiet.level
        quiet.setLevel(logging.ERROR)
        caught: list[str] = []
        restore = _on_signals(stop, loop.wakeups.kick, caught)
        try:
            code = loop.run()
        finally:
            for sig, old in restore.items():
                signal.signal(sig, old)
            logger.removeHandler(handler)
            quiet.setLevel(quiet_level)
        loop.log("provisioner run: stopped" + (f" ({caught[0]})" if caught else ""))
        return code


def _on_signals(stop: threading.Event, kick: threading.Event, caught: list[str]) -> dict:
    """SIGTERM and SIGINT set `stop` (from a thread: Event.set() inside a signal handler could
    wait on the lock the interrupted main thread holds). Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        caught.append(signal.Signals(signum).name)
        threading.Thread(target=lambda: (stop.set(), kick.set()), name="stop", daemon=True).start()

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
