"""Kubernetes taints and tolerations: which of a node's taints keep a pod off it. PURE.

The scheduler's rule (its TaintToleration filter, core/v1 Toleration.ToleratesTaint): a pod may
go on a node only when it tolerates every NoSchedule and NoExecute taint of the node
(PreferNoSchedule only steers). A toleration tolerates a taint when its effect is empty or the
same, its key is empty or the same, and its operator is Exists, or Equal (or empty) with the
same value; an empty key with Exists tolerates everything.

The node lifecycle controller's taints (node.kubernetes.io/: not-ready, unreachable,
unschedulable, ...) say what a node is now, not what it is for: they come and go with a boot or
a cordon (provisioner's own, during a switch), so they never decide whether a shared node can
serve a pod.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

BLOCKING = frozenset({"NoSchedule", "NoExecute"})
LIFECYCLE_PREFIX = "node.kubernetes.io/"


@dataclass(frozen=True)
class Toleration:
    key: str | None
    operator: str  # Equal or Exists
    value: str | None
    effect: str | None  # None: every effect


@dataclass(frozen=True)
class Taint:
    key: str
    value: str | None
    effect: str  # NoSchedule, PreferNoSchedule, NoExecute


def tolerates(toleration: Toleration, taint: Taint) -> bool:
    """Does this toleration tolerate this taint (the API's own rule)?"""
    if toleration.effect and toleration.effect != taint.effect:
        return False
    if toleration.key and toleration.key != taint.key:
        return False
    if toleration.operator == "Exists":
        return True
    if toleration.operator in ("Equal", "", None):
        return (toleration.value or "") == (taint.value or "")
    return False  # an operator this code does not know: not tolerated (the pod is not counted as served)


def untolerated(taints: Iterable[Taint], tolerations: Iterable[Toleration]) -> tuple[Taint, ...]:
    """The node's taints that keep the pod off it: NoSchedule or NoExecute, not the lifecycle
    controller's, and tolerated by none of the pod's tolerations."""
    tolerations = tuple(tolerations)
    return tuple(t for t in taints if t.effect in BLOCKING and not t.key.startswith(LIFECYCLE_PREFIX)
                 and not any(tolerates(tol, t) for tol in tolerations))


def tolerations_of(pod_spec: dict) -> tuple[Toleration, ...]:
    """A pod spec's tolerations, as the API sends them (an empty operator means Equal)."""
    return tuple(Toleration(t.get("key"), t.get("operator") or "Equal", t.get("value"), t.get("effect"))
                 for t in pod_spec.get("tolerations") or [])


def taints_of(node_spec: dict) -> tuple[Taint, ...]:
    """A Node spec's taints, as the API sends them."""
    return tuple(Taint(t["key"], t.get("value"), t["effect"]) for t in node_spec.get("taints") or [])
