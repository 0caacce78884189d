"""ProvisioningRequests (autoscaling.x-k8s.io/v1) of provisioner's class: read them, write their
conditions, label the nodes booked for them, watch them. I/O only: what a request asks for is
read by provisioning_demand, and what to do about it is the policy's decision.

Rides on the Kubernetes adapter's connection (its errors, its credentials); the RBAC it needs is
in examples/kubernetes/provisioner-rbac.yaml (provisioningrequests and their status, podtemplates).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from provisioner.clusters.kubernetes import KubernetesAdapter
from provisioner.errors import OperationError
from provisioner.provisioning_demand import (
    ACCEPTED, DETAIL_NODES, NODE_LABEL, BadRequest, Request, condition, is_ours, parse)

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "autoscaling.x-k8s.io", "v1", "provisioningrequests"


@dataclass(frozen=True)
class Seen:
    """One request of our class as read: parsed, or why it cannot be (bad input)."""

    namespace: str
    name: str
    request: Request | None
    bad: BadRequest | None
    conditions: dict[str, dict]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class ProvisioningRequests:
    def __init__(self, kube: KubernetesAdapter):
        self.kube = kube
        self.custom = client.CustomObjectsApi(kube.api_client)

    def requests(self) -> list[Seen]:
        """Every ProvisioningRequest of our class that is not being deleted, oldest first."""
        items = self.kube.list_items("listing ProvisioningRequests", self.custom.list_cluster_custom_object,
                                     group=GROUP, version=VERSION, plural=PLURAL)
        ours = [pr for pr in items if is_ours(pr) and not (pr.get("metadata") or {}).get("deletionTimestamp")]
        if not ours:
            return []
        templates: dict[tuple[str, str], dict] = {}
        for ns in sorted({pr["metadata"]["namespace"] for pr in ours}):
            for t in self.kube.list_items(f"listing PodTemplates in {ns}", self.kube.core.list_namespaced_pod_template,
                                          namespace=ns):
                templates[(ns, t["metadata"]["name"])] = t
        out = []
        ours.sort(key=lambda pr: (pr["metadata"].get("creationTimestamp") or "", pr["metadata"]["name"]))
        for pr in ours:
            meta = pr["metadata"]
            ns = meta["namespace"]
            conds = {c.get("type"): c for c in (pr.get("status") or {}).get("conditions") or [] if c.get("type")}
            try:
                req = parse(pr, {name: t for (n, name), t in templates.items() if n == ns})
                out.append(Seen(ns, meta["name"], req, None, conds))
            except BadRequest as exc:
                out.append(Seen(ns, meta["name"], None, exc, conds))
        return out

    def set_status(self, seen: Seen, conditions: Iterable[dict], nodes: Iterable[str] | None = None,
                   label: str | None = None) -> bool:
        """Set these conditions (the others stay: the whole list is written, a merge patch
        replaces lists), and the booked nodes and their label in provisioningClassDetails.
        False: the request is gone (deleted meanwhile)."""
        merged = dict(seen.conditions)
        for c in conditions:
            old = merged.get(c["type"])
            if old and old.get("status") == c["status"]:
                c = {**c, "lastTransitionTime": old.get("lastTransitionTime") or c["lastTransitionTime"]}
            merged[c["type"]] = c
        status: dict = {"conditions": list(merged.values())}
        if nodes is not None:
            status["provisioningClassDetails"] = {DETAIL_NODES: ",".join(nodes), NODE_LABEL: label or ""}
        what = f"updating the status of ProvisioningRequest {seen.key}"
        try:
            self.kube.call(what, self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, seen.namespace,
                           PLURAL, seen.name, {"status": status}, expect=(404,),
                           _content_type="application/merge-patch+json")
        except ApiException:
            return False
        seen.conditions.update(merged)  # the next write of this pass merges with this one
        return True

    def label_nodes(self, names: Iterable[str], value: str | None) -> None:
        """Label the nodes booked for a request (value None: remove the label)."""
        for name in names:
            what = f"labelling node {name} {NODE_LABEL}={value}"
            try:
                self.kube.call(what, self.kube.core.patch_node, name, {"metadata": {"labels": {NODE_LABEL: value}}},
                               expect=(404,), _content_type="application/merge-patch+json")
            except ApiException:
                raise OperationError(f"{what}: the node has no Node object in Kubernetes") from None

    def labelled(self) -> dict[str, str]:
        """Node -> the request label it carries, for every node that carries one."""
        nodes = self.kube.list_items("listing nodes booked for ProvisioningRequests", self.kube.core.list_node,
                                     label_selector=NODE_LABEL)
        return {n["metadata"]["name"]: n["metadata"]["labels"][NODE_LABEL] for n in nodes}

    def watch(self, on_request: Callable[[str], None], stop: threading.Event, timeout_s: int = 60) -> None:
        """on_request("namespace/name") for each request of our class created or whose spec
        changed, until `stop`; blocks, never raises (the Kubernetes adapter's watch loop). Status
        changes (provisioner's own writes) do not count: they would wake a pass per write."""
        generations: dict[str, object] = {}

        def report(pr: dict) -> None:
            if not is_ours(pr):
                return
            key = f"{pr['metadata']['namespace']}/{pr['metadata']['name']}"
            gen = (pr["metadata"].get("uid"), pr["metadata"].get("generation"))
            if generations.get(key) != gen:
                generations[key] = gen
                on_request(key)

        self.kube.watch_objects("watching ProvisioningRequests", self.custom.list_cluster_custom_object, report, stop,
                                timeout_s, group=GROUP, version=VERSION, plural=PLURAL)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def accepted(now: datetime) -> dict:
    return condition(ACCEPTED, True, "Accepted", "provisioner serves this class: it switches shared nodes for it", now)
