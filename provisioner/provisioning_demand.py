"""A ProvisioningRequest (autoscaling.x-k8s.io/v1) and its PodTemplates, read as demand. PURE.

Kueue (or anyone) asks for capacity "all or nothing" by creating a ProvisioningRequest whose pod
sets name PodTemplates and counts; provisioner serves the requests of its own class
(CLASS_NAME). This module turns the objects, as the API sends them (plain dicts), into one
`Request`: its pod sets with what each pod needs (CPUs, memory, GPUs, node selector,
tolerations), and what provisioner recorded on it before (the nodes it booked, when it was
Provisioned). No I/O: the adapter (clusters.provisioning_requests) reads and writes the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from provisioner.clusters.kubernetes import pod_requests
from provisioner.taints import Toleration, tolerations_of

CLASS_NAME = "node-switch.provisioner.io"  # spec.provisioningClassName provisioner serves
# The nodes booked for a request carry this label, value = the request's label value (`Request.label`);
# the same key and value are given in status.provisioningClassDetails, which Kueue's
# ProvisioningRequestConfig (podSetUpdates.nodeSelector) turns into the pods' node selector.
NODE_LABEL = "provisioner.io/provisioning-request"
DETAIL_NODES = "provisioner.io/nodes"  # status.provisioningClassDetails: the booked nodes (a hostlist)

# The condition types the API defines (cluster-autoscaler's provreq API).
ACCEPTED, PROVISIONED, FAILED, BOOKING_EXPIRED, CAPACITY_REVOKED = (
    "Accepted", "Provisioned", "Failed", "BookingExpired", "CapacityRevoked")


class BadRequest(ValueError):
    """The request can never be served as written; `reason` is a condition reason (CamelCase)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PodSet:
    count: int
    cpu_m: int
    memory: int  # bytes
    gpus: int
    node_selector: tuple[tuple[str, str], ...]
    tolerations: tuple[Toleration, ...]
    template: str  # the PodTemplate's name, for messages


@dataclass(frozen=True)
class Request:
    namespace: str
    name: str
    uid: str
    pod_sets: tuple[PodSet, ...]
    conditions: dict[str, dict]  # type -> the condition as the API sends it
    booked: tuple[str, ...] = ()  # the nodes provisioner booked for it (from its status)
    provisioned_at: datetime | None = None  # when Provisioned became True

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def label(self) -> str:
        """The node label value for this request: a label value has at most 63 characters."""
        return label_value(self.namespace, self.name, self.uid)

    def status(self, kind: str) -> str | None:
        return (self.conditions.get(kind) or {}).get("status")

    @property
    def finished(self) -> bool:
        """Provisioner has nothing more to do for it (failed, expired or revoked)."""
        return any(self.status(k) == "True" for k in (FAILED, BOOKING_EXPIRED, CAPACITY_REVOKED))


def label_value(namespace: str, name: str, uid: str) -> str:
    value = f"{namespace}.{name}"
    if len(value) > 63:
        value = f"{value[:50].rstrip('.-_')}.{uid.replace('-', '')[:12]}"
    return value


def is_ours(pr: dict) -> bool:
    return (pr.get("spec") or {}).get("provisioningClassName") == CLASS_NAME


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def parse(pr: dict, templates: dict[str, dict]) -> Request:
    """The request, with the PodTemplates of its namespace by name. Raises BadRequest when it can
    never be served as written (a missing PodTemplate, a quantity that does not parse)."""
    meta, spec, status = pr.get("metadata") or {}, pr.get("spec") or {}, pr.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("type")}
    details = status.get("provisioningClassDetails") or {}
    booked = tuple(n for n in (details.get(DETAIL_NODES) or "").split(",") if n)
    provisioned = conditions.get(PROVISIONED) or {}
    sets = []
    for i, ps in enumerate(spec.get("podSets") or []):
        ref = ((ps or {}).get("podTemplateRef") or {}).get("name")
        if not ref:
            raise BadRequest("InvalidPodSet", f"pod set {i} names no PodTemplate (podTemplateRef.name)")
        tpl = templates.get(ref)
        if tpl is None:
            raise BadRequest("PodTemplateNotFound", f"PodTemplate {meta.get('namespace')}/{ref} does not exist")
        count = ps.get("count")
        if not isinstance(count, int) or count < 1:
            raise BadRequest("InvalidPodSet", f"pod set {i} ({ref}): count {count!r} is not a positive integer")
        pod = ((tpl.get("template") or {}).get("spec")) or {}
        try:
            cpu_m, memory, gpus = pod_requests(pod)
        except (ValueError, TypeError, ArithmeticError) as exc:
            raise BadRequest("InvalidQuantity", f"PodTemplate {meta.get('namespace')}/{ref}: a resource quantity "
                                                f"does not parse ({exc})") from None
        sets.append(PodSet(
            count=count, cpu_m=cpu_m, memory=memory, gpus=gpus,
            node_selector=tuple(sorted((pod.get("nodeSelector") or {}).items())),
            tolerations=tolerations_of(pod),
            template=ref,
        ))
    if not sets:
        raise BadRequest("InvalidPodSet", "the request has no pod sets")
    return Request(
        namespace=meta.get("namespace") or "", name=meta.get("name") or "", uid=meta.get("uid") or "",
        pod_sets=tuple(sets), conditions=conditions, booked=booked,
        provisioned_at=_time(provisioned.get("lastTransitionTime")) if provisioned.get("status") == "True" else None,
    )


def condition(kind: str, status: bool, reason: str, message: str, now: datetime, generation: Any = None) -> dict:
    """A condition as the API wants it (metav1.Condition)."""
    c = {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message[:32768],
         "lastTransitionTime": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
    if generation is not None:
        c["observedGeneration"] = generation
    return c
