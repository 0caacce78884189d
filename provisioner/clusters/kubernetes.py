"""Kubernetes adapter: observe pending pods and nodes, cordon/uncordon, label, evict, delete.

Built on the official `kubernetes` Python client (a kubeconfig file, or the in-cluster service
account). It does I/O and never decides: observations come back as plain frozen dataclasses for
the policy, and every action checks its preconditions, then verifies the state it left.

Ownership: provisioner marks the cordons it sets with the node annotation
`provisioner/cordoned=true` (set in the same patch as spec.unschedulable, with the node's
resourceVersion as a precondition, so a concurrent change is a 409 and not a lost update).
A cordon without that annotation belongs to someone else (an admin, kubectl drain, an upgrade
tool) and `uncordon()` refuses to lift it.

Evictions go through the Eviction API only. A 429 means a PodDisruptionBudget does not allow it
*now*: the pod is reported as blocked and the node as not yet free; nothing is ever force-deleted.

Errors: API server unreachable, timing out, or answering 401/403/5xx become one OperationError
that says what to check; the operation stops at the first failed call (observations are read
before any write, so a failing server means no action was taken).

Events: `watch_unschedulable` reports pods the scheduler marks Unschedulable as it happens (for
`provisioner run`); it only reports, the caller decides what a report is worth.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import urllib3
from kubernetes import client, config as kube_config, watch as kube_watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.utils import parse_quantity

from provisioner import ROLES
from provisioner.errors import OperationError, UsageError
from provisioner.model import KubernetesSettings
from provisioner.taints import Taint, Toleration, taints_of, tolerations_of

log = logging.getLogger(__name__)

CORDON_ANNOTATION = "provisioner/cordoned"
# An admin's maintenance hold (`provisioner hold`), its reason as the value: shown, never a cordon.
HOLD_ANNOTATION = "provisioner/hold"
_MIRROR_ANNOTATION = "kubernetes.io/config.mirror"  # static pods: bound to their node, not evictable
_FINISHED = ("Succeeded", "Failed")
_CONFLICT_RETRIES = 3
LIST_PAGE = 5000  # items per list call: bounded memory (a few MB), and a 10,000-pod queue in two calls
# watch_unschedulable: after a failed call, wait WATCH_BACKOFF_S, doubling up to WATCH_BACKOFF_MAX_S.
WATCH_BACKOFF_S, WATCH_BACKOFF_MAX_S = 0.5, 10.0
WATCH_READ_SLACK_S = 30  # a watch's connection is given up this long after the server should have ended it

# --------------------------------------------------------------------------- observations


@dataclass(frozen=True)
class PendingPod:
    """A pod the scheduler could not place (Pending, PodScheduled=False, reason Unschedulable).

    The resource fields have the same names and units as policy.PendingPod."""

    namespace: str
    name: str
    cpu_m: int  # millicores requested (the pod's effective request: containers, init containers, overhead)
    memory: int  # bytes requested
    gpus: int  # extended resources named */gpu (nvidia.com/gpu, amd.com/gpu)
    node_selector: tuple[tuple[str, str], ...]  # sorted (key, value) pairs
    tolerations: tuple[Toleration, ...]
    # Required node affinity: any one term must match; a term is (key, operator, values) triples.
    node_affinity: tuple[tuple[tuple[str, str, tuple[str, ...]], ...], ...]
    priority: int
    created: datetime | None
    message: str  # the scheduler's reason, e.g. "0/3 nodes are available: 3 Insufficient cpu."


@dataclass(frozen=True)
class PodOnNode:
    namespace: str
    name: str
    phase: str
    terminating: bool  # deletion requested (evicted), still shutting down

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class KubeNode:
    name: str
    ready: bool  # condition Ready is True
    unschedulable: bool  # spec.unschedulable: cordoned, by anyone
    cordoned_by_us: bool  # unschedulable, and the cordon carries provisioner's annotation
    role: str | None  # the value of the role label (settings.label_key): slurm, k8s or None
    labels: tuple[tuple[str, str], ...]  # sorted (key, value) pairs
    taints: tuple[Taint, ...]
    cpu_m: int  # allocatable millicores
    memory: int  # allocatable bytes
    gpus: int  # allocatable */gpu
    # Pods that hold the node: not DaemonSet-owned, not static (mirror) pods, not finished.
    pods: tuple[PodOnNode, ...]
    ready_reason: str = ""  # the Ready condition's reason (KubeletReady, KubeletNotReady, ...)
    boot_id: str = ""  # status.nodeInfo.bootID: the kubelet reports a new one after every boot
    # What every unfinished pod bound to it requests (DaemonSet pods too: they take room as well).
    requested: tuple[int, int, int] = (0, 0, 0)  # millicores, bytes, GPUs
    hold: str | None = None  # the HOLD_ANNOTATION's value: why provisioner leaves it alone

    @property
    def room(self) -> tuple[int, int, int]:
        """Room left for another pod: allocatable minus requested (millicores, bytes, GPUs)."""
        return (max(0, self.cpu_m - self.requested[0]), max(0, self.memory - self.requested[1]),
                max(0, self.gpus - self.requested[2]))

    @property
    def busy(self) -> bool:
        return bool(self.pods)

    @property
    def cordoned_by_other(self) -> bool:
        return self.unschedulable and not self.cordoned_by_us


@dataclass(frozen=True)
class EvictionResult:
    node: str
    evicted: tuple[str, ...]  # "namespace/name" the API accepted to evict in this call
    blocked: tuple[tuple[str, str], ...]  # ("namespace/name", why): refused for now (PodDisruptionBudget)
    remaining: tuple[str, ...]  # pods still holding the node after this call (blocked or terminating)

    @property
    def free(self) -> bool:
        """No pod holds the node any more: it may be switched."""
        return not self.remaining


# --------------------------------------------------------------------------- quantities


def _cpu_m(q: Any) -> int:
    return int(math.ceil(parse_quantity(q) * 1000))


def _amount(q: Any) -> int:
    return int(math.ceil(parse_quantity(q)))


def _resources(d: dict[str, Any] | None) -> tuple[int, int, int]:
    d = d or {}
    gpus = sum(_amount(v) for k, v in d.items() if k.endswith("/gpu"))
    return (_cpu_m(d["cpu"]) if "cpu" in d else 0, _amount(d["memory"]) if "memory" in d else 0, gpus)


def _container_requests(c: dict) -> tuple[int, int, int]:
    r = c.get("resources") or {}
    # A limit without a request is also the request (the API server defaults it so).
    return _resources({**(r.get("limits") or {}), **(r.get("requests") or {})})


def pod_requests(spec: dict) -> tuple[int, int, int]:
    """The pod's effective request (a pod spec as the API sends it), as the scheduler computes
    it: the larger of the containers' sum and the largest init container, plus the overhead."""
    total = [0, 0, 0]
    for c in spec.get("containers") or []:
        for i, v in enumerate(_container_requests(c)):
            total[i] += v
    for c in spec.get("initContainers") or []:
        for i, v in enumerate(_container_requests(c)):
            total[i] = max(total[i], v)
    for i, v in enumerate(_resources(spec.get("overhead"))):
        total[i] += v
    return total[0], total[1], total[2]


def holds_node(pod: dict) -> bool:
    """A pod that must leave before the node can switch: not finished, not a DaemonSet pod (it
    runs on every node and leaves with the node), not a static pod (same)."""
    meta = pod.get("metadata") or {}
    if (pod.get("status") or {}).get("phase") in _FINISHED:
        return False
    if any(o.get("controller") and o.get("kind") == "DaemonSet" for o in meta.get("ownerReferences") or []):
        return False
    return _MIRROR_ANNOTATION not in (meta.get("annotations") or {})


def _pod_key(pod: dict) -> str:
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


def _condition(obj: dict, kind: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None)


def is_unschedulable(pod: dict) -> bool:
    """A pod the scheduler tried and could not place: no node, not being deleted, and the
    condition PodScheduled=False with reason Unschedulable (one it has not looked at yet is not)."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    if spec.get("nodeName") or meta.get("deletionTimestamp"):
        return False
    cond = _condition(pod, "PodScheduled")
    return bool(cond) and cond.get("status") == "False" and cond.get("reason") == "Unschedulable"


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


# --------------------------------------------------------------------------- the adapter


class KubernetesAdapter:
    def __init__(self, settings: KubernetesSettings):
        self.settings = settings
        cfg = client.Configuration()
        try:
            if settings.in_cluster:
                kube_config.load_incluster_config(client_configuration=cfg)
                self._credentials = "the pod's service account token"
            else:
                path = settings.kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or \
                    os.path.expanduser("~/.kube/config")
                if not os.path.isfile(path):
                    raise OperationError(f"kubeconfig {path} does not exist: set kubernetes.kubeconfig in the site "
                                         "config (or kubernetes.in_cluster: true inside a pod)")
                kube_config.load_kube_config(config_file=path, context=settings.context, client_configuration=cfg,
                                             persist_config=False)
                self._credentials = f"the credentials in {path}"
        except ConfigException as exc:
            where = "kubernetes.in_cluster" if settings.in_cluster else "kubernetes.kubeconfig / kubernetes.context"
            raise OperationError(f"cannot load the Kubernetes client config ({str(exc).rstrip('.')}): check {where} "
                                 "in the site config") from None
        # One quick retry on a connection error; never on an answer (a 5xx is reported, not hidden).
        cfg.retries = urllib3.Retry(total=1, read=0, status=0, redirect=0, raise_on_status=False)
        self.host = cfg.host
        self._api_client = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self._api_client)
        self._timeout = settings.timeout_s

    def close(self) -> None:
        self._api_client.close()

    def __enter__(self) -> "KubernetesAdapter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calls and their errors ---------------------------------------------------

    @property
    def api_client(self) -> client.ApiClient:
        """The connection, for adapters of other APIs on the same server (they call through call())."""
        return self._api_client

    def call(self, what: str, fn, *args, expect: tuple[int, ...] = (), **kwargs):
        """_call, for those adapters: one error style for every API call."""
        return self._call(what, fn, *args, expect=expect, **kwargs)

    def list_items(self, what: str, fn, **kwargs) -> list[dict]:
        """_list (plain dicts, paged), for those adapters."""
        return self._list(what, fn, **kwargs)

    def _call(self, what: str, fn, *args, expect: tuple[int, ...] = (), **kwargs):
        """Call the API. Statuses in `expect` re-raise the ApiException for the caller to handle;
        everything else becomes one OperationError that says what to check."""
        try:
            return fn(*args, _request_timeout=self._timeout, **kwargs)
        except ApiException as exc:
            if exc.status in expect:
                raise
            raise self._api_error(what, exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise OperationError(f"Kubernetes API {self.host}: {what} failed: {_network_reason(exc, self._timeout)}") \
                from None
        except ValueError as exc:  # the client could not read the answer (not the Kubernetes API?)
            raise OperationError(f"Kubernetes API {self.host}: {what}: unreadable answer ({exc.__class__.__name__}); "
                                 "check that kubernetes.kubeconfig points at a Kubernetes API server") from None

    def _api_error(self, what: str, exc: ApiException) -> OperationError:
        code, msg = exc.status, _status_message(exc)
        if code == 401:
            return OperationError(f"Kubernetes API {self.host} rejected {self._credentials} (HTTP 401 Unauthorized) "
                                  f"while {what}: renew the token")
        if code == 403:
            return OperationError(f"Kubernetes API {self.host} forbids {what} (HTTP 403: {msg}): grant the "
                                  "provisioner's account RBAC rights on nodes, pods and pods/eviction")
        if code and code >= 500 and "calling webhook" in msg:
            # The real server answers 500 when an admission webhook it must call is down.
            return OperationError(f"Kubernetes API {self.host} failed while {what} (HTTP {code}: {msg}): check the "
                                  "admission webhook named there (its service, or its failurePolicy), then retry")
        if code and code >= 500:
            return OperationError(f"Kubernetes API {self.host} failed while {what} (HTTP {code}: {msg}): check the "
                                  "API server's health, then retry")
        return OperationError(f"Kubernetes API {self.host} refused {what} (HTTP {code}: {msg})")

    def _read_node(self, name: str, what: str) -> client.V1Node:
        try:
            return self._call(what, self.core.read_node, name, expect=(404,))
        except ApiException:
            raise _no_node(name, what) from None

    # -- observe ---------------------------------------------------------------------

    def server_version(self) -> str:
        info = self._call("reading the server version", client.VersionApi(self._api_client).get_code)
        return info.git_version

    def _list(self, what: str, fn, **kwargs) -> list[dict]:
        """Every item of a list call, as the API sends it (plain dicts: the client's model
        classes cost ~1 ms per pod, seconds for a big queue), in pages of LIST_PAGE."""
        return self._list_versioned(what, fn, **kwargs)[0]

    def _list_versioned(self, what: str, fn, **kwargs) -> tuple[list[dict], str | None]:
        """_list, and the list's resourceVersion (a watch from it misses nothing after the list)."""
        items: list[dict] = []
        token = None
        version = None
        while True:
            resp = self._call(what, fn, limit=LIST_PAGE, _continue=token, _preload_content=False, **kwargs)
            try:
                page = json.loads(resp.data)
            except ValueError:
                raise OperationError(f"Kubernetes API {self.host}: {what}: unreadable answer (not JSON); check "
                                     "that kubernetes.kubeconfig points at a Kubernetes API server") from None
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            version = version or meta.get("resourceVersion")  # every page of a paged list has the first's
            token = meta.get("continue")
            if not token:
                return items, version

    def pending_pods(self) -> list[PendingPod]:
        """Pods the scheduler could not place. Pods not yet looked at by the scheduler, being
        deleted, scheduled, or finished are not demand. One paged list, whatever the queue."""
        pods = self._list("listing pending pods", self.core.list_pod_for_all_namespaces,
                          field_selector="status.phase=Pending,spec.nodeName=")
        out = []
        for pod in pods:
            if not is_unschedulable(pod):
                continue
            meta, spec = pod["metadata"], pod.get("spec") or {}
            cond = _condition(pod, "PodScheduled") or {}
            cpu_m, memory, gpus = pod_requests(spec)
            out.append(PendingPod(
                namespace=meta["namespace"],
                name=meta["name"],
                cpu_m=cpu_m,
                memory=memory,
                gpus=gpus,
                node_selector=tuple(sorted((spec.get("nodeSelector") or {}).items())),
                tolerations=tolerations_of(spec),
                node_affinity=_required_affinity(spec),
                priority=spec.get("priority") or 0,
                created=_time(meta.get("creationTimestamp")),
                message=cond.get("message") or "",
            ))
        return out

    def nodes(self, names: Iterable[str] | None = None) -> dict[str, KubeNode]:
        """The nodes (all, or those named that exist in Kubernetes) with the pods holding them.
        A name missing from the result has no Node object (never joined, or deleted).

        Two paged lists (nodes; pods bound to a node and not finished), or for a single name two
        calls selected by name: the cost does not grow with the pending queue."""
        wanted = set(names) if names is not None else None
        running = "status.phase!=Succeeded,status.phase!=Failed"
        if wanted is not None and len(wanted) == 1:
            (one,) = wanted
            node_list = self._list("listing nodes", self.core.list_node, field_selector=f"metadata.name={one}")
            pods = self._list("listing pods", self.core.list_pod_for_all_namespaces,
                              field_selector=f"spec.nodeName={one},{running}")
        else:
            node_list = self._list("listing nodes", self.core.list_node)
            pods = self._list("listing pods", self.core.list_pod_for_all_namespaces,
                              field_selector=f"spec.nodeName!=,{running}")
        by_node: dict[str, list[PodOnNode]] = {}
        requested: dict[str, list[int]] = {}
        for pod in pods:
            on = (pod.get("spec") or {}).get("nodeName")
            if on and (wanted is None or on in wanted) and (pod.get("status") or {}).get("phase") not in _FINISHED:
                total = requested.setdefault(on, [0, 0, 0])
                for i, v in enumerate(pod_requests(pod.get("spec") or {})):
                    total[i] += v
            if on and (wanted is None or on in wanted) and holds_node(pod):
                by_node.setdefault(on, []).append(PodOnNode(
                    pod["metadata"]["namespace"], pod["metadata"]["name"],
                    (pod.get("status") or {}).get("phase") or "Unknown",
                    pod["metadata"].get("deletionTimestamp") is not None))
        out = {}
        for node in node_list:
            name = node["metadata"]["name"]
            if wanted is None or name in wanted:
                out[name] = self._kube_node(node, by_node.get(name, []), tuple(requested.get(name, (0, 0, 0))))
        return out

    def node(self, name: str) -> KubeNode | None:
        """One node, or None when Kubernetes has no Node object of that name."""
        return self.nodes([name]).get(name)

    def _kube_node(self, node: dict, pods: list[PodOnNode], requested: tuple[int, int, int] = (0, 0, 0)) -> KubeNode:
        meta, spec, status = node["metadata"], node.get("spec") or {}, node.get("status") or {}
        labels = meta.get("labels") or {}
        ready = _condition(node, "Ready")
        unschedulable = bool(spec.get("unschedulable"))
        cpu_m, memory, gpus = _resources(status.get("allocatable"))
        return KubeNode(
            name=meta["name"],
            ready=bool(ready and ready.get("status") == "True"),
            unschedulable=unschedulable,
            cordoned_by_us=unschedulable and has_our_cordon(meta),
            role=labels.get(self.settings.label_key),
            labels=tuple(sorted(labels.items())),
            taints=taints_of(spec),
            cpu_m=cpu_m,
            memory=memory,
            gpus=gpus,
            pods=tuple(sorted(pods, key=lambda p: p.key)),
            ready_reason=(ready.get("reason") or "") if ready else "",
            boot_id=(status.get("nodeInfo") or {}).get("bootID") or "",
            requested=requested,
            hold=(meta.get("annotations") or {}).get(HOLD_ANNOTATION),
        )

    # -- watch -----------------------------------------------------------------------

    def watch_unschedulable(self, on_pod: Callable[[str], None], stop: threading.Event, timeout_s: int = 60) -> None:
        """Call on_pod("namespace/name") for each pod the scheduler marks Unschedulable, as it
        happens, until `stop` is set. Blocks (run it in a thread); never raises.

        A list of the pods with no node (fieldSelector spec.nodeName=; each unschedulable one is
        reported, as a watch from scratch would report it ADDED), then a watch from the list's
        resourceVersion: ADDED and MODIFIED pods that show PodScheduled=False, reason
        Unschedulable are reported. A pod may be reported again (each time the scheduler rewrites
        its condition, and after a relist): the caller coalesces. It reports and decides nothing.

        - The server ends each watch after timeout_s: the next starts from the last
          resourceVersion seen (bookmarks keep it fresh on a quiet cluster), nothing is missed.
        - 410 Gone (that version is no longer kept): list again, then watch from the new one.
        - API server unreachable or failing (network, 401/403/5xx): retried after
          WATCH_BACKOFF_S, doubling up to WATCH_BACKOFF_MAX_S, from the last resourceVersion;
          one warning per outage (a single dropped connection that reconnects at once is none).
        """
        def report(pod: dict) -> None:
            if is_unschedulable(pod):
                on_pod(_pod_key(pod))

        self.watch_objects("watching pods with no node", self.core.list_pod_for_all_namespaces, report, stop,
                           timeout_s, field_selector="spec.nodeName=")

    def watch_objects(self, what: str, list_fn, on_object: Callable[[dict], None], stop: threading.Event,
                      timeout_s: int = 60, **list_kwargs) -> None:
        """The list-then-watch loop of watch_unschedulable for any list call (`list_fn`, with
        `list_kwargs`): on_object(obj) for each object listed, ADDED or MODIFIED, until `stop`
        is set. Blocks; never raises (retries, backoff and outage warnings as described there)."""
        # Events as the API sends them (plain dicts, as _list reads them): no model classes, whose
        # validation would fail the watch on every retry over one object it did not expect.
        w = kube_watch.Watch(return_type="object")
        done = threading.Event()

        def interrupt() -> None:  # Watch.stop() shuts the socket of a watch blocked in a read
            while not done.wait(0.2):
                if stop.is_set():
                    w.stop()

        threading.Thread(target=interrupt, name="watch-stop", daemon=True).start()

        def report(obj: dict) -> None:
            try:
                on_object(obj)
            except Exception:  # noqa: BLE001 - the caller's bug must not end the watch
                log.exception("watch: the handler of %s failed", _pod_key(obj) if obj.get("metadata") else obj)

        version: str | None = None  # None: list first
        failures = 0
        outage_since: float | None = None
        try:
            while not stop.is_set():
                try:
                    if version is None:
                        items, version = self._list_versioned(f"{what} (listing first)", list_fn, **list_kwargs)
                        for obj in items:
                            report(obj)
                        if version is None:  # not a Kubernetes API server's list
                            raise OperationError(f"Kubernetes API {self.host}: {what}: the list has no "
                                                 "resourceVersion")
                    else:
                        started = time.monotonic()
                        for event in w.stream(list_fn, resource_version=version, timeout_seconds=int(timeout_s),
                                              allow_watch_bookmarks=True,
                                              _request_timeout=(self._timeout, int(timeout_s) + WATCH_READ_SLACK_S),
                                              **list_kwargs):
                            if stop.is_set():
                                break
                            version = w.resource_version or version
                            if failures:
                                failures, outage_since = self._watch_back(what, outage_since), None
                            if isinstance(event, dict) and event.get("type") in ("ADDED", "MODIFIED"):
                                report(event.get("raw_object") or {})
                        version = w.resource_version or version
                        if time.monotonic() - started < 0.5:  # a proxy that ends watches at once: no busy loop
                            stop.wait(1.0)
                    if failures:  # a list, or a watch the server ended as asked
                        failures, outage_since = self._watch_back(what, outage_since), None
                except ApiException as exc:
                    if stop.is_set():
                        break
                    if exc.status == 410:
                        log.info("watch: resourceVersion %s is gone (410): listing again", version)
                        version = None
                        continue
                    failures, outage_since = self._watch_failed(failures, outage_since, self._api_error(what, exc),
                                                                stop)
                except Exception as exc:  # noqa: BLE001 - the network, a bad answer: retried, never raised
                    if stop.is_set():
                        break
                    failures, outage_since = self._watch_failed(failures, outage_since, self._watch_error(what, exc),
                                                                stop)
        finally:
            done.set()

    def _watch_error(self, what: str, exc: Exception) -> str:
        if isinstance(exc, OperationError):
            return str(exc)
        if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
            return f"Kubernetes API {self.host}: {what} failed: {_network_reason(exc, self._timeout)}"
        return f"Kubernetes API {self.host}: {what} failed: {exc.__class__.__name__}: {exc}"

    def _watch_failed(self, failures: int, outage_since: float | None, error, stop: threading.Event) \
            -> tuple[int, float | None]:
        """One more failed call: warn once per outage (from the second failure in a row: a
        connection that drops and reconnects at once is not an outage), then back off."""
        failures += 1
        log.debug("watch attempt failed (%d in a row): %s", failures, error)
        if failures == 2:
            outage_since = time.monotonic()
            log.warning("%s; retrying every %g s at most, reporting nothing until it answers again",
                        str(error).rstrip("."), WATCH_BACKOFF_MAX_S)
        stop.wait(min(WATCH_BACKOFF_MAX_S, WATCH_BACKOFF_S * 2 ** (failures - 1)))
        return failures, outage_since

    def _watch_back(self, what: str, outage_since: float | None) -> int:
        if outage_since is not None:
            log.info("Kubernetes API %s answers again: %s (outage %.0f s)", self.host, what,
                     time.monotonic() - outage_since)
        return 0

    # -- act -------------------------------------------------------------------------

    def cordon(self, name: str) -> bool:
        """Make the node unschedulable and mark the cordon as provisioner's.

        Returns True when the cordon is ours (set now, or already ours), False when the node was
        already cordoned by someone else: then it is left as it is and not claimed, so that
        provisioner will never lift it."""
        what = f"cordoning node {name}"
        for _ in range(_CONFLICT_RETRIES):
            node = self._read_node(name, what)
            if node.spec and node.spec.unschedulable:
                return has_our_cordon(node)
            body = {"metadata": {"resourceVersion": node.metadata.resource_version,
                                 "annotations": {CORDON_ANNOTATION: "true"}},
                    "spec": {"unschedulable": True}}
            try:
                result = self._call(what, self.core.patch_node, name, body, expect=(409,),
                                    _content_type="application/strategic-merge-patch+json")
            except ApiException:
                continue  # changed under us (perhaps cordoned by someone): look again
            if not (result.spec and result.spec.unschedulable and has_our_cordon(result)):
                raise OperationError(f"cordoning node {name}: the API accepted the patch but the node is not "
                                     "cordoned by provisioner; check admission webhooks on nodes")
            log.info("cordoned node %s", name)
            return True
        raise OperationError(f"{what}: the node kept changing under us ({_CONFLICT_RETRIES} conflicts); retry later")

    def uncordon(self, name: str) -> None:
        """Lift provisioner's cordon. Refuses (OperationError) when the cordon is someone else's."""
        what = f"uncordoning node {name}"
        for _ in range(_CONFLICT_RETRIES):
            node = self._read_node(name, what)
            cordoned = bool(node.spec and node.spec.unschedulable)
            if cordoned and not has_our_cordon(node):
                raise OperationError(f"node {name} was cordoned by someone else (no {CORDON_ANNOTATION} annotation): "
                                     f"provisioner leaves it cordoned; run `kubectl uncordon {name}` if it should "
                                     "take pods again")
            if not cordoned and not has_our_cordon(node):
                return
            # Ours (or a stale mark of ours on a node someone already uncordoned): clear both.
            body = {"metadata": {"resourceVersion": node.metadata.resource_version,
                                 "annotations": {CORDON_ANNOTATION: None}},
                    "spec": {"unschedulable": None}}
            try:
                result = self._call(what, self.core.patch_node, name, body, expect=(409,),
                                    _content_type="application/strategic-merge-patch+json")
            except ApiException:
                continue
            if (result.spec and result.spec.unschedulable) or has_our_cordon(result):
                raise OperationError(f"uncordoning node {name}: the API accepted the patch but the node is still "
                                     "cordoned; check admission webhooks on nodes")
            log.info("uncordoned node %s", name)
            return
        raise OperationError(f"{what}: the node kept changing under us ({_CONFLICT_RETRIES} conflicts); retry later")

    def label(self, name: str, role: str) -> None:
        """Set the role label (the paper's `kubectl label nodes NODE sched=ROLE --overwrite`)."""
        if role not in ROLES:
            raise UsageError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        key = self.settings.label_key
        what = f"labelling node {name} {key}={role}"
        try:
            result = self._call(what, self.core.patch_node, name, {"metadata": {"labels": {key: role}}},
                                expect=(404,), _content_type="application/merge-patch+json")
        except ApiException:
            raise _no_node(name, what) from None
        if (result.metadata.labels or {}).get(key) != role:
            raise OperationError(f"{what}: the API accepted the patch but the label reads "
                                 f"{(result.metadata.labels or {}).get(key)!r}; check admission webhooks on nodes")
        log.info("labelled node %s %s=%s", name, key, role)

    def mark_hold(self, name: str, reason: str | None) -> None:
        """Show an admin's maintenance hold on the Node (the HOLD_ANNOTATION, its reason as the
        value), or take the mark away (None). Only the annotation: the node stays schedulable."""
        what = f"marking node {name} {HOLD_ANNOTATION}" + ("" if reason else " off")
        try:
            body = {"metadata": {"annotations": {HOLD_ANNOTATION: reason}}}
            result = self._call(what, self.core.patch_node, name, body, expect=(404,),
                                _content_type="application/merge-patch+json")
        except ApiException:
            raise _no_node(name, what) from None
        if (result.metadata.annotations or {}).get(HOLD_ANNOTATION) != reason:
            raise OperationError(f"{what}: the API accepted the patch but the annotation differs; check admission "
                                 f"webhooks on nodes")
        log.info("%s", what)

    def evict_pods(self, name: str) -> EvictionResult:
        """Ask the Eviction API to evict every pod holding the node (see KubeNode.pods).

        The node must be cordoned first (else the pods could come straight back). A pod whose
        eviction a PodDisruptionBudget refuses (429) is reported in `blocked`; nothing is deleted
        directly. Returns what happened and which pods still hold the node afterwards."""
        what = f"evicting the pods of node {name}"
        node = self._read_node(name, what)
        if not (node.spec and node.spec.unschedulable):
            raise OperationError(f"node {name} is not cordoned: cordon it before evicting its pods")
        evicted: list[str] = []
        blocked: list[tuple[str, str]] = []
        for pod in self._pods_holding(name, what):
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                continue  # already on its way out
            key = _pod_key(pod)
            body = client.V1Eviction(api_version="policy/v1", kind="Eviction",
                                     metadata=client.V1ObjectMeta(name=meta["name"], namespace=meta["namespace"]))
            try:
                self._call(f"evicting pod {key} from node {name}" + (f" (after evicting {', '.join(evicted)})"
                                                                     if evicted else ""),
                           self.core.create_namespaced_pod_eviction, meta["name"], meta["namespace"],
                           body, expect=(404, 429))
            except ApiException as exc:
                if exc.status == 429:
                    blocked.append((key, _status_message(exc, causes=True)))
                    log.info("eviction of %s refused for now: %s", key, blocked[-1][1])
                continue  # 404: gone already
            evicted.append(key)
            log.info("evicted %s from node %s", key, name)
        remaining = tuple(sorted(_pod_key(p) for p in self._pods_holding(name, f"checking node {name} after evictions")))
        return EvictionResult(node=name, evicted=tuple(evicted), blocked=tuple(blocked), remaining=remaining)

    def _pods_holding(self, name: str, what: str) -> list[dict]:
        pods = self._list(what, self.core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={name}")
        return [p for p in pods if holds_node(p)]

    def delete_node(self, name: str) -> bool:
        """Delete the Node object of a node provisioner cordoned and emptied (its kubelet
        registers it again when it boots the k8s image). False when there is no such node."""
        what = f"deleting node {name}"
        # The delete carries the node's uid and resourceVersion as preconditions, so it never
        # removes a node that changed after the checks below. A status change (the node-lifecycle
        # controller tainting it, a heartbeat) also bumps the version: look again and re-check.
        for _ in range(_CONFLICT_RETRIES):
            try:
                node = self._call(what, self.core.read_node, name, expect=(404,))
            except ApiException:
                return False
            if not (node.spec and node.spec.unschedulable and has_our_cordon(node)):
                raise OperationError(f"not deleting node {name}: it is not cordoned by provisioner; "
                                     "cordon and evict first")
            holding = self._pods_holding(name, what)
            if holding:
                raise OperationError(f"not deleting node {name}: pods still run there "
                                     f"({', '.join(map(_pod_key, holding))}); evict them first")
            options = client.V1DeleteOptions(preconditions=client.V1Preconditions(
                uid=node.metadata.uid, resource_version=node.metadata.resource_version))
            try:
                self._call(what, self.core.delete_node, name, body=options, expect=(404, 409))
            except ApiException as exc:
                if exc.status == 409:
                    continue
                return False
            break
        else:
            raise OperationError(f"not deleting node {name}: it kept changing while we looked "
                                 f"({_CONFLICT_RETRIES} conflicts); retry on the next pass")
        log.info("deleted node %s", name)
        return True

    def sign_kubelet_csr(self, node: str, csr_pem: bytes, signer: str, usages: tuple[str, ...],
                         wait_s: float) -> bytes:
        """Create a CertificateSigningRequest for the node's kubelet (the PEM request given),
        approve it (the approval subresource: provisioner is the approver) and wait up to wait_s
        for the signer; the signed certificate (PEM). OperationError when refused (no right to
        create or approve: 403), denied, failed, or not signed in time."""
        certs = client.CertificatesV1Api(self._api_client)
        rights = ("grant the provisioner's account the CSR rights of examples/kubernetes/provisioner-rbac.yaml "
                  f"(create/get certificatesigningrequests, update certificatesigningrequests/approval, approve on "
                  f"signers {signer})")
        body = {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
                "metadata": {"generateName": f"provisioner-kubelet-{node}-",
                             "labels": {"app.kubernetes.io/managed-by": "provisioner"}},
                "spec": {"request": base64.b64encode(csr_pem).decode(), "signerName": signer, "usages": list(usages)}}

        def call(what: str, fn, *args, **kwargs) -> dict:
            try:
                resp = self._call(what, fn, *args, expect=(403,), _preload_content=False, **kwargs)
            except ApiException as exc:
                raise OperationError(f"Kubernetes API {self.host} forbids {what} (HTTP 403: {_status_message(exc)}): "
                                     f"{rights}") from None
            return json.loads(resp.data)

        made = call(f"creating a CertificateSigningRequest for node {node}'s kubelet",
                    certs.create_certificate_signing_request, body)
        name = made["metadata"]["name"]
        made.setdefault("status", {}).setdefault("conditions", []).append(
            {"type": "Approved", "status": "True", "reason": "ProvisionerApproved",
             "message": f"issued by provisioner before booting {node} into Kubernetes"})
        call(f"approving CertificateSigningRequest {name}", certs.replace_certificate_signing_request_approval,
             name, made)
        deadline = time.monotonic() + wait_s
        while True:
            csr = call(f"reading CertificateSigningRequest {name}", certs.read_certificate_signing_request, name)
            status = csr.get("status") or {}
            for cond in status.get("conditions") or []:
                if cond.get("type") in ("Denied", "Failed") and cond.get("status") == "True":
                    raise OperationError(f"CertificateSigningRequest {name} for node {node} is {cond['type']}: "
                                         f"{cond.get('reason', '')} {cond.get('message', '')}".rstrip())
            if status.get("certificate"):
                log.info("CertificateSigningRequest %s for node %s approved and signed", name, node)
                return base64.b64decode(status["certificate"])
            if time.monotonic() >= deadline:
                raise OperationError(f"CertificateSigningRequest {name} for node {node} was approved but not signed "
                                     f"within {wait_s:g} s: check that kube-controller-manager runs with "
                                     f"--cluster-signing-cert-file/--cluster-signing-key-file")
            time.sleep(0.2)


# --------------------------------------------------------------------------- helpers


def _no_node(name: str, what: str) -> OperationError:
    return OperationError(f"Kubernetes has no node {name} (while {what}): check the node name, or wait until its "
                          "kubelet registers")


def has_our_cordon(node) -> bool:
    """The cordon mark: on a V1Node (acting) or a node's metadata dict (observing)."""
    annotations = node.get("annotations") if isinstance(node, dict) else node.metadata.annotations
    return (annotations or {}).get(CORDON_ANNOTATION) == "true"


def _required_affinity(spec: dict) -> tuple:
    req = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
           .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    return tuple(
        tuple((e["key"], e["operator"], tuple(e.get("values") or ())) for e in term.get("matchExpressions") or [])
        for term in req.get("nodeSelectorTerms") or []
    )


def _status_message(exc: ApiException, causes: bool = False) -> str:
    """The message of the Status object the API server sent, else the HTTP reason."""
    try:
        status = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return exc.reason or "no details"
    if not isinstance(status, dict):
        return exc.reason or "no details"
    msg = status.get("message") or exc.reason or "no details"
    if causes:
        extra = [c.get("message") for c in (status.get("details") or {}).get("causes") or [] if c.get("message")]
        if extra:
            msg = f"{msg} ({'; '.join(extra)})"
    return msg


def _network_reason(exc: Exception, timeout: float) -> str:
    """What went wrong on the wire, and what to check."""
    inner = getattr(exc, "reason", None) or exc
    text = str(inner)
    up = "check that the API server is up and that kubernetes.kubeconfig points at it"
    # Checked in this order: urllib3's NewConnectionError is also a (connect) TimeoutError.
    if "refused" in text.lower():
        return f"connection refused; {up}"
    if isinstance(inner, urllib3.exceptions.SSLError) or "CERTIFICATE" in text:
        m = re.search(r"certificate verify failed[^(]*", text)
        detail = m.group(0).strip() if m else text[:120]
        return f"TLS error ({detail}); check the server's CA (certificate-authority-data) in the kubeconfig"
    if isinstance(inner, urllib3.exceptions.TimeoutError) or "timed out" in text:
        return f"no answer within {timeout} s; {up}"
    return f"{text[:200]}; {up}"
