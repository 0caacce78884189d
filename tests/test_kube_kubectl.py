"""kubectl (built from the same release as the server) next to the adapter, against the real
control plane: what one client does, the other sees; kubectl's drain and the adapter's
evictions meet the same PodDisruptionBudgets, decided by the real disruption controller."""

from __future__ import annotations

import json

import pytest

from provisioner.errors import OperationError
from testbed.kube_control_plane import VERSION
from testbed.wait import wait_for

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
    versions = json.loads(kubectl("version", "-o", "json").stdout)  # the real server, kubectl of its release
    assert versions["serverVersion"]["gitVersion"] == versions["clientVersion"]["gitVersion"] == VERSION
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
    assert [(r["NAME"], r["STATUS"], r["VERSION"]) for r in rows] == [("sn02", "Ready", VERSION)]
    rows = table(kubectl("get", "nodes", "-L", "sched").stdout)
    assert {r["NAME"]: r["SCHED"] for r in rows} == {"sn01": "slurm", "sn02": "k8s"}

    # without --overwrite kubectl refuses to change an existing label
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
    kube.add_node("sn01", labels={"sched": "k8s"})
    kube.add_replicaset("web", 2)
    kube.add_daemonset("node-exporter", node_selector={"kubernetes.io/hostname": "sn01"})
    wait_for(lambda: len(kube.pods("sn01")) == 3 and all(p["status"].get("phase") == "Running"
                                                         for p in kube.pods("sn01")), 30, "3 pods running on sn01")
    assert len(kube_adapter.node("sn01").pods) == 2  # the DaemonSet's pod does not hold the node

    proc = kubectl("drain", "sn01", "--ignore-daemonsets", "--timeout=60s")

    assert proc.stdout.count("evicted") >= 2 and "node/sn01 drained" in proc.stdout
    assert "ignoring DaemonSet-managed Pods: kube-system/node-exporter-" in proc.stderr
    sn01 = kube_adapter.node("sn01")
    assert not sn01.busy and sn01.unschedulable and sn01.cordoned_by_other  # kubectl's cordon, not ours
    # The ReplicaSet replaced the evicted pods; they are demand once the scheduler tried them.
    wait_for(lambda: len(kube_adapter.pending_pods()) == 2, 30, "two replacement pods Unschedulable")


def test_kubectl_drain_is_refused_by_a_pdb_and_the_adapter_agrees(kube, kube_adapter, kubectl):
    shared_pool(kube)
    kube.add_replicaset("db", 1, node_selector={"kubernetes.io/hostname": "sn01"})
    # Running first: the Eviction API lets a Pending pod go whatever its budget says.
    wait_for(lambda: [p for p in kube_adapter.node("sn01").pods if p.phase == "Running"], 30, "the db pod running")
    (db,) = kube_adapter.node("sn01").pods
    kube.add_pdb("db", match_labels={"app": "db"}, min_available=1)
    kube.wait_pdb("db", allowed=0)

    # kubectl retries a 429 every 5 s until its timeout.
    proc = kubectl("drain", "sn01", "--ignore-daemonsets", "--timeout=3s", check=False)

    assert proc.returncode != 0
    assert "Cannot evict pod as it would violate the pod's disruption budget" in proc.stderr
    result = kube_adapter.evict_pods("sn01")  # kubectl's cordon is there: eviction may be asked
    assert result.evicted == () and result.remaining == (db.key,) and not result.free
    assert kube.pod(db.name) is not None and not kube.pod(db.name)["metadata"].get("deletionTimestamp")
    assert kubectl("get", "pdb", "db", "-o", "jsonpath={.status.disruptionsAllowed}").stdout == "0"


def test_kubectl_gets_pending_pods_as_the_adapter_does(kube, kube_adapter, kubectl):
    shared_pool(kube)
    kube.add_pod("web-1", node="sn01")
    kube.add_pod("big-1", requests={"cpu": "64", "memory": "1Gi"})
    kube.wait_unschedulable("big-1")
    # web-1 is bound at creation; Pending until its kubelet's next tick reports it Running.
    wait_for(lambda: kube.pod("web-1")["status"].get("phase") == "Running", 30, "web-1 to run on sn01")
    rows = table(kubectl("get", "pods", "--field-selector", "status.phase=Pending").stdout)
    assert [(r["NAME"], r["STATUS"]) for r in rows] == [("big-1", "Pending")]
    assert [p.name for p in kube_adapter.pending_pods()] == ["big-1"]
    proc = kubectl("get", "pods", "--field-selector", "spec.color=blue", check=False)
    assert proc.returncode != 0 and "field label not supported: spec.color" in proc.stderr
