"""Pure logic of the Kubernetes area, no server: request arithmetic, patches, selectors."""

from __future__ import annotations

import pytest
from kubernetes import client

from provisioner.clusters.kubernetes import pod_requests
from tests.kube_apiserver import (ApiError, json_patch, labels_match, merge_patch, parse_label_selector,
                                  strategic_merge_patch)


def test_pod_requests_count_init_containers_limits_and_overhead():
    def container(requests=None, limits=None):
        return client.V1Container(name="c", resources=client.V1ResourceRequirements(requests=requests, limits=limits))

    spec = client.V1PodSpec(
        containers=[container({"cpu": "500m", "memory": "1Gi"}), container(limits={"cpu": "1", "nvidia.com/gpu": "1"})],
        init_containers=[container({"cpu": "2", "memory": "100Mi"})],
        overhead={"cpu": "100m"},
    )
    # cpu: max(0.5 + 1, 2) + 0.1; memory: max(1Gi, 100Mi); a limit alone is the request.
    assert pod_requests(spec) == (2100, 2**30, 1)
    assert pod_requests(client.V1PodSpec(containers=[client.V1Container(name="c")])) == (0, 0, 0)


def test_merge_and_strategic_patches():
    doc = {"metadata": {"labels": {"a": "1", "b": "2"}},
           "status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "DiskPressure", "status": "False"}]},
           "spec": {"taints": [{"key": "x", "effect": "NoSchedule"}]}}
    assert merge_patch(doc, {"metadata": {"labels": {"a": None, "c": "3"}}})["metadata"]["labels"] == {"b": "2", "c": "3"}
    # conditions merge by type; taints (no merge key) are replaced
    out = strategic_merge_patch(doc, {"status": {"conditions": [{"type": "Ready", "status": "False"}]},
                                      "spec": {"taints": [{"key": "y", "effect": "NoExecute"}]}})
    assert out["status"]["conditions"] == [{"type": "Ready", "status": "False"}, {"type": "DiskPressure", "status": "False"}]
    assert out["spec"]["taints"] == [{"key": "y", "effect": "NoExecute"}]
    out = strategic_merge_patch(doc, {"status": {"conditions": [{"type": "DiskPressure", "$patch": "delete"}]},
                                      "metadata": {"$patch": "replace", "labels": {"z": "9"}}})
    assert [c["type"] for c in out["status"]["conditions"]] == ["Ready"] and out["metadata"] == {"labels": {"z": "9"}}
    assert doc["metadata"]["labels"] == {"a": "1", "b": "2"}  # the input is not modified


def test_json_patch():
    doc = {"metadata": {"labels": {"a/b": "1"}}, "items": [1, 2]}
    out = json_patch(doc, [{"op": "replace", "path": "/metadata/labels/a~1b", "value": "2"},
                           {"op": "add", "path": "/items/-", "value": 3},
                           {"op": "move", "from": "/items/0", "path": "/first"},
                           {"op": "copy", "from": "/first", "path": "/again"}])
    assert out == {"metadata": {"labels": {"a/b": "2"}}, "items": [2, 3], "first": 1, "again": 1}
    assert doc["items"] == [1, 2]


def test_label_selectors():
    reqs = parse_label_selector("sched in (k8s, slurm),!gpu,zone!=b,rack")
    assert labels_match(reqs, {"sched": "k8s", "zone": "a", "rack": "1"})
    assert not labels_match(reqs, {"sched": "k8s", "gpu": "yes", "rack": "1"})
    assert not labels_match(reqs, {"sched": "k8s", "zone": "b", "rack": "1"})
    assert not labels_match(reqs, {"sched": "k8s"})
    for bad in ("a=b=c", "in (x)", "a in x", "-bad=1", "a=(x)"):
        with pytest.raises(ApiError):
            parse_label_selector(bad)
