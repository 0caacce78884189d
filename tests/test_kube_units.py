"""Pure logic of the Kubernetes adapter, no server: request arithmetic, ownership marks."""

from __future__ import annotations

from provisioner.clusters.kubernetes import CORDON_ANNOTATION, has_our_cordon, holds_node, pod_requests


def container(requests=None, limits=None):
    return {"name": "c", "resources": {k: v for k, v in (("requests", requests), ("limits", limits)) if v}}


def test_pod_requests_count_init_containers_limits_and_overhead():
    spec = {
        "containers": [container({"cpu": "500m", "memory": "1Gi"}), container(limits={"cpu": "1", "nvidia.com/gpu": "1"})],
        "initContainers": [container({"cpu": "2", "memory": "100Mi"})],
        "overhead": {"cpu": "100m"},
    }
    # cpu: max(0.5 + 1, 2) + 0.1; memory: max(1Gi, 100Mi); a limit alone is the request.
    assert pod_requests(spec) == (2100, 2**30, 1)
    assert pod_requests({"containers": [{"name": "c"}]}) == (0, 0, 0)


def test_which_pods_hold_a_node():
    def pod(phase="Running", owner=None, annotations=None):
        refs = [{"kind": owner, "name": "x", "controller": True}] if owner else []
        return {"metadata": {"name": "p", "namespace": "d", "ownerReferences": refs, "annotations": annotations},
                "status": {"phase": phase}}

    assert holds_node(pod()) and holds_node(pod(owner="ReplicaSet")) and holds_node(pod("Pending"))
    assert not holds_node(pod(owner="DaemonSet"))
    assert not holds_node(pod(annotations={"kubernetes.io/config.mirror": "x"}))
    assert not holds_node(pod("Succeeded")) and not holds_node(pod("Failed"))


def test_the_cordon_mark_is_read_from_metadata():
    assert has_our_cordon({"annotations": {CORDON_ANNOTATION: "true"}})
    assert not has_our_cordon({"annotations": {CORDON_ANNOTATION: "false"}}) and not has_our_cordon({})
