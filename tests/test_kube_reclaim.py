"""Reclaim on the Kubernetes side against the real control plane: a Deployment's pod is evicted
through the Eviction API; a PodDisruptionBudget with maxUnavailable: 0 refuses, with its reason,
and nothing is deleted; the room a busy node has left is read for the policy."""

from __future__ import annotations

import pytest

from provisioner.clusters.kubernetes import KubernetesAdapter
from testbed.kube_api import ns_path
from testbed.wait import wait_for

pytestmark = pytest.mark.integration

GI = 1 << 30


def deployment(kube, name: str, replicas: int = 1, requests: dict | None = None) -> None:
    labels = {"app": name}
    kube.namespace("default")
    kube.api.create(ns_path("deployments", "default"), {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": kube.pod_spec(requests or {"cpu": "1", "memory": "1Gi"})}}})


def test_a_deployments_pod_is_evicted_unless_a_pdb_with_max_unavailable_0_refuses(kube, kube_adapter: KubernetesAdapter):
    kube.add_node("sn01", labels={"sched": "k8s"}, cpu="4", memory="16Gi")
    deployment(kube, "web")
    node = wait_for(lambda: (lambda n: n if n and n.busy else None)(kube_adapter.node("sn01")), 30,
                    "the Deployment's pod on sn01")
    # The room left for the policy: allocatable minus what its pods request.
    assert node.requested == (1000, GI, 0)
    assert node.room == (node.cpu_m - 1000, node.memory - GI, 0)
    (pod,) = node.pods

    # A pod that is not yet Running and Ready is not protected (the Eviction API lets it go):
    # wait until its kubelet runs it and the budget counts it healthy.
    wait_for(lambda: any(c["type"] == "Ready" and c["status"] == "True"
                         for c in (kube.pod(pod.name) or {}).get("status", {}).get("conditions") or []),
             30, "the pod Running and Ready")
    kube.add_pdb("web", match_labels={"app": "web"}, max_unavailable=0)
    wait_for(lambda: (kube.wait_pdb("web", allowed=0).get("status") or {}).get("currentHealthy") == 1, 30,
             "the budget counting the pod healthy")
    assert kube_adapter.cordon("sn01") is True
    refused = kube_adapter.evict_pods("sn01")
    assert refused.evicted == () and refused.remaining == (pod.key,) and not refused.free
    ((key, why),) = refused.blocked
    assert key == pod.key and "Cannot evict pod as it would violate the pod's disruption budget" in why
    assert kube.pod(pod.name) is not None
    assert not [r for r in kube.requests() if r["verb"] == "delete"]  # nothing deleted

    # The budget lets one go: evicted; the Deployment's new pod waits (sn01 is cordoned).
    kube.api.patch(ns_path("poddisruptionbudgets", "default", "web"),
                   {"spec": {"maxUnavailable": 1}}, ctype="application/merge-patch+json")
    kube.wait_pdb("web", allowed=1)
    done = kube_adapter.evict_pods("sn01")
    assert done.evicted == (pod.key,) and done.blocked == ()
    wait_for(lambda: not kube_adapter.node("sn01").busy, 30, "sn01 free once its kubelet ended the pod")
    wait_for(lambda: len(kube_adapter.pending_pods()) == 1, 30, "the Deployment's replacement pod pending")
    assert not [r for r in kube.requests() if r["verb"] == "delete" and r.get("resource") == "pods"]
