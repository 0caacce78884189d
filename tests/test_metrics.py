"""`GET /metrics` of the boot endpoint, through Flask's test client: per-request counters and the
metrics read from the store (provisioner/boot/metrics.py). The real server (gunicorn's workers
adding up) and a real Prometheus scraping it: tests/test_metrics_prometheus.py."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from provisioner.boot.app import create_app
from provisioner.boot.metrics import PHASE_BUCKETS, SwitchLog
from provisioner.store import Store
from provisioner.boot.boots import Boots
from testbed.site import mac
from tests.support import require_binary


def scrape(client) -> dict[tuple, float]:
    """{(sample name, (label, value), ...): value} of one scrape."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def value(samples, name, **labels) -> float:
    """The sample's value. A labelled counter has no sample for a label set it never counted
    (0 then), but a metric the endpoint no longer serves at all fails: `== 0` must not pass
    because the metric disappeared."""
    key = (name, *sorted(labels.items()))
    if key in samples:
        return samples[key]
    label_sets = {tuple(k for k, _ in key[1:]) for key in samples if key[0] == name}
    assert label_sets, f"the endpoint serves no metric {name}"
    assert tuple(sorted(labels)) in label_sets, f"{name} has labels {label_sets}, not {sorted(labels)}"
    return 0.0


@pytest.fixture
def app(site):
    app = create_app(site)
    app.extensions["provisioner.metrics"].store_collector.cache_s = 0  # every scrape reads the store
    return app


def test_boot_requests_and_callbacks_are_counted_by_outcome(app, site):
    client = app.test_client()
    for _ in range(3):
        client.get(f"/ipxe?mac={mac(1, 3)}")  # sn01, slurm
    client.get("/boot.ipxe")
    client.get("/ipxe?mac=52:54:00:99:99:99")
    client.get("/ipxe?mac=hello")
    client.get("/ipxe")
    client.post("/ipxe?mac=x")  # 405: the waiting script
    Store(site.store).set_role(["sn02"], "k8s", actor="t", reason="r", pin=True)
    client.get(f"/ipxe?mac={mac(2, 3)}")
    tok = Boots.for_site(site).token("sn01")
    assert client.post("/api/v1/nodes/sn01/booted", json={"role": "slurm", "token": tok},
                       environ_base={"REMOTE_ADDR": "10.0.3.1"}).status_code == 200
    assert client.post("/api/v1/nodes/sn01/booted", json={"role": "slurm", "token": "nope"}).status_code == 403
    assert client.post("/api/v1/nodes/zz/booted", json={"role": "slurm"}).status_code == 404

    m = scrape(client)
    req = "provisioner_boot_requests_total"
    assert value(m, req, outcome="script", role="slurm") == 3
    assert value(m, req, outcome="script", role="k8s") == 1
    assert value(m, req, outcome="stage1", role="") == 1
    assert value(m, req, outcome="unknown_mac", role="") == 1
    assert value(m, req, outcome="bad_mac", role="") == 2
    assert value(m, req, outcome="bad_request", role="") == 1
    assert value(m, req, outcome="error", role="") == 0
    assert sum(v for k, v in m.items() if k[0] == req) == 9
    assert value(m, "provisioner_boot_callbacks_total", result="accepted") == 1
    assert value(m, "provisioner_boot_callbacks_total", result="refused") == 2
    assert value(m, "provisioner_boot_unexpected_errors_total") == 0


def test_a_bug_is_counted_once_as_an_error(app, monkeypatch):
    service = app.extensions["provisioner.boot"]

    def broken(*_a, **_k):
        raise RuntimeError("bug")

    monkeypatch.setattr(service, "node_script", broken)
    client = app.test_client()
    r = client.get(f"/ipxe?mac={mac(1, 3)}")  # the fast path fails, the Flask route fails again
    assert r.status_code == 200 and "internal error" in r.text
    m = scrape(client)
    assert value(m, "provisioner_boot_requests_total", outcome="error", role="") == 1
    assert value(m, "provisioner_boot_unexpected_errors_total") == 1
    assert sum(v for k, v in m.items() if k[0] == "provisioner_boot_requests_total") == 1


def switch_events(store: Store, node: str, to: str, phases: list[str], end: str = "switched") -> None:
    """The events a reconciler's switch writes (same kinds, same data), without clusters."""
    store.update(node, actor="t", kind="switch", message="switch", data={"to": to, "reason": "t", "forced": False},
                 phase="requested", target_role=to)
    prev = "requested"
    for p in phases:
        store.update(node, actor="t", kind="phase", message=f"{prev} -> {p}", data={"from": prev, "to": p, "target": to},
                     phase=p)
        prev = p
    if end == "switched":
        store.update(node, actor="t", kind="switched", message="now", data={"to": to}, phase="steady", target_role=None)
    elif end == "failed":
        store.update(node, actor="t", kind="failed", message="FAILED", phase="failed", failed_reason="x")
    elif end == "rollback":
        store.update(node, actor="t", kind="rollback", message="rolled back", phase="steady", target_role=None)


def test_store_metrics_nodes_switches_and_phase_durations(app, site):
    client = app.test_client()
    store = Store(site.store)
    m = scrape(client)
    assert value(m, "provisioner_store_up") == 1
    n_nodes = len(site.nodes)
    assert sum(v for k, v in m.items() if k[0] == "provisioner_nodes") == n_nodes
    assert value(m, "provisioner_nodes", role="slurm", phase="steady") >= 1
    assert value(m, "provisioner_switches_started_total", to="k8s") == 0
    assert value(m, "provisioner_phase_timeout_seconds") == site.policy.phase_timeout_s

    switch_events(store, "sn01", "k8s", ["draining", "rebooting", "booting", "joining"])
    switch_events(store, "sn02", "k8s", ["draining", "rebooting", "booting"], end="failed")
    m = scrape(client)
    assert value(m, "provisioner_switches_started_total", to="k8s") == 2
    assert value(m, "provisioner_switches_finished_total", to="k8s") == 1
    assert value(m, "provisioner_switches_failed_total", to="k8s") == 1
    assert value(m, "provisioner_switches_failed_total", to="slurm") == 0
    assert value(m, "provisioner_nodes", role=store.get("sn02").desired_role, phase="failed") == 1
    assert value(m, "provisioner_node_phase_seconds", node="sn02", phase="failed", to="k8s") >= 0
    assert ("provisioner_node_phase_seconds", ("node", "sn01"), ("phase", "steady"), ("to", "")) not in m
    hist = "provisioner_phase_duration_seconds"
    # requested, draining, rebooting, booting, joining for sn01; all but joining for sn02
    assert value(m, hist + "_count", phase="booting", to="k8s") == 2
    assert value(m, hist + "_count", phase="joining", to="k8s") == 1
    assert value(m, hist + "_bucket", phase="requested", to="k8s", le="+Inf") == 2
    assert value(m, hist + "_bucket", phase="requested", to="k8s", le=f"{float(PHASE_BUCKETS[-1])}") == 2

    # Incremental: the next scrape reads only what came after; a rollback and a switch back.
    switch_events(store, "sn02", "slurm", [], end=None)
    store.update("sn02", actor="t", kind="phase", message="x", data={"from": "requested", "to": "cordoning",
                                                                       "target": "slurm"}, phase="cordoning")
    store.update("sn02", actor="t", kind="rollback", message="rolled back", phase="steady", target_role=None)
    m2 = scrape(client)
    assert value(m2, "provisioner_switches_started_total", to="slurm") == 1
    assert value(m2, "provisioner_switches_rolled_back_total", to="slurm") == 1
    assert value(m2, "provisioner_switches_started_total", to="k8s") == 2  # not counted again
    assert value(m2, hist + "_count", phase="cordoning", to="slurm") == 1


def test_switch_log_follows_retries_and_refused_reboots():
    class E:
        def __init__(self, id, ts, kind, data=None, node="n1"):
            self.id, self.ts, self.kind, self.data, self.node = id, ts, kind, data, node

    log = SwitchLog()
    log.feed([
        E(1, 0, "switch", {"to": "slurm"}),
        E(2, 10, "phase", {"from": "requested", "to": "cordoning", "target": "slurm"}),
        E(3, 40, "phase", {"from": "cordoning", "to": "rebooting", "target": "slurm"}),
        E(4, 45, "reboot-refused"),  # back to cordoning
        E(5, 100, "phase", {"from": "cordoning", "to": "rebooting", "target": "slurm"}),
        E(6, 101, "retry"),  # a failed power action: still rebooting
        E(7, 110, "phase", {"from": "rebooting", "to": "booting", "target": "slurm"}),
        E(8, 400, "retry"),  # timed out in booting: rebooting again
        E(9, 410, "phase", {"from": "rebooting", "to": "booting", "target": "slurm"}),
        E(10, 1000, "failed"),
        E(11, 2000, "failed", node="n2"),  # slurmctld's give-up of a steady node
    ])
    assert log.durations[("cordoning", "slurm")][-1] == 2
    assert log.durations[("cordoning", "slurm")][-2] == 30 + 55
    assert log.durations[("rebooting", "slurm")][-1] == 3  # 5 s, 10 s (with the power retry in it), 10 s
    assert log.durations[("rebooting", "slurm")][-2] == 5 + 10 + 10
    assert log.durations[("booting", "slurm")][-1] == 2
    assert log.failed == {"slurm": 2}
    log.feed([E(11, 3000, "switch", {"to": "k8s"})])  # seen already: ignored
    assert log.started == {"slurm": 1}


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "prometheus"


def test_example_alert_rules_pass_promtool():
    """examples/prometheus/: `promtool check rules`, then the rules' own unit tests
    (provisioner-alerts.test.yml: each alert fires when it should and not before)."""
    promtool = require_binary("promtool")
    for argv in (["check", "rules", "provisioner-alerts.yml"], ["test", "rules", "provisioner-alerts.test.yml"]):
        r = subprocess.run([promtool, *argv], cwd=EXAMPLES, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "SUCCESS" in r.stdout


def test_alert_rules_name_only_metrics_the_endpoint_serves(app):
    """A renamed metric must not leave an alert that can never fire."""
    import re

    client = app.test_client()
    client.get("/ipxe?mac=hello")
    served = {k[0] for k in scrape(client)} | {"provisioner_node_phase_seconds"}  # that one only when switching
    named = set(re.findall(r"\bprovisioner_[a-z_]+", (EXAMPLES / "provisioner-alerts.yml").read_text()))
    assert named and named <= served, named - served


def test_switch_log_counts_an_event_that_commits_after_a_later_id():
    """PostgreSQL: ids come from a sequence, so id 3 may become visible after id 4."""
    class E:
        def __init__(self, id, kind, to):
            self.id, self.ts, self.kind, self.data, self.node = id, float(id), kind, {"to": to}, f"n{id}"

    log = SwitchLog()
    log.feed([E(1, "switch", "k8s"), E(2, "switch", "k8s"), E(4, "switch", "slurm")])
    log.feed([E(2, "switch", "k8s"), E(3, "switch", "slurm"), E(4, "switch", "slurm"), E(5, "switch", "k8s")])
    log.feed([E(3, "switch", "slurm"), E(4, "switch", "slurm"), E(5, "switch", "k8s")])
    assert log.started == {"k8s": 3, "slurm": 2}


@pytest.mark.integration
def test_store_metrics_on_postgresql(site, pg_url):
    """The same reads through the PostgreSQL store (a real server, tests/fixtures/postgres.py)."""
    from provisioner.boot.metrics import StoreCollector

    url, password_file = pg_url
    store = Store(url, password_file=password_file)
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    collector = StoreCollector(site, store, cache_s=0)
    switch_events(store, "sn01", "k8s", ["draining", "rebooting", "booting", "joining"])
    switch_events(store, "sn02", "slurm", ["cordoning"], end="rollback")

    def samples():
        return {(s.name, *sorted(s.labels.items())): s.value for fam in collector.collect() for s in fam.samples}

    m = samples()
    assert value(m, "provisioner_store_up") == 1
    assert sum(v for k, v in m.items() if k[0] == "provisioner_nodes") == len(site.nodes)
    assert value(m, "provisioner_switches_started_total", to="k8s") == 1
    assert value(m, "provisioner_switches_finished_total", to="k8s") == 1
    assert value(m, "provisioner_switches_rolled_back_total", to="slurm") == 1
    assert value(m, "provisioner_phase_duration_seconds_count", phase="joining", to="k8s") == 1
    switch_events(store, "sn01", "slurm", ["cordoning", "rebooting", "booting"], end="failed")
    m = samples()
    assert value(m, "provisioner_switches_failed_total", to="slurm") == 1
    assert value(m, "provisioner_switches_started_total", to="k8s") == 1
    assert value(m, "provisioner_nodes", role=store.get("sn01").desired_role, phase="failed") == 1


def test_a_reclaim_a_budget_refused_is_a_held_metric_for_cooldown_s(app, site):
    """A node whose reclaim a PodDisruptionBudget refused (recorded on the node by the switch's
    rollback): provisioner_reclaim_held{node,reason} is 1 while decide() holds it."""
    client = app.test_client()
    store = Store(site.store)
    assert not [k for k in scrape(client) if k[0] == "provisioner_reclaim_held"]
    store.update("sn01", actor="t", kind="rollback", message="refused", evict_refused_at=time.time(),
                 evict_refused="default/web-0: Cannot evict pod as it would violate the pod's disruption budget.")
    assert value(scrape(client), "provisioner_reclaim_held", node="sn01", reason="pod-disruption-budget") == 1
    store.update("sn01", actor="t", kind="test", message="long ago",
                 evict_refused_at=time.time() - site.policy.cooldown_s - 1)
    assert not [k for k in scrape(client) if k[0] == "provisioner_reclaim_held"]
