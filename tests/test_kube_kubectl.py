"""Debian's kubectl 1.20 against the test API server, next to the adapter: the check that the
test server speaks real Kubernetes, and that what one client does the other sees."""

from __future__ import annotations

import json

import pytest

from provisioner.errors import OperationError

pytestmark = pytest.mark.integration


def shared_pool(kube):
    kube.add_node("sn01", labels={"sched": "k8s"})
    kube.add_node("sn02", labels={"sched": "slurm"})


def table(output: str) -> list[dict[str, str]]:
    """kubectl's human-readable table -> rows as {HEADER: cell} (cells have no spaces here)."""
    lines = output.strip().splitlines()
    header = lines[0].split()
    return [dict(zip(header, line.split())) for line in lines[1:]]


def test_paper_table1_label_commands_and_the_adapter_agree(kube, kube_adapter, kubectl):
    shared_pool(kube)

    # attach to slurmctld: `kubectl label nodes NODE sched=slurm --overwrite`
    out = kubectl("label", "nodes", "sn01", "sched=slurm", "--overwrite").stdout
    assert "node/sn01 labeled" in out
    assert kube_adapter.node("sn01").role == "slurm"
    assert kubectl("get", "nodes", "-l", "sched=k8s", "-o", "name").stdout.split() == []

    # attach to the k8s master, done by the adapter; kubectl sees it
    kube_adapter.label("sn02", "k8s")
    assert kubectl("get", "nodes", "-l", "sched=k8s", "-o", "name").stdout.split() == ["node/sn02"]
    rows = table(kubectl("get", "nodes", "-l", "sched=k8s").stdout)  # server-side Table output
    assert [(r["NAME"], r["STATUS"]) for r in rows] == [("sn02", "Ready")]
    rows = table(kubectl("get", "nodes", "-L", "sched").stdout)
    assert {r["NAME"]: r["SCHED"] for r in rows} == {"sn01": "slurm", "sn02": "k8s"}

    # without --overwrite kubectl refuses to change an existing label, like against a real server
    proc = kubectl("label", "nodes", "sn01", "sched=k8s", check=False)
    assert proc.returncode != 0 and "already has a value (slurm)" in proc.stderr
    assert kube_adapter.node("sn01").role == "slurm"


def test_cordons_are_seen_both_ways_and_kubectls_cordon_is_not_ours(kube, kube_adapter, kubectl):
    shared_pool(kube)

    assert kube_adapter.cordon("sn01")
    rows = {r["NAME"]: r["STATUS"] for r in table(kubectl("get", "nodes").stdout)}
    assert rows == {"sn01": "Ready,SchedulingDisabled", "sn02": "Ready"}
    assert kubectl("get", "node", "sn01", "-o", "jsonpath={.spec.unschedulable}").stdout == "true"

    assert "node/sn02 cordoned" in kubectl("cordon", "sn02").stdout
    sn02 = kube_adapter.node("sn02")
    assert sn02.unschedulable and sn02.cordoned_by_other
    assert kube_adapter.cordon("sn02") is False
    with pytest.raises(OperationError, match="cordoned by someone else"):
        kube_adapter.uncordon("sn02")
    assert kube_adapter.node("sn02").unschedulable

    kube_adapter.uncordon("sn01")
    assert "node/sn02 uncordoned" in kubectl("uncordon", "sn02").stdout
    assert {r["STATUS"] for r in table(kubectl("get", "nodes").stdout)} == {"Ready"}
    assert not any(n.unschedulable for n in kube_adapter.nodes().values())


def test_kubectl_drain_ignoring_daemonsets_empties_the_node_for_the_adapter(kube, kube_adapter, kubectl):
    shared_pool(kube)
    kube.add_pod("web-1", node="sn01")
    kube.add_pod("web-2", node="sn01")
    kube.add_pod("node-exporter-a1", namespace="kube-system", node="sn01", owner="DaemonSet/node-exporter")
    assert [p.key for p in kube_adapter.node("sn01").pods] == ["default/web-1", "default/web-2"]
    listed = kubectl("get", "pods", "-A", "--field-selector", "spec.nodeName=sn01", "-o", "json").stdout
    assert sorted(p["metadata"]["name"] for p in json.loads(listed)["items"]) == ["node-exporter-a1", "web-1", "web-2"]

    proc = kubectl("drain", "sn01", "--ignore-daemonsets", "--timeout=20s")

    assert "pod/web-1 evicted" in proc.stdout and "pod/web-2 evicted" in proc.stdout
    assert proc.stdout.strip().endswith("node/sn01 evicted")  # kubectl 1.20's "drained"
    assert "ignoring DaemonSet-managed Pods: kube-system/node-exporter-a1" in proc.stderr
    evictions = [r for r in kube.requests if r["path"].endswith("/eviction")]
    assert len(evictions) == 2 and all(r["status"] == 201 for r in evictions)
    assert all(r["user_agent"].startswith("kubectl/v1.20") for r in evictions)
    assert {json.loads(r["body"])["apiVersion"] for r in evictions} <= {"policy/v1", "policy/v1beta1"}
    sn01 = kube_adapter.node("sn01")
    assert not sn01.busy and sn01.unschedulable and sn01.cordoned_by_other  # kubectl's cordon, not ours
    # The evicted pods came back Pending (their ReplicaSet) and are demand once the scheduler tried.
    kube.schedule()
    assert len(kube_adapter.pending_pods()) == 2


def test_kubectl_drain_is_refused_by_a_pdb_and_the_adapter_agrees(kube, kube_adapter, kubectl):
    shared_pool(kube)
    kube.add_pod("db-0", node="sn01", labels={"app": "db"}, owner="StatefulSet/db")
    kube.add_pdb("db", match_labels={"app": "db"}, min_available=1)

    # kubectl 1.20 retries a 429 every 5 s until its timeout: one retry pause, then it gives up.
    proc = kubectl("drain", "sn01", "--ignore-daemonsets", "--timeout=2s", check=False)

    assert proc.returncode != 0
    assert "Cannot evict pod as it would violate the pod's disruption budget" in proc.stderr
    assert kube.pod("db-0")["spec"]["nodeName"] == "sn01"
    result = kube_adapter.evict_pods("sn01")  # kubectl's cordon is there: eviction may be asked
    assert result.evicted == () and result.remaining == ("default/db-0",) and not result.free
    assert kube.pod("db-0") is not None
    assert kubectl("get", "pdb", "db", "-o", "jsonpath={.status.disruptionsAllowed}").stdout == "0"


def test_kubectl_sees_a_stale_resource_version_conflict(kube, kubectl):
    shared_pool(kube)
    stale = kube.node("sn01")["metadata"]["resourceVersion"]
    kubectl("label", "nodes", "sn01", "team=hpc")
    proc = kubectl("label", "nodes", "sn01", "sched=slurm", "--overwrite", f"--resource-version={stale}", check=False)
    assert proc.returncode != 0 and "the object has been modified" in proc.stderr
    assert kube.node("sn01")["metadata"]["labels"]["sched"] == "k8s"


def test_kubectl_gets_pending_pods_as_the_adapter_does(kube, kube_adapter, kubectl):
    shared_pool(kube)
    kube.add_pod("web-1", node="sn01")
    kube.add_pod("big-1", requests={"cpu": "64", "memory": "1Gi"})
    kube.schedule()
    rows = table(kubectl("get", "pods", "--field-selector", "status.phase=Pending").stdout)
    assert [(r["NAME"], r["STATUS"]) for r in rows] == [("big-1", "Pending")]
    assert [p.name for p in kube_adapter.pending_pods()] == ["big-1"]
    proc = kubectl("get", "pods", "--field-selector", "spec.color=blue", check=False)
    assert proc.returncode != 0 and "field label not supported: spec.color" in proc.stderr
