"""The Kubernetes adapter against a real control plane (kube-apiserver, kube-scheduler,
kube-controller-manager v1.34.3, etcd), under the provisioner's own RBAC-limited identity.
What it sent is read back from the API server's audit log."""

from __future__ import annotations

import pytest
import yaml

from provisioner.clusters.kubernetes import CORDON_ANNOTATION, HOLD_ANNOTATION, KubernetesAdapter
from provisioner.errors import OperationError, UsageError
from provisioner.model import KubernetesSettings
from testbed.kube_control_plane import VERSION
from testbed.wait import wait_for

pytestmark = pytest.mark.integration

OURS = {CORDON_ANNOTATION: "true"}


def shared_pool(kube):
    """sn01 serves Kubernetes (Ready); sn02 is on the SLURM side: its Node object stays from an
    earlier switch, labelled sched=slurm, cordoned by provisioner, its kubelet gone."""
    kube.add_node("sn01", labels={"sched": "k8s"}, cpu="4", memory="16Gi")
    kube.add_node("sn02", labels={"sched": "slurm"}, cpu="8", memory="32Gi", gpus=2, unschedulable=True,
                  ready=False)
    kube.patch_node("sn02", {"metadata": {"annotations": OURS}})
    kube.power_off("sn02")


def patches(kube, node: str) -> list[dict]:
    return [r for r in kube.writes() if r["resource"] == "nodes" and r["name"] == node and r["verb"] == "patch"]


def accepted_patches(kube, node: str) -> list[dict]:
    """Patches the server applied. A 409 is not a write: the real control plane's node controller
    taints a cordoned node on its own, so our read-modify-write can lose that race and retry."""
    return [r for r in patches(kube, node) if r["code"] < 400]


# --------------------------------------------------------------------------- observe


def test_the_server_is_the_pinned_real_release(kube, kube_adapter):
    assert kube_adapter.server_version() == VERSION


def test_unschedulable_pending_pods_are_observed_scheduled_and_finished_are_not(kube, kube_adapter):
    shared_pool(kube)
    kube.add_pod("web-1", node="sn01")
    kube.add_pod("batch-1", node="sn01", phase="Succeeded")
    kube.add_pod("batch-2", node="sn01", phase="Failed")
    kube.add_pod("big-1", requests={"cpu": "6", "memory": "20Gi"})
    kube.add_pod("gpu-1", namespace="ml", requests={"cpu": "1500m", "memory": "512Mi"}, gpus=1,
                 node_selector={"sched": "k8s"})
    kube.add_pod("small-1", requests={"cpu": "250m", "memory": "64Mi"})  # fits on sn01
    # A pod for a scheduler that does not run here: never looked at, so not (yet) demand.
    other = kube.pod_spec()
    kube.api.create("/api/v1/namespaces/default/pods", {"metadata": {"name": "other-1"},
                                                        "spec": {**other, "schedulerName": "other-scheduler"}})
    assert kube.wait_bound("small-1") == "sn01"
    kube.wait_unschedulable("big-1")
    kube.wait_unschedulable("gpu-1", "ml")

    pending = {p.name: p for p in kube_adapter.pending_pods()}

    assert set(pending) == {"big-1", "gpu-1"}
    big, gpu = pending["big-1"], pending["gpu-1"]
    assert (big.namespace, big.cpu_m, big.memory, big.gpus) == ("default", 6000, 20 * 2**30, 0)
    assert (gpu.namespace, gpu.cpu_m, gpu.memory, gpu.gpus) == ("ml", 1500, 512 * 2**20, 1)
    assert gpu.node_selector == (("sched", "k8s"),)
    # The real scheduler's words: sn01 is too small, sn02 is cordoned (and NotReady).
    assert "Insufficient cpu" in big.message and "unschedulable" in big.message and big.created is not None
    assert not kube.writes()  # observing writes nothing
    assert {r["verb"] for r in kube.requests()} == {"list"}


def test_pending_pod_is_placed_once_a_shared_node_is_ready_and_uncordoned(kube, kube_adapter):
    shared_pool(kube)
    kube.add_pod("wide-1", requests={"cpu": "6", "memory": "1Gi"})  # only sn02 (8 CPUs) fits
    kube.wait_unschedulable("wide-1")
    assert [p.name for p in kube_adapter.pending_pods()] == ["wide-1"]

    # The balancer switches sn02: it boots the k8s image, its kubelet reports Ready; the node is
    # still cordoned (ours), so the scheduler keeps the pod pending.
    kube.boot("sn02", cpu="8", memory="32Gi", gpus=2)
    wait_for(lambda: kube_adapter.node("sn02").ready, 20, "sn02 Ready")
    assert kube.settle() == {}
    assert [p.name for p in kube_adapter.pending_pods()] == ["wide-1"]
    kube_adapter.label("sn02", "k8s")
    kube_adapter.uncordon("sn02")

    assert kube.wait_bound("wide-1") == "sn02"
    assert kube_adapter.pending_pods() == []
    node = kube_adapter.node("sn02")
    assert node.ready and node.role == "k8s" and [p.name for p in node.pods] == ["wide-1"]


def test_nodes_report_readiness_cordon_labels_resources_boot_id_and_the_pods_that_hold_them(kube, kube_adapter):
    shared_pool(kube)
    kube.add_node("sn03", labels={"sched": "k8s"}, ready=False)  # its kubelet reports NotReady
    kube.add_daemonset("node-exporter", node_selector={"kubernetes.io/hostname": "sn01"})
    kube.add_pod("etcd-sn01", namespace="kube-system", node="sn01",
                 annotations={"kubernetes.io/config.mirror": "abc"})  # a static pod's mirror
    kube.add_pod("job-1", node="sn01", phase="Succeeded")
    kube.add_pod("web-1", node="sn01")
    kube.add_pod("web-2", node="sn01")
    wait_for(lambda: len([p for p in kube.pods("sn01") if p["status"].get("phase") == "Running"]) == 4, 30,
             "the DaemonSet's pod, the mirror pod and web-1/2 running on sn01")

    nodes = kube_adapter.nodes(["sn01", "sn02", "sn03", "sn99"])

    assert set(nodes) == {"sn01", "sn02", "sn03"}  # sn99 has no Node object
    sn01, sn02, sn03 = nodes["sn01"], nodes["sn02"], nodes["sn03"]
    assert sn01.ready and sn01.role == "k8s" and sn01.busy and sn01.boot_id
    # DaemonSet, static (mirror) and finished pods do not hold a node.
    assert [p.key for p in sn01.pods] == ["default/web-1", "default/web-2"]
    assert not sn02.busy and sn02.role == "slurm" and not sn02.ready and sn02.cordoned_by_us
    assert (sn02.cpu_m, sn02.memory, sn02.gpus) == (8000, 32 * 2**30, 2)
    assert ("sched", "slurm") in sn02.labels and ("kubernetes.io/hostname", "sn02") in sn02.labels
    assert not sn03.ready and sn03.ready_reason == "KubeletNotReady"
    # The real node-lifecycle controller taints a NotReady node.
    wait_for(lambda: any(t.key == "node.kubernetes.io/not-ready" for t in kube_adapter.node("sn03").taints), 20,
             "the not-ready taint on sn03")
    assert set(kube_adapter.nodes()) == {"sn01", "sn02", "sn03"}
    assert kube_adapter.node("sn99") is None
    assert kube_adapter.node("sn01") == sn01


def test_a_reboot_shows_as_a_new_boot_id_and_a_silent_kubelet_goes_not_ready(kube, kube_adapter):
    first = kube.add_node("sn01", labels={"sched": "k8s"})
    assert kube_adapter.node("sn01").boot_id == first
    kube.power_off("sn01")
    # The old Ready condition stays until the node-lifecycle controller's grace period is over:
    # readiness alone cannot tell that the node rebooted (see the reconciler's JOINING step).
    assert kube_adapter.node("sn01").ready
    kube.wait_not_ready("sn01")
    node = kube_adapter.node("sn01")
    assert not node.ready and node.ready_reason == "NodeStatusUnknown" and node.boot_id == first
    second = kube.boot("sn01")
    wait_for(lambda: kube_adapter.node("sn01").ready, 20, "sn01 Ready again")
    assert kube_adapter.node("sn01").boot_id == second != first


# --------------------------------------------------------------------------- cordon, evict


def test_pdb_refuses_eviction_node_not_free_and_nothing_deleted(kube, kube_adapter):
    shared_pool(kube)
    kube.add_pod("db-0", node="sn01", labels={"app": "db"})
    kube.add_pod("db-1", node="sn01", labels={"app": "db"})
    kube.add_daemonset("node-exporter", node_selector={"kubernetes.io/hostname": "sn01"})
    kube.wait_bound("db-0")
    kube.wait_bound("db-1")
    kube.add_pdb("db", match_labels={"app": "db"}, min_available=2)

    assert kube_adapter.cordon("sn01") is True
    result = kube_adapter.evict_pods("sn01")

    assert result.evicted == ()
    assert [key for key, _ in result.blocked] == ["default/db-0", "default/db-1"]
    assert "violate the pod's disruption budget" in result.blocked[0][1]
    assert "needs 2 healthy pods" in result.blocked[0][1]  # the cause the real server gives
    assert result.remaining == ("default/db-0", "default/db-1") and not result.free
    assert kube.pod("db-0") and kube.pod("db-1")
    evictions = [r for r in kube.requests() if r["subresource"] == "eviction"]
    assert [r["code"] for r in evictions] == [429, 429]
    assert not [r for r in kube.requests() if r["verb"] == "delete"]  # never a forced delete
    node = kube_adapter.node("sn01")
    assert node.busy and node.cordoned_by_us


def test_pdb_allows_one_at_a_time_until_the_node_is_free(kube, kube_adapter):
    shared_pool(kube)
    kube.add_daemonset("node-exporter", node_selector={"kubernetes.io/hostname": "sn01"})
    kube.add_replicaset("web", 2)
    kube.add_pdb("web", match_labels={"app": "web"}, max_unavailable=1)
    wait_for(lambda: len(kube_adapter.node("sn01").pods) == 2, 30, "the ReplicaSet's two pods on sn01")
    kube.wait_pdb("web", allowed=1)
    kube_adapter.cordon("sn01")

    first = kube_adapter.evict_pods("sn01")
    assert len(first.evicted) == 1 and len(first.blocked) == 1 and not first.free
    # The ReplicaSet replaces the evicted pod; it stays Pending (sn01 is cordoned) until another
    # node joins, and the budget allows nothing until it runs.
    wait_for(lambda: len(kube_adapter.pending_pods()) == 1, 30, "the replacement pod Unschedulable")
    assert kube_adapter.evict_pods("sn01").evicted == ()
    kube.add_node("sn05", labels={"sched": "k8s"})
    kube.wait_pdb("web", allowed=1)
    second = kube_adapter.evict_pods("sn01")
    assert len(second.evicted) == 1 and second.blocked == ()
    wait_for(lambda: not kube_adapter.node("sn01").busy, 30, "sn01 free (its kubelet finished the evictions)")
    ds_pods = [p for p in kube.pods("sn01") if p["metadata"]["name"].startswith("node-exporter")]
    assert len(ds_pods) == 1  # DaemonSet pods stay
    assert not [r for r in kube.requests() if r["verb"] == "delete"]


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
    assert len(accepted_patches(kube, "sn01")) == 1
    assert kube.node("sn01")["metadata"]["annotations"][CORDON_ANNOTATION] == "true"

    kube_adapter.uncordon("sn01")

    raw = kube.node("sn01")
    assert not raw["spec"].get("unschedulable")
    assert CORDON_ANNOTATION not in (raw["metadata"].get("annotations") or {})
    kube_adapter.uncordon("sn01")  # nothing to do
    assert len(accepted_patches(kube, "sn01")) == 2


def test_a_cordon_set_by_someone_else_is_never_lifted_nor_claimed(kube, kube_adapter):
    shared_pool(kube)
    kube.add_node("sn03", labels={"sched": "k8s"}, unschedulable=True)  # an admin's cordon

    assert kube_adapter.cordon("sn03") is False
    with pytest.raises(OperationError, match="cordoned by someone else.*kubectl uncordon sn03"):
        kube_adapter.uncordon("sn03")

    node = kube_adapter.node("sn03")
    assert node.unschedulable and not node.cordoned_by_us and node.cordoned_by_other
    assert not kube.writes()


def test_a_cordon_set_by_someone_else_while_we_cordon_is_not_claimed(kube, kube_adapter, monkeypatch):
    """The admin cordons between our read and our write: our patch carries the resourceVersion
    we read, so the real server answers 409; we look again and leave the admin's cordon alone."""
    shared_pool(kube)
    real_patch = kube_adapter.core.patch_node
    fired = []

    def admin_cordons_first(name, body, **kw):
        if not fired:
            fired.append(name)
            kube.patch_node(name, {"spec": {"unschedulable": True}})
        return real_patch(name, body, **kw)

    monkeypatch.setattr(kube_adapter.core, "patch_node", admin_cordons_first)

    assert kube_adapter.cordon("sn01") is False
    assert [r["code"] for r in patches(kube, "sn01")] == [409]
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


def test_a_hold_is_shown_on_the_node_and_taken_away_without_touching_the_cordon(kube, kube_adapter):
    shared_pool(kube)
    kube_adapter.mark_hold("sn01", "DIMM swap, ticket 4711")
    kube_adapter.mark_hold("sn02", "firmware")  # cordoned by us before: the cordon stays as it was
    assert kube.node("sn01")["metadata"]["annotations"][HOLD_ANNOTATION] == "DIMM swap, ticket 4711"
    assert kube_adapter.node("sn01").hold == "DIMM swap, ticket 4711"
    assert not kube_adapter.node("sn01").unschedulable  # a hold is no cordon
    assert kube_adapter.node("sn02").cordoned_by_us and kube_adapter.node("sn02").hold == "firmware"
    kube_adapter.mark_hold("sn01", None)
    assert HOLD_ANNOTATION not in (kube.node("sn01")["metadata"].get("annotations") or {})
    assert kube_adapter.node("sn01").hold is None
    with pytest.raises(OperationError, match="no node sn77"):
        kube_adapter.mark_hold("sn77", "x")


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
    assert kube_adapter.evict_pods("sn01").evicted == ("default/web-1",)
    wait_for(lambda: not kube_adapter.node("sn01").busy, 30, "web-1 gone from sn01")
    assert kube_adapter.delete_node("sn01") is True
    assert kube.node("sn01") is None
    assert kube_adapter.delete_node("sn01") is False


# --------------------------------------------------------------------------- failures


def failure_world(kube):
    """Each write has its object: sn01 to cordon and label, sn02 (ours) to uncordon and to evict
    its pod from, sn04 (ours, empty) to delete."""
    shared_pool(kube)
    kube.add_pod("web-1", node="sn01")
    kube.add_pod("stuck-1", node="sn02")  # bound, its kubelet is gone: it holds the node
    kube.add_node("sn04", unschedulable=True)
    kube.patch_node("sn04", {"metadata": {"annotations": OURS}})
    kube.wait_bound("web-1")


def _every_operation(adapter, reads: bool = True):
    ops = [
        ("cordon", lambda: adapter.cordon("sn01")),
        ("uncordon", lambda: adapter.uncordon("sn02")),
        ("label", lambda: adapter.label("sn01", "slurm")),
        ("evict", lambda: adapter.evict_pods("sn02")),
        ("delete", lambda: adapter.delete_node("sn04")),
    ]
    if reads:
        ops = [("pending_pods", adapter.pending_pods), ("nodes", adapter.nodes)] + ops
    return ops


def _state(kube):
    return sorted((o["metadata"]["name"], o["metadata"].get("labels"), o["spec"].get("unschedulable"))
                  for o in kube.api.items("/api/v1/nodes") + kube.pods())


def test_api_server_unreachable_is_one_clear_error_and_no_action(kube, tmp_path):
    failure_world(kube)
    before = _state(kube)
    cfg = kube.unreachable_kubeconfig(tmp_path / "kubeconfig")
    with KubernetesAdapter(KubernetesSettings(kubeconfig=str(cfg), timeout_s=5)) as adapter:
        for op, call in _every_operation(adapter):
            with pytest.raises(OperationError) as info:
                call()
            msg = str(info.value)
            assert "connection refused" in msg and "check that the API server is up" in msg, op
            assert "\n" not in msg
    assert _state(kube) == before


def test_a_write_the_server_answers_500_is_one_clear_error_and_no_action(kube, kube_adapter):
    """A site's admission webhook is down (failurePolicy Fail): the real server answers every
    write 500. Each operation stops at its first write with one error; nothing changed."""
    failure_world(kube)
    before = _state(kube)
    with kube.failing_webhook(["nodes", "pods/eviction"]):
        for op, call in _every_operation(kube_adapter, reads=False):
            with pytest.raises(OperationError, match=r"failed while .*HTTP 500.*failed calling webhook.*"
                                                     r"check the admission webhook named there"):
                call()
        assert kube_adapter.node("sn01").pods  # reads still work
    assert _state(kube) == before
    # The node-lifecycle controller may update a node (sn04 has no kubelet: it taints it) between
    # our read and our write; the server answers our resourceVersion/uid precondition 409 before
    # the webhook, and we read again (seen in CI for a patch and for the delete).
    writes = [(r["verb"], r["code"]) for r in kube.writes() if r["code"] != 409]
    assert writes == [("patch", 500)] * 3 + [("create", 500), ("delete", 500)]


def test_eviction_answered_500_stops_with_an_error_and_deletes_nothing(kube, kube_adapter):
    shared_pool(kube)
    kube.add_pod("web-1", node="sn01")
    kube.wait_bound("web-1")
    kube_adapter.cordon("sn01")
    with kube.failing_webhook(["pods/eviction"], operations=("CREATE",)):
        with pytest.raises(OperationError, match="evicting pod default/web-1 from node sn01 .*HTTP 500"):
            kube_adapter.evict_pods("sn01")
    assert kube.pod("web-1")["spec"]["nodeName"] == "sn01" and not kube.pod("web-1")["metadata"].get(
        "deletionTimestamp")


def test_wrong_token_is_401_one_clear_error_and_no_action(kube, tmp_path):
    failure_world(kube)
    kubeconfig = kube.kubeconfig_with_token(tmp_path / "stale-kubeconfig", token="expired-token")
    before = _state(kube)
    with KubernetesAdapter(KubernetesSettings(kubeconfig=str(kubeconfig), timeout_s=5)) as adapter:
        for op, call in _every_operation(adapter):
            with pytest.raises(OperationError, match=rf"rejected the credentials in {kubeconfig} \(HTTP 401.*renew"):
                call()
    assert _state(kube) == before


def test_an_account_without_the_rbac_rules_gets_403_saying_what_to_grant(kube, tmp_path):
    shared_pool(kube)
    kubeconfig = kube.kubeconfig_for_cert("someone-else", tmp_path / "kubeconfig")
    with KubernetesAdapter(KubernetesSettings(kubeconfig=str(kubeconfig), timeout_s=5)) as adapter:
        with pytest.raises(OperationError, match=r"forbids listing nodes \(HTTP 403: nodes is forbidden: "
                                                 r"User \"someone-else\".*grant the provisioner's account RBAC"):
            adapter.nodes()


def test_unknown_certificate_authority_is_refused(kube, tmp_path):
    shared_pool(kube)
    cfg = yaml.safe_load(kube.provisioner_kubeconfig.read_text())
    del cfg["clusters"][0]["cluster"]["certificate-authority"]  # trust only the system CAs
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    with KubernetesAdapter(KubernetesSettings(kubeconfig=str(path), timeout_s=5)) as adapter:
        with pytest.raises(OperationError, match=r"TLS error \(certificate verify failed.*check the server.s CA"):
            adapter.nodes()
    assert kube.requests() == []  # the token never reached the server


def test_client_config_problems_say_what_to_fix(tmp_path, monkeypatch):
    with pytest.raises(OperationError, match="does not exist: set kubernetes.kubeconfig"):
        KubernetesAdapter(KubernetesSettings(kubeconfig=str(tmp_path / "nope")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(OperationError, match=r"Service host/port is not set\): check kubernetes.in_cluster"):
        KubernetesAdapter(KubernetesSettings(in_cluster=True))


def test_the_real_control_plane_processes_run(kube):
    """kube-apiserver, kube-scheduler, kube-controller-manager and etcd are real processes here."""
    import os

    pids = kube.plane.pids()
    for name in ("kube-apiserver", "kube-scheduler", "kube-controller-manager", "etcd"):
        assert os.path.basename(os.readlink(f"/proc/{pids[name]}/exe")) == name
