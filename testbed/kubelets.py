"""Simulated kubelets: the part of a kubelet the control plane sees, for nodes that run no real
one (the simulated shared nodes, the fixed Kubernetes nodes, the benchmark's thousand nodes).

A kubelet that starts registers its Node (labels, capacity, a fresh status.nodeInfo.bootID) and
posts Ready; while it runs it renews its Lease in kube-node-lease (the heartbeat the real
node-lifecycle controller watches), starts the pods the real scheduler bound to it (status
Running and Ready, which is what the real disruption controller counts), and finishes the
deletion of its pods that were evicted or deleted as the real one does: the pod stays Terminating
until its containers stopped, which takes STOP_ANNOTATION seconds after the SIGTERM (default 0: an
application that exits on SIGTERM), and at most the deletion's grace period (then SIGKILL); then
the kubelet reports the terminal phase and makes the final delete, which the API server carries
out once the pod's finalizers are gone. When its node powers off it simply stops: no more
heartbeats, so the real controller marks the node NotReady after its grace period, as for a real
node.

What a tick cannot do is recorded in `errors` (take_errors()); the test world's fixtures fail the
test on them. A pod that disappears between the listing and the kubelet's write is no error (the
real kubelet meets the same race).

One thread serves every simulated node; nothing here decides anything for the product.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from dataclasses import dataclass, field

from testbed.kube_api import Api, ApiError, ns_path

LEASE_S = 40  # the kubelet's default nodeLeaseDurationSeconds
# The kubelet's nodeStatusUpdateFrequency: how often it compares its Node's status with its own
# (and posts its own again where the node-lifecycle controller marked it Unknown).
STATUS_S = 10
# On a pod: the seconds its containers take to stop after SIGTERM (a slow or SIGTERM-deaf application).
STOP_ANNOTATION = "testbed.provisioner/stop-after-s"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _epoch(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()


def containers_stop_at(meta: dict) -> float:
    """When the containers of a pod being deleted have stopped: SIGTERM at the deletion request
    (deletionTimestamp minus its grace period), then the application's own stop time, cut at the
    grace period by SIGKILL."""
    grace = int(meta.get("deletionGracePeriodSeconds") or 0)
    asked = _epoch(meta["deletionTimestamp"]) - grace
    slow = float((meta.get("annotations") or {}).get(STOP_ANNOTATION) or 0)
    return asked + min(slow, grace)


@dataclass
class SimKubelet:
    name: str
    cpu: str = "4"
    memory: str = "16Gi"
    gpus: int = 0
    ip: str = "10.0.9.1"
    boot_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    running: bool = True
    ready: bool = True  # False: the kubelet runs but reports NotReady (e.g. its runtime is down)
    not_ready_reason: str = ""


def condition_status(node: dict, kind: str) -> str | None:
    return next((c.get("status") for c in (node.get("status") or {}).get("conditions") or [] if c["type"] == kind),
                None)


def ready_condition(ready: bool, message: str = "") -> dict:
    t = now()
    return {"type": "Ready", "status": "True" if ready else "False",
            "reason": "KubeletReady" if ready else "KubeletNotReady",
            "message": message or ("kubelet is posting ready status" if ready else "container runtime is down"),
            "lastHeartbeatTime": t, "lastTransitionTime": t}


class Kubelets:
    def __init__(self, api: Api, interval: float = 0.5, version: str = "v1.34.3"):
        self.api = api
        self.interval = interval
        self.version = version
        self.nodes: dict[str, SimKubelet] = {}
        self.errors: list[str] = []  # what a tick could not do (a test may show them)
        self._lock = threading.Lock()
        self._tick_lock = threading.Lock()  # halt() waits for a tick in progress: no write after it
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._phases: dict[tuple[str, str], str] = {}  # (namespace, pod) -> phase a test asked for
        self._status_at = 0.0  # time.monotonic() of the last status check

    # -- life cycle of the simulator --------------------------------------------------

    def start(self) -> "Kubelets":
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="sim-kubelets", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)
        with self._lock:
            self.nodes.clear()

    # -- what a node does -----------------------------------------------------------------

    def boot(self, name: str, *, cpu: str = "4", memory: str = "16Gi", gpus: int = 0, ip: str | None = None,
             labels: dict | None = None, taints: list | None = None, unschedulable: bool = False,
             ready: bool = True, provider_id: str | None = None) -> str:
        """The node's kubelet starts: register the Node if Kubernetes has none (with labels,
        taints, unschedulable as given), post its status (Ready, a new bootID) and start
        heartbeating. Returns the bootID."""
        k = SimKubelet(name, str(cpu), str(memory), gpus, ip or f"10.0.9.{len(self.nodes) + 1}", ready=ready)
        status = self._status(k)
        if self.api.get(ns_path("nodes", name=name)) is None:
            self._register(name, status, labels, taints, unschedulable, provider_id)
        # A kubelet posts its status on start, also over an existing Node (a reboot).
        self.api.patch(ns_path("nodes", name=name, sub="status"), {"status": status})
        self._renew(name)
        with self._lock:
            self.nodes[name] = k
        self._wake.set()
        return k.boot_id

    def _register(self, name: str, status: dict, labels, taints, unschedulable, provider_id) -> None:
        """Create the Node as a kubelet registers it; one that appeared meanwhile is kept (a
        kubelet then only posts its status over it)."""
        spec: dict = {}
        if taints:
            spec["taints"] = taints
        if unschedulable:
            spec["unschedulable"] = True
        if provider_id:
            spec["providerID"] = provider_id
        try:
            self.api.create(ns_path("nodes"), {
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                                      "kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
                                                      "beta.kubernetes.io/arch": "amd64", **(labels or {})}},
                "spec": spec, "status": status})
        except ApiError as exc:
            if exc.status != 409:
                raise

    def take_errors(self) -> list[str]:
        """The errors of the ticks so far, cleared."""
        with self._lock:
            out, self.errors = self.errors, []
        return out

    def halt(self, name: str) -> None:
        """Power off: the kubelet is gone, its heartbeats stop (the Node object stays)."""
        with self._tick_lock, self._lock:
            k = self.nodes.pop(name, None)
        if k:
            k.running = False

    def set_ready(self, name: str, ready: bool, message: str = "") -> None:
        """The kubelet stays up but reports (Not)Ready, as when its container runtime fails."""
        with self._lock:
            k = self.nodes.get(name)
        if k is None:
            raise KeyError(f"no running simulated kubelet on {name}")
        k.ready, k.not_ready_reason = ready, message
        self.api.patch(ns_path("nodes", name=name, sub="status"),
                       {"status": {"conditions": [ready_condition(ready, message)]}})

    def running(self, name: str) -> bool:
        with self._lock:
            return name in self.nodes

    def set_pod_phase(self, namespace: str, name: str, phase: str) -> None:
        """The pod's containers ended (Succeeded/Failed) or run (Running): the kubelet reports it."""
        self._phases[(namespace, name)] = phase
        self.api.patch(ns_path("pods", namespace, name, "status"), {"status": self._pod_status(phase)})

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                with self._tick_lock:
                    self.tick()
            except Exception as exc:  # e.g. the API server down: the test that stopped it takes these
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    del self.errors[:-20]

    def tick(self) -> None:
        with self._lock:
            nodes = dict(self.nodes)
        if not nodes:
            return
        for name in nodes:
            self._renew(name)
        if time.monotonic() - self._status_at >= STATUS_S:
            self._status_at = time.monotonic()
            self._post_status(nodes)
        now_s = dt.datetime.now(dt.timezone.utc).timestamp()
        for pod in self.api.items(ns_path("pods"), fieldSelector="spec.nodeName!="):
            meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
            if spec.get("nodeName") not in nodes:
                continue
            path = ns_path("pods", meta["namespace"], meta["name"])
            try:
                if meta.get("deletionTimestamp"):
                    if now_s < containers_stop_at(meta):
                        continue  # Terminating: SIGTERM sent, the containers still run
                    if status.get("phase") not in ("Succeeded", "Failed"):
                        # Stopped: the kubelet reports the terminal phase, then makes the final delete.
                        self.api.patch(path + "/status", {"status": self._pod_status("Failed")}, ok_missing=True)
                    self.api.delete(path, {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}})
                elif status.get("phase") == "Pending":
                    phase = self._phases.get((meta["namespace"], meta["name"]), "Running")
                    self.api.patch(path + "/status", {"status": self._pod_status(phase, spec, nodes[spec["nodeName"]])},
                                   ok_missing=True)
            except ApiError as exc:
                if exc.status != 409:  # 409: the uid precondition, a new pod of the same name
                    raise

    def _post_status(self, nodes: dict[str, SimKubelet]) -> None:
        """As the real kubelet every STATUS_S: where the Node's Ready condition is not what this
        kubelet reports (the controller set it Unknown while the API server or the heartbeats were
        away), post its own again."""
        for node in self.api.items(ns_path("nodes")):
            k = nodes.get(node["metadata"]["name"])
            if k is None:
                continue
            ready = condition_status(node, "Ready")
            if ready != ("True" if k.ready else "False"):
                self.api.patch(ns_path("nodes", name=k.name, sub="status"),
                               {"status": {"conditions": [ready_condition(k.ready, k.not_ready_reason)]}},
                               ok_missing=True)

    def _renew(self, name: str) -> None:
        path = ns_path("leases", "kube-node-lease", name)
        body = {"spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_S, "renewTime": _micro_now()}}
        try:
            if self.api.patch(path, body, ok_missing=True) is None:
                self.api.create(ns_path("leases", "kube-node-lease"),
                                {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                 "metadata": {"name": name, "namespace": "kube-node-lease"}, **body})
        except ApiError as exc:
            if exc.status != 409:  # created by a concurrent tick
                raise

    # -- status documents ------------------------------------------------------------------

    def _status(self, k: SimKubelet) -> dict:
        capacity = {"cpu": k.cpu, "memory": k.memory, "pods": "110", "ephemeral-storage": "50Gi"}
        if k.gpus:
            capacity["nvidia.com/gpu"] = str(k.gpus)
        t = now()
        pressure = [{"type": c, "status": "False", "reason": f"KubeletHas{r}", "message": "",
                     "lastHeartbeatTime": t, "lastTransitionTime": t}
                    for c, r in (("MemoryPressure", "SufficientMemory"), ("DiskPressure", "NoDiskPressure"),
                                 ("PIDPressure", "SufficientPID"))]
        return {
            "capacity": capacity, "allocatable": dict(capacity),
            "conditions": [*pressure, ready_condition(k.ready)],
            "addresses": [{"type": "InternalIP", "address": k.ip}, {"type": "Hostname", "address": k.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": uuid.uuid5(uuid.NAMESPACE_DNS, k.name).hex,
                         "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_URL, k.name)), "bootID": k.boot_id,
                         "kernelVersion": "6.1.0-simulated", "osImage": "provisioner simulated node",
                         "containerRuntimeVersion": "simulated://1", "kubeletVersion": self.version,
                         "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        }

    @staticmethod
    def _pod_status(phase: str, spec: dict | None = None, k: SimKubelet | None = None) -> dict:
        t = now()
        running = phase == "Running"
        conds = [{"type": c, "status": "True" if (running or c in ("Initialized", "PodScheduled")) else "False",
                  "lastProbeTime": None, "lastTransitionTime": t}
                 for c in ("Initialized", "Ready", "ContainersReady", "PodScheduled")]
        status: dict = {"phase": phase, "conditions": conds}
        if spec is not None and k is not None:
            status.update(hostIP=k.ip, podIP=f"10.244.0.{abs(hash(t + k.name)) % 250 + 2}", startTime=t,
                          containerStatuses=[
                              {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": running,
                               "restartCount": 0, "started": running,
                               "containerID": f"simulated://{uuid.uuid4().hex}",
                               "state": {"running": {"startedAt": t}} if running else
                               {"terminated": {"exitCode": 0 if phase == "Succeeded" else 1, "startedAt": t,
                                               "finishedAt": t, "reason": "Completed" if phase == "Succeeded"
                                               else "Error"}}}
                              for c in spec.get("containers") or []])
        return status
