"""Pure logic of the Kubernetes adapter, no server: request arithmetic, ownership marks, taints
and tolerations."""

from __future__ import annotations

import pytest

from provisioner.clusters.kubernetes import CORDON_ANNOTATION, has_our_cordon, holds_node, pod_requests
from provisioner.taints import Taint, Toleration, taints_of, tolerates, tolerations_of, untolerated


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


# --------------------------------------------------------------------------- taints and tolerations

NS_, NE, PNS = "NoSchedule", "NoExecute", "PreferNoSchedule"


def tol(key=None, operator="Equal", value=None, effect=None):
    return Toleration(key, operator, value, effect)


@pytest.mark.parametrize("toleration, taint, expected", [
    # Equal: the key and the value must be the same; an empty operator is Equal.
    (tol("gpu", "Equal", "a100"), Taint("gpu", "a100", NS_), True),
    (tol("gpu", "Equal", "a100"), Taint("gpu", "h100", NS_), False),
    (tol("gpu", "", "a100"), Taint("gpu", "a100", NS_), True),
    (tol("gpu", "Equal", None), Taint("gpu", "", NS_), True),  # no value is the empty value
    (tol("gpu", "Equal", "a100"), Taint("ssd", "a100", NS_), False),
    # Exists: any value of the key; an empty key with Exists tolerates every taint.
    (tol("gpu", "Exists"), Taint("gpu", "anything", NE), True),
    (tol("gpu", "Exists"), Taint("ssd", None, NE), False),
    (tol(None, "Exists"), Taint("whatever", "x", NE), True),
    (tol("", "Exists"), Taint("whatever", None, NS_), True),
    # The effect: empty matches every effect, else it must be the same.
    (tol("gpu", "Exists", effect=NS_), Taint("gpu", None, NS_), True),
    (tol("gpu", "Exists", effect=NS_), Taint("gpu", None, NE), False),
    (tol(None, "Exists", effect=NE), Taint("gpu", None, NS_), False),
    # An operator the API may add later (or a typo): not tolerated.
    (tol("gpu", "Gt", "1"), Taint("gpu", "2", NS_), False),
])
def test_a_toleration_tolerates_a_taint_by_the_apis_rule(toleration, taint, expected):
    assert tolerates(toleration, taint) is expected


def test_only_the_blocking_taints_no_pod_toleration_covers_keep_it_off_the_node():
    taints = (Taint("gpu", "a100", NS_), Taint("maintenance", None, NE), Taint("slow", None, PNS),
              Taint("node.kubernetes.io/unreachable", None, NE), Taint("node.kubernetes.io/not-ready", None, NS_),
              Taint("node.kubernetes.io/unschedulable", None, NS_))
    # PreferNoSchedule only steers; the lifecycle controller's taints are transient (or ours).
    assert untolerated(taints, ()) == (Taint("gpu", "a100", NS_), Taint("maintenance", None, NE))
    assert untolerated(taints, (tol("gpu", "Equal", "a100"),)) == (Taint("maintenance", None, NE),)
    assert untolerated(taints, (tol("gpu", "Exists"), tol("maintenance", "Exists", effect=NE))) == ()
    assert untolerated(taints, (tol(None, "Exists"),)) == ()
    assert untolerated((), ()) == ()


def test_tolerations_and_taints_are_read_as_the_api_sends_them():
    spec = {"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},
                            {"key": "zone", "value": "b"}, {"operator": "Exists"}]}
    assert tolerations_of(spec) == (tol("gpu", "Exists", None, NS_), tol("zone", "Equal", "b"), tol(None, "Exists"))
    assert tolerations_of({}) == () and taints_of({}) == ()
    assert taints_of({"taints": [{"key": "gpu", "effect": "NoSchedule"}, {"key": "k", "value": "v", "effect": NE}]}) \
        == (Taint("gpu", None, NS_), Taint("k", "v", NE))
