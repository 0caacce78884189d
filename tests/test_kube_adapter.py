"""The Kubernetes adapter against the strict test API server (real HTTPS, the official client)."""

from __future__ import annotations

import pytest
from provisioner.clusters.kubernetes import CORDON_ANNOTATION, KubernetesAdapter
from provisioner.config import KubernetesSettings
from provisioner.errors import OperationError, UsageError

pytestmark = pytest.mark.integration


def shared_pool(kube):
    """sn01 runs Kubernetes work, sn02 is on the SLURM side (labelled sched=slurm)."""
    kube.add_node("sn01", labels={"sched": "k8s"}, cpu="4", memory="16Gi")
    kube.add_node("sn02", labels={"sched": "slurm"}, cpu="8", memory="32Gi", gpus=2)


def writes_to(kube, path_part: str) -> list[dict]:
    return [r for r in kube.writes() if path_part in r["path"]]


# --------------------------------------------------------------------------- observe


def test_unschedulable_pending_pods_are_observed_scheduled_and_finished_are_not(kube, kube_adapter):
    shared_pool(kube)
    kube.add_pod("web-1", node="sn01")
    kube.add_pod("batch-1", node="sn01", phase="Succeeded")
    kube.add_pod("batch-2", node="sn01", phase="Failed")
    kube.add_pod("big-1", requests={"cpu": "6", "memory": "20Gi"})
    kube.add_pod("gpu-1", namespace="ml", requests={"cpu": "1500m", "memory": "512Mi"}, gpus=1,
                 node_selector={"sched": "k8s"})
    kube.add_pod("small-1", requests={"cpu": "250m", "memory": "64Mi"})  # fits on sn01
    assert dict(kube.schedule()) == {"default/small-1": "sn01"}
    kube.add_pod("fresh-1")  # created after the scheduler's pass: not looked at yet, not demand

    pending = {p.name: p for p in kube_adapter.pending_pods()}

    assert set(pending) == {"big-1", "gpu-1"}
    big, gpu = pending["big-1"], pending["gpu-1"]
    assert (big.namespace, big.cpu_m, big.memory, big.gpus) == ("default", 6000, 20 * 2**30, 0)
    assert (gpu.namespace, gpu.cpu_m, gpu.memory, gpu.gpus) == ("ml", 1500, 512 * 2**20, 1)
    assert gpu.node_selector == (("sched", "k8s"),)
    assert "Insufficient cpu" in big.message and big.created is not None
    assert not kube.writes()  # observing writes nothing


def test_pending_pod_is_placed_once_a_shared_node_is_ready_and_labelled_k8s(kube, kube_adapter):
    shared_pool(kube)
    kube.add_pod("wide-1", requests={"cpu": "6", "memory": "1Gi"})  # only sn02 (8 CPUs) fits
    kube.schedule()
    assert [p.name for p in kube_adapter.pending_pods()] == ["wide-1"]

    # The balancer switches sn02: it reboots into the k8s image (NotReady until the kubelet
    # posts status), then gets the label.
    kube.set_node_ready("sn02", False)
    kube_adapter.label("sn02", "k8s")
    assert kube.schedule() == []
    assert [p.name for p in kube_adapter.pending_pods()] == ["wide-1"]
    kube.set_node_ready("sn02", True)
    assert kube.schedule() == [("default/wide-1", "sn02")]

    assert kube_adapter.pending_pods() == []
    node = kube_adapter.node("sn02")
    assert node.ready and node.role == "k8s" and [p.name for p in node.pods] == ["wide-1"]


def test_nodes_report_readiness_cordon_labels_resources_and_the_pods_that_hold_them(kube, kube_adapter):
    shared_pool(kube)
    kube.add_node("sn03", labels={"sched": "k8s"}, ready=False, taints=[
        {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}])
    kube.add_pod("node-exporter-a1", namespace="kube-system", node="sn02", owner="DaemonSet/node-exporter")
    kube.add_pod("etcd-sn02", namespace="kube-system", node="sn02", owner=None,
                 annotations={"kubernetes.io/config.mirror": "abc"})
    kube.add_pod("job-1", node="sn02", phase="Succeeded", owner="Job/job")
    kube.add_pod("web-1", node="sn01")
    kube.add_pod("web-2", node="sn01", owner=None)  # a bare pod holds the node too

    nodes = kube_adapter.nodes(["sn01", "sn02", "sn03", "sn99"])

    assert set(nodes) == {"sn01", "sn02", "sn03"}  # sn99 has no Node object
    sn01, sn02, sn03 = nodes["sn01"], nodes["sn02"], nodes["sn03"]
    assert sn01.ready and sn01.role == "k8s" and sn01.busy
    assert [p.key for p in sn01.pods] == ["default/web-1", "default/web-2"]
    # DaemonSet, static and finished pods do not hold a node.
    assert not sn02.busy and sn02.role == "slurm"
    assert (sn02.cpu_m, sn02.memory, sn02.gpus) == (8000, 32 * 2**30, 2)
    assert ("sched", "slurm") in sn02.labels and ("kubernetes.io/hostname", "sn02") in sn02.labels
    assert not sn03.ready and sn03.ready_reason == "KubeletNotReady"
    assert sn03.taints[0].key == "node.kubernetes.io/not-ready"
    assert not any(n.unschedulable or n.cordoned_by_us for n in nodes.values())
    assert set(kube_adapter.nodes()) == {"sn01", "sn02", "sn03"}
    assert kube_adapter.node("sn99") is None


# --------------------------------------------------------------------------- cordon, evict


def test_pdb_refuses_eviction_node_not_free_and_nothing_deleted(kube, kube_adapter):
    shared_pool(kube)
    kube.add_pod("db-0", node="sn01", labels={"app": "db"}, owner="StatefulSet/db")
    kube.add_pod("db-1", node="sn01", labels={"app": "db"}, owner="StatefulSet/db")
    kube.add_pod("node-exporter-a1", namespace="kube-system", node="sn01", owner="DaemonSet/node-exporter")
    kube.add_pdb("db", match_labels={"app": "db"}, min_available=2)

    assert kube_adapter.cordon("sn01") is True
    result = kube_adapter.evict_pods("sn01")

    assert result.evicted == ()
    assert [key for key, _ in result.blocked] == ["default/db-0", "default/db-1"]
    assert "disruption budget" in result.blocked[0][1]
    assert result.remaining == ("default/db-0", "default/db-1") and not result.free
    assert kube.pod("db-0") and kube.pod("db-1") and kube.pod("node-exporter-a1", "kube-system")
    evictions = [r for r in kube.requests if r["path"].endswith("/eviction")]
    assert [r["status"] for r in evictions] == [429, 429]
    assert not [r for r in kube.requests if r["method"] == "DELETE"]  # never a forced delete
    node = kube_adapter.node("sn01")
    assert node.busy and node.cordoned_by_us


def test_pdb_allows_one_at_a_time_until_the_node_is_free(kube, kube_adapter):
    shared_pool(kube)
    for i in range(2):
        kube.add_pod(f"web-{i}", node="sn01", labels={"app": "web"})
    kube.add_pod("node-exporter-a1", namespace="kube-system", node="sn01", owner="DaemonSet/node-exporter")
    kube.add_pdb("web", match_labels={"app": "web"}, max_unavailable=1)
    kube_adapter.cordon("sn01")

    first = kube_adapter.evict_pods("sn01")
    assert len(first.evicted) == 1 and len(first.blocked) == 1 and not first.free
    # The ReplicaSet replaced the evicted pod; it is Pending until it runs somewhere else.
    kube.add_node("sn05", labels={"sched": "k8s"})
    kube.schedule()
    second = kube_adapter.evict_pods("sn01")
    assert len(second.evicted) == 1 and second.blocked == () and second.free
    assert kube_adapter.node("sn01").busy is False
    assert kube.pod("node-exporter-a1", "kube-system")["spec"]["nodeName"] == "sn01"  # DaemonSet pods stay


def test_evict_refuses_a_node_that_is_not_cordoned(kube, kube_adapter):
    shared_pool(kube)
    kube.add_pod("web-1", node="sn01")
    with pytest.raises(OperationError, match="not cordoned: cordon it before"):
        kube_adapter.evict_pods("sn01")
    assert not kube.writes()


def test_uncordon_lifts_our_own_cordon(kube, kube_adapter):
    shared_pool(kube)
    assert kube_adapter.cordon("sn01") is True
    assert kube_adapter.cordon("sn01") is True  # idempotent: already ours, no second write
    assert len(writes_to(kube, "/nodes/sn01")) == 1
    assert kube.node("sn01")["metadata"]["annotations"][CORDON_ANNOTATION] == "true"

    kube_adapter.uncordon("sn01")

    raw = kube.node("sn01")
    assert not raw["spec"].get("unschedulable")
    assert CORDON_ANNOTATION not in (raw["metadata"].get("annotations") or {})
    kube_adapter.uncordon("sn01")  # nothing to do
    assert len(writes_to(kube, "/nodes/sn01")) == 2


def test_a_cordon_set_by_someone_else_is_never_lifted_nor_claimed(kube, kube_adapter):
    shared_pool(kube)
    kube.add_node("sn03", labels={"sched": "k8s"}, unschedulable=True)  # an admin's cordon

    assert kube_adapter.cordon("sn03") is False
    with pytest.raises(OperationError, match="cordoned by someone else.*kubectl uncordon sn03"):
        kube_adapter.uncordon("sn03")

    node = kube_adapter.node("sn03")
    assert node.unschedulable and not node.cordoned_by_us and node.cordoned_by_other
    assert not kube.writes()


def test_a_cordon_set_by_someone_else_while_we_cordon_is_not_claimed(kube, kube_adapter):
    """The admin cordons between our read and our write: our patch carries the resourceVersion
    we read, so it gets a 409; we look again and leave the admin's cordon alone."""
    shared_pool(kube)

    fired = []

    def admin_cordons_first(entry):
        if entry["method"] == "PATCH" and entry["path"] == "/api/v1/nodes/sn01" and not fired:
            fired.append(entry)
            kube.modify("nodes", None, "sn01", lambda node: node["spec"].update(unschedulable=True))

    kube.hooks.append(admin_cordons_first)

    assert kube_adapter.cordon("sn01") is False
    assert [r["status"] for r in kube.requests if r["method"] == "PATCH"] == [409]
    raw = kube.node("sn01")
    assert raw["spec"]["unschedulable"] is True and CORDON_ANNOTATION not in (raw["metadata"].get("annotations") or {})


def test_label_sets_the_role_label(kube, kube_adapter):
    shared_pool(kube)
    kube_adapter.label("sn01", "slurm")
    assert kube.node("sn01")["metadata"]["labels"]["sched"] == "slurm"
    assert kube_adapter.node("sn01").role == "slurm"
    with pytest.raises(UsageError, match="unknown role"):
        kube_adapter.label("sn01", "windows")
    with pytest.raises(OperationError, match="no node sn77"):
        kube_adapter.label("sn77", "k8s")


def test_label_key_comes_from_the_settings(kube, kube_settings):
    shared_pool(kube)
    settings = KubernetesSettings(kubeconfig=kube_settings.kubeconfig, label_key="example.org/role")
    with KubernetesAdapter(settings) as adapter:
        adapter.label("sn01", "slurm")
        assert adapter.node("sn01").role == "slurm"
    assert kube.node("sn01")["metadata"]["labels"]["example.org/role"] == "slurm"


def test_delete_node_only_when_ours_and_empty(kube, kube_adapter):
    shared_pool(kube)
    kube.add_pod("web-1", node="sn01")
    with pytest.raises(OperationError, match="not cordoned by provisioner"):
        kube_adapter.delete_node("sn01")
    kube_adapter.cordon("sn01")
    with pytest.raises(OperationError, match="pods still run there"):
        kube_adapter.delete_node("sn01")
    assert kube_adapter.evict_pods("sn01").free
    assert kube_adapter.delete_node("sn01") is True
    assert kube.node("sn01") is None
    assert kube_adapter.delete_node("sn01") is False


# --------------------------------------------------------------------------- failures


def _every_operation(adapter):
    return [
        ("pending_pods", adapter.pending_pods),
        ("nodes", adapter.nodes),
        ("cordon", lambda: adapter.cordon("sn01")),
        ("uncordon", lambda: adapter.uncordon("sn01")),
        ("label", lambda: adapter.label("sn01", "slurm")),
        ("evict", lambda: adapter.evict_pods("sn01")),
        ("delete", lambda: adapter.delete_node("sn01")),
    ]


def _state(kube):
    return [(o["metadata"]["name"], o["metadata"]["resourceVersion"]) for o in kube.items("nodes") + kube.items("pods")]


def test_api_server_down_is_one_clear_error_and_no_action(kube, kube_adapter):
    shared_pool(kube)
    kube.add_pod("web-1", node="sn01")
    kube_adapter.nodes()  # a pooled keep-alive connection exists: it must not keep working
    before = _state(kube)
    with kube.down():
        for op, call in _every_operation(kube_adapter):
            with pytest.raises(OperationError) as info:
                call()
            msg = str(info.value)
            assert "connection refused" in msg and "check that the API server is up" in msg, op
            assert "\n" not in msg
    assert _state(kube) == before


def test_api_server_500_is_one_clear_error_and_no_action(kube, kube_adapter):
    shared_pool(kube)
    kube.add_pod("web-1", node="sn01")
    before = _state(kube)
    with kube.failing(500):
        for op, call in _every_operation(kube_adapter):
            with pytest.raises(OperationError, match=r"failed while .*HTTP 500.*check the API server"):
                call()
    assert _state(kube) == before and not kube.writes()


def test_eviction_answered_500_stops_with_an_error_and_deletes_nothing(kube, kube_adapter):
    shared_pool(kube)
    kube.add_pod("web-1", node="sn01")
    kube_adapter.cordon("sn01")
    with kube.failing(500, when=lambda e: e["path"].endswith("/eviction")):
        with pytest.raises(OperationError, match="evicting pod default/web-1 from node sn01 .*HTTP 500"):
            kube_adapter.evict_pods("sn01")
    assert kube.pod("web-1")["spec"]["nodeName"] == "sn01"


def test_wrong_token_is_401_one_clear_error_and_no_action(kube, tmp_path):
    shared_pool(kube)
    kubeconfig = kube.write_kubeconfig(tmp_path / "stale-kubeconfig", token="expired-token")
    before = _state(kube)
    with KubernetesAdapter(KubernetesSettings(kubeconfig=str(kubeconfig), timeout_s=5)) as adapter:
        for op, call in _every_operation(adapter):
            with pytest.raises(OperationError, match=rf"rejected the credentials in {kubeconfig} \(HTTP 401.*renew"):
                call()
    assert _state(kube) == before and not kube.writes()
    assert {r["status"] for r in kube.requests} == {401}


def test_unknown_certificate_authority_is_refused(kube, tmp_path):
    import yaml

    shared_pool(kube)
    cfg = yaml.safe_load(kube.kubeconfig.read_text())
    del cfg["clusters"][0]["cluster"]["certificate-authority-data"]  # trust only the system CAs
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    with KubernetesAdapter(KubernetesSettings(kubeconfig=str(path), timeout_s=5)) as adapter:
        with pytest.raises(OperationError, match=r"TLS error \(certificate verify failed.*check the server.s CA"):
            adapter.nodes()
    assert kube.requests == []  # the token never left the process


def test_client_config_problems_say_what_to_fix(tmp_path, monkeypatch):
    with pytest.raises(OperationError, match="does not exist: set kubernetes.kubeconfig"):
        KubernetesAdapter(KubernetesSettings(kubeconfig=str(tmp_path / "nope")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(OperationError, match=r"Service host/port is not set\): check kubernetes.in_cluster"):
        KubernetesAdapter(KubernetesSettings(in_cluster=True))
