"""A real Kubernetes for the tests, the demo and the benchmarks: the control plane
(kube_control_plane), simulated kubelets (kubelets), and the few helpers a test needs to arrange
a cluster and look at it through the real API.

    kube = KubeCluster(folder).start()
    kube.add_node("sn01", labels={"sched": "k8s"})     # a kubelet registers it, Ready
    kube.add_pod("web-1")                              # the real scheduler binds it
    kube.wait_bound("web-1")                           # -> "sn01"; the kubelet runs it
    kube.power_off("sn01")                             # heartbeats stop; NotReady after grace_s
    kube.requests()                                    # what provisioner asked (the audit log)
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from testbed.kube_api import MERGE, Api, ApiError, ns_path
from testbed.kube_control_plane import PROVISIONER_USER, VERSION, ControlPlane
from testbed.kubelets import STOP_ANNOTATION, Kubelets
from testbed.process import free_port
from testbed.wait import wait_for

IMAGE = "registry.invalid/app:1"  # never pulled: simulated kubelets run no containers


def condition(obj: dict | None, kind: str) -> dict:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


class KubeCluster:
    def __init__(self, folder: str | os.PathLike, grace_s: int = 8, kubelet_interval: float = 0.5):
        self.folder = Path(folder)
        self.plane = ControlPlane(self.folder, grace_s=grace_s)
        self.kubelet_interval = kubelet_interval
        self.api: Api | None = None
        self.kubelets: Kubelets | None = None
        self.kubeconfig: Path | None = None  # admin (system:masters): kubectl, the test world
        self.provisioner_kubeconfig: Path | None = None  # the product's identity, RBAC-limited
        self._mark = 0
        self._namespaces = {"default"}
        self._claims: dict[str, str] = {}  # node name -> the world (SimSite) that uses it

    def claim(self, owner: str, names) -> None:
        """A world takes its node names for as long as it runs. Two live worlds on one control
        plane with a name in common would each take the other's Node (its labels, taints, pods)
        for its own: refused, naming both."""
        taken = {n: self._claims[n] for n in names if self._claims.get(n, owner) != owner}
        if taken:
            raise AssertionError(f"node names already used by another live world on this control plane: "
                                 f"{taken}; give {owner} names of its own (shared=, fixed_k8s=)")
        self._claims.update({n: owner for n in names})

    def release(self, owner: str) -> None:
        self._claims = {n: o for n, o in self._claims.items() if o != owner}

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> "KubeCluster":
        self.plane.start()
        try:
            self.api = self.plane.api
            self.kubeconfig = self.plane.kubeconfig("admin")
            self.provisioner_kubeconfig = self.plane.kubeconfig(PROVISIONER_USER)
            self.kubelets = Kubelets(self.api, interval=self.kubelet_interval, version=VERSION).start()
            self._mark = self.plane.audit_mark()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.kubelets:
            self.kubelets.stop()
        self.plane.stop()

    def __enter__(self) -> "KubeCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def server(self) -> str:
        return self.plane.server

    def reset(self) -> None:
        """An empty cluster: every kubelet stopped, every workload, PDB, pod, Node, Lease and test
        webhook gone (pods force-deleted: no kubelet is left to finish them). The audit log
        mark moves on, so requests() shows this test's calls only. Fails on errors of the
        simulated kubelets nobody took (every fixture takes them at its teardown)."""
        left = self.kubelets.take_errors()
        if left:
            raise AssertionError("simulated kubelet errors nobody checked (an earlier test's leftovers?): "
                                 + "; ".join(left))
        for name in list(self.kubelets.nodes):
            self.kubelets.halt(name)
        api = self.api
        for hook in api.items(ns_path("validatingwebhookconfigurations")):
            api.delete(ns_path("validatingwebhookconfigurations", name=hook["metadata"]["name"]))
        for ns in self._namespaces | {"kube-system"}:
            for kind in ("deployments", "replicasets", "daemonsets", "poddisruptionbudgets"):
                api.delete(ns_path(kind, ns), {"propagationPolicy": "Orphan"})
        for pod in api.items(ns_path("pods")):
            m = pod["metadata"]
            api.delete(ns_path("pods", m["namespace"], m["name"]), {"gracePeriodSeconds": 0})
        api.delete(ns_path("nodes"))
        api.delete(ns_path("leases", "kube-node-lease"))
        wait_for(lambda: not api.items(ns_path("pods")) and not api.items(ns_path("nodes")), 30,
                 "the cluster to be empty")
        self._mark = self.plane.audit_mark()

    # -- nodes ---------------------------------------------------------------------------

    def add_node(self, name: str, *, labels: dict | None = None, ready: bool = True, unschedulable: bool = False,
                 cpu: str = "4", memory: str = "16Gi", gpus: int = 0, taints: list | None = None,
                 ip: str | None = None) -> str:
        """A node whose kubelet registered it and runs; ready=False: it reports NotReady.
        Returns its bootID."""
        boot_id = self.kubelets.boot(name, cpu=cpu, memory=memory, gpus=gpus, ip=ip, labels=labels, taints=taints,
                                     unschedulable=unschedulable, ready=ready)
        if labels:  # also when a Node of that name was there already (a kubelet keeps its labels)
            self.patch_node(name, {"metadata": {"labels": labels}})
        return boot_id

    def boot(self, name: str, **kw) -> str:
        """The node (re)boots an image with a kubelet: Ready with a new bootID."""
        return self.kubelets.boot(name, **kw)

    def power_off(self, name: str) -> None:
        """The node's OS is gone: no heartbeats; the node-lifecycle controller marks it NotReady."""
        self.kubelets.halt(name)

    def set_node_ready(self, name: str, ready: bool) -> None:
        """A running kubelet reports Ready / NotReady (starting it if it is not running)."""
        if ready and not self.kubelets.running(name):
            self.kubelets.boot(name)
        else:
            self.kubelets.set_ready(name, ready)

    def node(self, name: str) -> dict | None:
        return self.api.get(ns_path("nodes", name=name))

    def ready(self, name: str) -> bool:
        return condition(self.node(name), "Ready").get("status") == "True"

    def wait_not_ready(self, name: str, timeout: float | None = None) -> None:
        wait_for(lambda: not self.ready(name), timeout or self.plane.grace_s + 20, f"node {name} NotReady")

    # -- workloads -------------------------------------------------------------------------

    def namespace(self, name: str) -> None:
        if name in self._namespaces or name == "kube-system":
            return
        if self.api.get(ns_path("namespaces", name=name)) is None:
            self.api.create(ns_path("namespaces"), {"apiVersion": "v1", "kind": "Namespace",
                                                    "metadata": {"name": name}})
        self.plane.wait_service_account(name)
        self._namespaces.add(name)

    @staticmethod
    def pod_spec(requests: dict | None = None, gpus: int = 0, node_selector: dict | None = None,
                 tolerations: list | None = None, node: str | None = None, grace_s: int = 30) -> dict:
        res = dict(requests or {"cpu": "100m", "memory": "128Mi"})
        limits = {}
        if gpus:  # extended resources need a limit (equal to the request)
            res["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
        spec: dict = {"containers": [{"name": "main", "image": IMAGE, "imagePullPolicy": "Never",
                                      "resources": {"requests": res, **({"limits": limits} if limits else {})}}],
                      "terminationGracePeriodSeconds": grace_s, "automountServiceAccountToken": False}
        if node_selector:
            spec["nodeSelector"] = dict(node_selector)
        if tolerations is not None:
            spec["tolerations"] = tolerations
        if node:
            spec["nodeName"] = node
        return spec

    def add_pod(self, name: str, *, namespace: str = "default", node: str | None = None, phase: str | None = None,
                requests: dict | None = None, labels: dict | None = None, node_selector: dict | None = None,
                tolerations: list | None = None, annotations: dict | None = None, gpus: int = 0,
                priority_class: str | None = None, grace_s: int = 30, stop_s: float = 0,
                finalizers: list[str] | None = None) -> dict:
        """A bare pod. node: bound at creation (as kubectl run --overrides nodeName, or a static
        pod), else the real scheduler places it. phase: what its kubelet reports (Succeeded...).
        grace_s: its terminationGracePeriodSeconds; stop_s: the seconds its application takes to
        stop after SIGTERM (evicted, it stays Terminating min(stop_s, grace_s) s); finalizers:
        keep it Terminating after its kubelet is done, until they are removed."""
        self.namespace(namespace)
        spec = self.pod_spec(requests, gpus, node_selector, tolerations, node, grace_s)
        if stop_s:
            annotations = {**(annotations or {}), STOP_ANNOTATION: str(stop_s)}
        if priority_class:
            spec["priorityClassName"] = priority_class
        pod = self.api.create(ns_path("pods", namespace), {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name},
                         **({"annotations": annotations} if annotations else {}),
                         **({"finalizers": finalizers} if finalizers else {})},
            "spec": spec})
        if phase and node:
            self.kubelets.set_pod_phase(namespace, name, phase)
        return pod

    def add_replicaset(self, name: str, replicas: int, *, namespace: str = "default", labels: dict | None = None,
                       requests: dict | None = None, node_selector: dict | None = None, grace_s: int = 30,
                       stop_s: float = 0) -> dict:
        """A ReplicaSet: the real controller makes its pods (and replaces an evicted one).
        grace_s, stop_s: as for add_pod (stop_s > grace_s: an application deaf to SIGTERM)."""
        self.namespace(namespace)
        labels = labels or {"app": name}
        meta: dict = {"labels": labels, **({"annotations": {STOP_ANNOTATION: str(stop_s)}} if stop_s else {})}
        return self.api.create(ns_path("replicasets", namespace), {
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": meta,
                                  "spec": self.pod_spec(requests, node_selector=node_selector, grace_s=grace_s)}}})

    def add_daemonset(self, name: str, *, namespace: str = "kube-system", node_selector: dict | None = None) -> dict:
        """A DaemonSet: the real controller puts a pod on each (selected) node."""
        self.namespace(namespace)
        labels = {"app": name}
        return self.api.create(ns_path("daemonsets", namespace), {
            "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": self.pod_spec({"cpu": "10m", "memory": "16Mi"},
                                                        node_selector=node_selector)}}})

    def add_pdb(self, name: str, *, namespace: str = "default", match_labels: dict,
                min_available: int | str | None = None, max_unavailable: int | str | None = None) -> dict:
        """A PodDisruptionBudget; returns once the real disruption controller has computed it."""
        if (min_available is None) == (max_unavailable is None):
            raise ValueError("give exactly one of min_available, max_unavailable")
        self.namespace(namespace)
        spec: dict = {"selector": {"matchLabels": dict(match_labels)}}
        spec["minAvailable" if min_available is not None else "maxUnavailable"] = \
            min_available if min_available is not None else max_unavailable
        self.api.create(ns_path("poddisruptionbudgets", namespace), {
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec})
        return self.wait_pdb(name, namespace)

    def wait_pdb(self, name: str, namespace: str = "default", allowed: int | None = None,
                 timeout: float = 30) -> dict:
        """The PDB once the disruption controller observed its current generation (and, if given,
        once it allows exactly `allowed` disruptions)."""
        path = ns_path("poddisruptionbudgets", namespace, name)

        def done():
            pdb = self.api.get(path)
            st = pdb.get("status") or {}
            if st.get("observedGeneration") != pdb["metadata"].get("generation"):
                return None
            if allowed is not None and st.get("disruptionsAllowed") != allowed:
                return None
            return pdb

        return wait_for(done, timeout, f"PDB {namespace}/{name} computed"
                        + (f" with {allowed} disruption(s) allowed" if allowed is not None else ""))

    def pod(self, name: str, namespace: str = "default") -> dict | None:
        return self.api.get(ns_path("pods", namespace, name))

    def pods(self, node: str | None = None, namespace: str | None = None) -> list[dict]:
        params = {"fieldSelector": f"spec.nodeName={node}"} if node else {}
        return self.api.items(ns_path("pods", namespace), **params)

    def delete_pod(self, name: str, namespace: str = "default") -> None:
        """Its owner deletes it at once (grace 0: also when no kubelet is there to finish it)."""
        self.api.delete(ns_path("pods", namespace, name), {"gracePeriodSeconds": 0})
        self.wait_gone(name, namespace)

    def set_pod_phase(self, namespace: str, name: str, phase: str) -> None:
        self.kubelets.set_pod_phase(namespace, name, phase)

    def wait_bound(self, name: str, namespace: str = "default", node: str | None = None,
                   timeout: float = 30) -> str:
        """Wait until the scheduler bound the pod (to `node`, if given) and its kubelet runs it."""
        def bound():
            p = self.pod(name, namespace) or {}
            on = (p.get("spec") or {}).get("nodeName")
            ok = on and (node is None or on == node) and (p.get("status") or {}).get("phase") == "Running"
            return on if ok else None

        return wait_for(bound, timeout, f"pod {namespace}/{name} running" + (f" on {node}" if node else ""))

    def wait_unschedulable(self, name: str, namespace: str = "default", timeout: float = 30) -> str:
        """Wait until the scheduler tried the pod and could not place it; returns its message."""
        def tried():
            c = condition(self.pod(name, namespace), "PodScheduled")
            return c.get("message") or "?" if c.get("status") == "False" and c.get("reason") == "Unschedulable" \
                else None

        return wait_for(tried, timeout, f"pod {namespace}/{name} marked Unschedulable by the scheduler")

    def settle(self, timeout: float = 30, quiet_s: float = 1.5) -> dict[str, str]:
        """Wait until the scheduler and the kubelets are done with what there is: every pod for
        the default scheduler is bound (and, on a running kubelet, started) or marked
        Unschedulable, and nothing changed for quiet_s (a pod that fits since a node turned
        Ready is retried within that). Returns {"namespace/name": node} of the bound pods."""
        last: list = [None, 0.0]

        def still() -> dict | None:
            view = {}
            for p in self.pods():
                meta, spec, status = p["metadata"], p["spec"], p.get("status") or {}
                key = f"{meta['namespace']}/{meta['name']}"
                if meta.get("deletionTimestamp") or spec.get("schedulerName", "default-scheduler") != \
                        "default-scheduler":
                    continue
                on = spec.get("nodeName")
                if on:
                    if status.get("phase") == "Pending" and self.kubelets.running(on):
                        return None  # its kubelet is about to start it
                    view[key] = on
                elif condition(p, "PodScheduled").get("reason") != "Unschedulable":
                    return None  # not looked at yet
                else:
                    view[key] = None
            now = time.monotonic()
            if view != last[0]:
                last[0], last[1] = view, now
                return None
            return [view] if now - last[1] >= quiet_s else None

        (view,) = wait_for(still, timeout, "the scheduler and the kubelets to settle", interval=0.1)
        return {k: v for k, v in view.items() if v}

    def wait_gone(self, name: str, namespace: str = "default", timeout: float = 30) -> None:
        wait_for(lambda: self.pod(name, namespace) is None, timeout, f"pod {namespace}/{name} gone")

    # -- what provisioner did on the wire ------------------------------------------------------

    def requests(self) -> list[dict]:
        """Provisioner's requests since the last reset (the API server's audit log)."""
        return self.plane.audit(self._mark)

    def writes(self) -> list[dict]:
        return [r for r in self.requests() if r["verb"] not in ("get", "list", "watch")]

    # -- faults a real cluster has -------------------------------------------------------------

    def unreachable_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig with the right credentials for an API server that is not there."""
        return self.plane.kubeconfig(PROVISIONER_USER, path, server=f"https://127.0.0.1:{free_port()}")

    def kubeconfig_for_cert(self, user: str, path: Path, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig for another user, authenticated by a client certificate of the cluster CA."""
        import yaml

        crt, key = self.plane.ca.issue(f"user-{user}", user, groups)
        cfg = yaml.safe_load(self.plane.kubeconfig(PROVISIONER_USER, path).read_text())
        cfg["users"] = [{"name": PROVISIONER_USER, "user": {"client-certificate": str(crt), "client-key": str(key)}}]
        path.write_text(yaml.safe_dump(cfg))
        return path

    def kubeconfig_with_token(self, path: Path, token: str) -> Path:
        return self.plane.kubeconfig(PROVISIONER_USER, path, token=token)

    @contextmanager
    def failing_webhook(self, resources: list[str], operations: tuple[str, ...] = ("CREATE", "UPDATE", "DELETE")):
        """An admission webhook that cannot be reached, failurePolicy Fail, for provisioner's
        writes to `resources` (e.g. ["nodes", "pods/eviction"]): the real API server answers
        them HTTP 500 (failed calling webhook), as when a site's policy webhook is down."""
        name = "provisioner-test-broken-webhook"
        self.api.create(ns_path("validatingwebhookconfigurations"), {
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{"name": "broken.provisioner.invalid", "failurePolicy": "Fail", "sideEffects": "None",
                          "admissionReviewVersions": ["v1"], "timeoutSeconds": 2,
                          "clientConfig": {"url": f"https://127.0.0.1:{free_port()}/validate"},
                          "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": list(operations),
                                     "resources": resources}],
                          "matchConditions": [{"name": "provisioner-only",
                                               "expression": f"request.userInfo.username == '{PROVISIONER_USER}'"}]}]})
        # The API server picks up a new webhook configuration within a moment: wait until a
        # dry-run write of provisioner's is refused, then start the test's clock afresh.
        as_provisioner = Api(self.server, str(self.plane.ca.cert), self.plane.tokens[PROVISIONER_USER])
        probe_node = next(iter(n["metadata"]["name"] for n in self.api.items(ns_path("nodes"))), None)

        def refused() -> bool:
            try:
                as_provisioner.request("PATCH", ns_path("nodes", name=probe_node), {"metadata": {}}, ctype=MERGE,
                                       params={"dryRun": "All"})
            except ApiError as exc:
                return exc.status == 500
            return False

        try:
            if probe_node and "nodes" in resources:
                wait_for(refused, 15, "the broken webhook to take effect")
            else:
                time.sleep(2)
        finally:
            as_provisioner.close()
        self._mark = self.plane.audit_mark()
        try:
            yield
        finally:
            self.api.delete(ns_path("validatingwebhookconfigurations", name=name))

    def patch_node(self, name: str, body: dict) -> dict:
        """Another client's write to a node (an admin's kubectl edit)."""
        return self.api.patch(ns_path("nodes", name=name), body, MERGE)
