"""KubernetesAdapter.watch_unschedulable against the real control plane (kube-apiserver,
kube-scheduler v1.34.3), under the provisioner's RBAC-limited identity: it reports the pods the
real scheduler marks Unschedulable, re-watches when the server ends a watch, and rides out an
API server it cannot reach (a TCP gate in front of the real one goes down and comes back)."""

from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager

import pytest

from provisioner.clusters.kubernetes import KubernetesAdapter
from provisioner.model import KubernetesSettings
from testbed.kube_control_plane import PROVISIONER_USER
from testbed.tcp_gate import TcpGate
from testbed.wait import wait_for

pytestmark = pytest.mark.integration

LOGGER = "provisioner.clusters.kubernetes"


class Seen:
    """on_pod: records what the watch reported (from the watch's thread)."""

    def __init__(self):
        self.keys: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, key: str) -> None:
        with self._lock:
            self.keys.append(key)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self.keys


@contextmanager
def watching(adapter: KubernetesAdapter, timeout_s: int = 60):
    """The watch in a thread; on the way out it must return once stop is set."""
    seen, stop = Seen(), threading.Event()
    thread = threading.Thread(target=adapter.watch_unschedulable, args=(seen, stop, timeout_s), daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive(), "watch_unschedulable did not return after stop was set"


def pod_requests(kube, since: int, stage: str = "ResponseComplete") -> list[dict]:
    """The provisioner's list and watch requests on pods since the audit log offset `since`
    that reached `stage`, oldest first: {verb, uri} (verb "list" or "watch")."""
    out = []
    with open(kube.plane.audit_log, "rb") as fh:
        fh.seek(since)
        for line in fh.read().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line being written
            if ((e.get("user") or {}).get("username") == PROVISIONER_USER and e.get("stage") == stage
                    and (e.get("objectRef") or {}).get("resource") == "pods" and e.get("verb") in ("list", "watch")):
                out.append({"verb": e["verb"], "uri": e["requestURI"]})
    return out


def pod_calls(kube, since: int) -> list[dict]:
    """Completed requests (a watch completes when the server ends it)."""
    return pod_requests(kube, since)


def watch_started(kube, since: int) -> bool:
    """A watch of the provisioner's is open (its response started) since `since`."""
    return any(r["verb"] == "watch" for r in pod_requests(kube, since, "ResponseStarted"))


def outage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def failed_attempts(caplog) -> int:
    return sum(r.name == LOGGER and r.getMessage().startswith("watch attempt failed") for r in caplog.records)


def test_an_unschedulable_pod_is_reported_a_scheduled_one_is_not(kube, kube_adapter):
    kube.add_node("kn01", cpu="2", memory="4Gi")
    # Until the new node is schedulable (its not-ready taint lifted) a pod is Unschedulable for a
    # moment, and rightly reported: let one pod find it first.
    kube.add_pod("first")
    kube.wait_bound("first", node="kn01")
    mark = kube.plane.audit_mark()
    with watching(kube_adapter) as seen:
        wait_for(lambda: watch_started(kube, mark), 30, "the watch to start")
        kube.add_pod("fits")
        kube.wait_bound("fits", node="kn01")
        kube.add_pod("too-big", namespace="ml", requests={"cpu": "64", "memory": "128Mi"})
        kube.wait_unschedulable("too-big", "ml")
        wait_for(lambda: "ml/too-big" in seen, 30, "the watch to report ml/too-big")
    assert "default/fits" not in seen.keys
    # Reported by the watch (the pod came after the list), under the provisioner's own RBAC rights.
    calls = pod_calls(kube, mark)
    assert [c["verb"] for c in calls][:1] == ["list"] and "fieldSelector=spec.nodeName%3D" in calls[0]["uri"]


def test_the_watch_survives_its_server_timeout_and_goes_on_from_its_resource_version(kube, kube_adapter, caplog):
    mark = kube.plane.audit_mark()
    with watching(kube_adapter, timeout_s=1) as seen:
        # The server ends each watch after 1 s; wait until it has done so three times.
        wait_for(lambda: sum(c["verb"] == "watch" for c in pod_calls(kube, mark)) >= 3, 60,
                 "three watches the server ended")
        kube.add_pod("late", requests={"cpu": "64", "memory": "128Mi"})  # no node at all: unschedulable
        kube.wait_unschedulable("late")
        wait_for(lambda: "default/late" in seen, 30, "the watch to report default/late")
    calls = pod_calls(kube, mark)
    assert [c["verb"] for c in calls].count("list") == 1, calls  # listed once, never again
    watches = [c["uri"] for c in calls if c["verb"] == "watch"]
    assert all("resourceVersion=" in u and "timeoutSeconds=1" in u for u in watches), watches
    assert outage_lines(caplog) == []


def test_an_unreachable_api_server_is_one_warning_and_no_exception(kube, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    settings = KubernetesSettings(kubeconfig=str(kube.unreachable_kubeconfig(tmp_path / "kubeconfig")), timeout_s=2)
    with KubernetesAdapter(settings) as adapter, watching(adapter) as seen:
        wait_for(lambda: outage_lines(caplog), 30, "the outage warning")
        after = failed_attempts(caplog)
        wait_for(lambda: failed_attempts(caplog) >= after + 3, 60, "three more failed attempts")
    assert seen.keys == []
    (line,) = outage_lines(caplog)
    assert "connection refused" in line and "retrying" in line


def test_the_watch_comes_back_after_an_outage_and_reports_what_happened_meanwhile(kube, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    gate = TcpGate(int(kube.server.rsplit(":", 1)[1])).start()
    path = kube.plane.kubeconfig(PROVISIONER_USER, tmp_path / "kubeconfig-gated",
                                 server=f"https://127.0.0.1:{gate.port}")
    try:
        with KubernetesAdapter(KubernetesSettings(kubeconfig=str(path), timeout_s=2)) as adapter:
            mark = kube.plane.audit_mark()
            with watching(adapter) as seen:
                wait_for(lambda: watch_started(kube, mark), 30, "the watch to start")
                kube.add_pod("before")
                wait_for(lambda: "default/before" in seen, 30, "the watch to report default/before")

                gate.down()  # the open watch is cut, new connections are refused
                wait_for(lambda: outage_lines(caplog), 30, "the outage warning")
                kube.add_pod("meanwhile")
                kube.wait_unschedulable("meanwhile")
                after = failed_attempts(caplog)
                wait_for(lambda: failed_attempts(caplog) >= after + 2, 60, "two more failed attempts")
                assert "default/meanwhile" not in seen

                gate.up()
                wait_for(lambda: "default/meanwhile" in seen, 60, "the watch to report default/meanwhile")
                kube.add_pod("after")
                wait_for(lambda: "default/after" in seen, 30, "the watch to report default/after")
    finally:
        gate.stop()
    assert len(outage_lines(caplog)) == 1, outage_lines(caplog)
