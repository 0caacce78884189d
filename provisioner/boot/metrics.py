"""`GET /metrics` of the boot endpoint, in the Prometheus text format (prometheus_client).

Two kinds of metrics:

- Counted in the workers, per request: boot requests by outcome, callbacks by result, unexpected
  errors. gunicorn runs several worker processes, so `provisioner serve` runs prometheus_client's
  multiprocess mode (see `multiprocess_dir()`): each worker adds to its own mmap'ed file in a
  private folder, and a scrape, whichever worker answers it, sums the files of all workers, dead
  ones included (a counter must not go down when gunicorn replaces a worker). Without that
  folder (tests, `create_app()` in one process) the counters live in the process.
- Read from the store at scrape time (StoreCollector): nodes per role and phase, how long each
  switching or failed node has been in its phase, switches started / finished / failed / rolled
  back by direction and a histogram of completed phase durations, both derived from the event
  log. The balancer needs no exporter of its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import Counter as Tally
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, generate_latest, values
from prometheus_client import multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from provisioner.errors import ProvisionerError
from provisioner.model import Site
from provisioner.policy import reclaim_held
from provisioner.states import FAILED, K8S, PHASES, REBOOTING, ROLES, SLURM, STEADY, SWITCHING
from provisioner.store import Store

# The classic text format (what generate_latest writes for these names), which every Prometheus reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENV = "PROMETHEUS_MULTIPROC_DIR"
CACHE_S = 1.0  # store metrics are re-read at most once a second per worker (keep it < scrape_interval)

# Outcomes of GET /ipxe and GET /boot.ipxe (label `outcome`).
OUTCOMES = ("stage1", "script", "unknown_mac", "bad_mac", "store_unavailable", "not_bootable",
            "bad_request", "error")
CALLBACK_RESULTS = ("accepted", "refused", "store_busy")
PHASE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
SWITCH_KINDS = ("switch", "phase", "switched", "failed", "rollback", "retry", "reboot-refused")


# --------------------------------------------------------------------------- multiprocess mode


def multiprocess_dir() -> Path:
    """For `provisioner serve`, before the app is built and gunicorn forks: a new private folder
    (mode 0700, empty) named in PROMETHEUS_MULTIPROC_DIR, and prometheus_client switched to its
    multiprocess values (it picks them when first imported, which may have been earlier)."""
    path = Path(tempfile.mkdtemp(prefix="provisioner-metrics-"))
    os.environ[ENV] = str(path)
    values.ValueClass = values.MultiProcessValue()
    return path


def worker_exited(path: Path, pid: int) -> None:
    """gunicorn's child_exit: its files stay (their counts are part of the totals)."""
    multiprocess.mark_process_dead(pid, str(path))


def remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def multiprocess_on() -> bool:
    return bool(getattr(values.ValueClass, "_multiprocess", False)) and bool(os.environ.get(ENV))


# --------------------------------------------------------------------------- the endpoint's counters


class BootMetrics:
    """The per-request counters, and the registry a scrape renders."""

    def __init__(self, site: Site, store: Store):
        self.local = CollectorRegistry(auto_describe=True)  # the counters when not in multiprocess mode
        self.requests = Counter("provisioner_boot_requests", "GET /ipxe and /boot.ipxe by outcome "
                                "(script: the node's boot script for `role`; the others: the waiting script)",
                                ["outcome", "role"], registry=self.local)
        self.callbacks = Counter("provisioner_boot_callbacks", "POST /api/v1/nodes/NODE/booted by result",
                                 ["result"], registry=self.local)
        self.errors = Counter("provisioner_boot_unexpected_errors", "requests that raised an unexpected "
                              "exception (a bug; logged), on any path", registry=self.local)
        # Children bound once: the hot path then costs one dict lookup and one increment.
        self._req = {(o, r): self.requests.labels(o, r) for o in OUTCOMES
                     for r in (ROLES if o in ("script", "not_bootable") else ("",))}
        self._cb = {r: self.callbacks.labels(r) for r in CALLBACK_RESULTS}
        self.store_collector = StoreCollector(site, store)
        if multiprocess_on():  # every worker's files, summed at each scrape
            self.registry = CollectorRegistry(auto_describe=True)
            multiprocess.MultiProcessCollector(self.registry)
        else:
            self.registry = self.local
        self.registry.register(self.store_collector)

    def boot(self, outcome: str, role: str | None = None) -> None:
        child = self._req.get((outcome, role or ""))
        if child is None:
            child = self.requests.labels(outcome, role or "")
        child.inc()

    def callback(self, result: str) -> None:
        self._cb[result].inc()

    def unexpected(self) -> None:
        self.errors.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


# --------------------------------------------------------------------------- from the store


class _Node:
    __slots__ = ("phase", "since", "to")

    def __init__(self):
        self.phase, self.since, self.to = None, None, None


class SwitchLog:
    """Counts and phase durations from the event log, read incrementally: each scrape reads only
    the events after the last one it has seen (the log is append-only).

    A node's phase is followed through the events that change it: `switch` (-> requested),
    `phase` (data from/to), `reboot-refused` (rebooting -> draining or cordoning), `retry` (from
    booting or joining back to rebooting; a retry in rebooting is a failed power action and
    stays), `switched` (-> steady), `failed`, `rollback` (-> steady). A phase's duration is the
    time between the event that entered it and the one that left it.

    Each read returns the newest events (a window); an event is new when its id is above the
    last one seen, or inside the previous window without having been in it: with PostgreSQL,
    ids come from a sequence and a transaction may commit after one that took a later id."""

    def __init__(self):
        self.last_id = 0
        self.window: set[int] = set()  # the ids of the previous read
        self.window_low = 0
        self.started: Tally = Tally()
        self.finished: Tally = Tally()
        self.failed: Tally = Tally()
        self.rolled_back: Tally = Tally()
        self.durations: dict[tuple[str, str], list] = {}  # (phase, to) -> [bucket counts..., sum, count]
        self.nodes: dict[str, _Node] = {}

    def feed(self, events) -> None:
        events = list(events)
        new = [e for e in events if e.id > self.last_id or (e.id >= self.window_low and e.id not in self.window)]
        if events:
            self.window = {e.id for e in events}
            self.window_low = min(self.window)
        for e in new:
            self.last_id = max(self.last_id, e.id)
            if e.node is None:
                continue
            n = self.nodes.setdefault(e.node, _Node())
            data = e.data or {}
            if e.kind == "switch":
                n.to = data.get("to") or n.to
                self.started[n.to or "unknown"] += 1
                self._enter(n, "requested", e.ts)
            elif e.kind == "phase":
                n.to = data.get("target") or n.to
                self._leave(n, e.ts, data.get("from"))
                self._enter(n, data.get("to"), e.ts)
            elif e.kind == "reboot-refused":
                self._leave(n, e.ts, REBOOTING)
                self._enter(n, "draining" if n.to == K8S else "cordoning", e.ts)
            elif e.kind == "retry":
                if n.phase in ("booting", "joining"):
                    self._leave(n, e.ts)
                    self._enter(n, REBOOTING, e.ts)
            elif e.kind == "switched":
                n.to = data.get("to") or n.to
                self.finished[n.to or "unknown"] += 1
                self._leave(n, e.ts)
                self._enter(n, STEADY, e.ts)
            elif e.kind == "failed":
                # From steady only slurmctld's give-up (states.py: given-up, switches to slurm).
                to = n.to if n.phase in SWITCHING else SLURM
                self.failed[to or "unknown"] += 1
                self._leave(n, e.ts)
                self._enter(n, FAILED, e.ts)
            elif e.kind == "rollback":
                self.rolled_back[n.to or "unknown"] += 1
                self._leave(n, e.ts)
                self._enter(n, STEADY, e.ts)

    @staticmethod
    def _enter(n: _Node, phase: str | None, ts: float) -> None:
        n.phase, n.since = phase, ts

    def _leave(self, n: _Node, ts: float, expected: str | None = None) -> None:
        if n.phase not in SWITCHING or n.since is None or (expected is not None and expected != n.phase):
            return  # not followed from its start (the log began mid-switch): not measured
        d = max(0.0, ts - n.since)
        row = self.durations.setdefault((n.phase, n.to or "unknown"), [0] * (len(PHASE_BUCKETS) + 2))
        for i, b in enumerate(PHASE_BUCKETS):
            if d <= b:
                row[i] += 1
        row[-2] += d
        row[-1] += 1


class StoreCollector:
    """prometheus_client collector: read the store at scrape time (two queries), at most once
    per CACHE_S. A store that cannot be read gives provisioner_store_up 0 and the last counts."""

    def __init__(self, site: Site, store: Store, cache_s: float = CACHE_S, batch: int = 500):
        self.site, self.store, self.cache_s, self.batch = site, store, cache_s, batch
        self.log = SwitchLog()
        self.lock = threading.Lock()
        self.read_at = -1e9
        self.up = 0
        self.node_rows: list = []

    def describe(self):
        return []  # names come from collect(); no read of the store at registration

    def refresh(self) -> None:
        with self.lock:
            if time.monotonic() - self.read_at < self.cache_s:
                return
            try:
                self.node_rows = list(self.store.nodes().values())
                self.log.feed(self._new_events())
                self.up = 1
            except ProvisionerError:
                self.up = 0
            self.read_at = time.monotonic()

    def _new_events(self):
        """The newest events, through Store.events(limit=) (oldest first): the last `batch` of
        them when those reach back to what was seen already, else the whole log (the first read;
        `provisioner serve` makes it before forking, so its workers start from there)."""
        events = self.store.events(kinds=SWITCH_KINDS, limit=self.batch)
        if len(events) < self.batch or events[0].id <= self.log.last_id:
            return events
        return self.store.events(kinds=SWITCH_KINDS)

    def collect(self):
        self.refresh()
        now = time.time()
        up = GaugeMetricFamily("provisioner_store_up", "1 when the boot endpoint could read the store at this scrape")
        up.add_metric([], self.up)
        yield up

        nodes = GaugeMetricFamily("provisioner_nodes", "nodes by desired role and phase (the store's nodes table)",
                                  labels=["role", "phase"])
        counts = Tally((st.desired_role, st.phase) for st in self.node_rows)
        for role in ROLES:
            for phase in PHASES:
                nodes.add_metric([role, phase], counts.get((role, phase), 0))
        yield nodes

        in_phase = GaugeMetricFamily("provisioner_node_phase_seconds", "seconds each node that is switching or "
                                     "failed has been in its phase (steady nodes are left out)",
                                     labels=["node", "phase", "to"])
        for st in self.node_rows:
            if st.phase != STEADY:
                in_phase.add_metric([st.name, st.phase, st.target_role or ""],
                                    max(0.0, now - st.phase_since) if st.phase_since else 0.0)
        yield in_phase

        held = GaugeMetricFamily("provisioner_reclaim_held", "1 for each node its home side wants back but "
                                 "cannot take: a PodDisruptionBudget refused the eviction (held for cooldown_s)",
                                 labels=["node", "reason"])
        for st in self.node_rows:
            if reclaim_held(st.evict_refused_at, st.evict_refused, self.site.policy.cooldown_s, now):
                held.add_metric([st.name, "pod-disruption-budget"], 1.0)
        yield held

        timeout = GaugeMetricFamily("provisioner_phase_timeout_seconds", "policy.phase_timeout_s: a switching "
                                    "phase older than this is retried, rolled back or failed by the next pass")
        timeout.add_metric([], float(self.site.policy.phase_timeout_s))
        yield timeout

        log = self.log
        for name, tally, doc in (
                ("provisioner_switches_started", log.started, "switches started (`switch` events), by target role"),
                ("provisioner_switches_finished", log.finished, "switches finished (`switched` events), by target role"),
                ("provisioner_switches_failed", log.failed, "nodes marked failed (`failed` events), by target role"),
                ("provisioner_switches_rolled_back", log.rolled_back, "switches rolled back (`rollback` events)")):
            fam = CounterMetricFamily(name, doc, labels=["to"])
            for to in sorted(set(ROLES) | set(tally)):
                fam.add_metric([to], tally.get(to, 0))
            yield fam

        hist = HistogramMetricFamily("provisioner_phase_duration_seconds", "time spent in each switching phase, "
                                     "from the events that entered and left it", labels=["phase", "to"])
        for (phase, to), row in sorted(log.durations.items()):
            buckets = [(floatToGoString(b), row[i]) for i, b in enumerate(PHASE_BUCKETS)] + [("+Inf", row[-1])]
            hist.add_metric([phase, to], buckets, row[-2])
        yield hist
