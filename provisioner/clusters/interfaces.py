"""What the reconciler needs from each cluster and from power control, as Protocols.

The real adapters (clusters.slurm.SlurmAdapter, clusters.kubernetes.KubernetesAdapter,
powering.power_nodes) implement them; so do the small in-process fakes of the fast state-machine
tests (tests/fakes.py). Observations are the adapters' plain frozen dataclasses."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from provisioner.clusters.kubernetes import EvictionResult, KubeNode, PendingPod
    from provisioner.clusters.slurm import SlurmNode, SlurmSnapshot
    from provisioner.model import Node, Site
    from provisioner.power.dispatch import PowerResult


class SlurmClient(Protocol):
    def observe(self) -> "SlurmSnapshot": ...

    def nodes(self, names: str | Iterable[str] | None = None) -> dict[str, "SlurmNode"]: ...

    def drain(self, nodes: str | Iterable[str], reason: str) -> dict[str, "SlurmNode"]: ...

    def down(self, nodes: str | Iterable[str], reason: str = ...) -> dict[str, "SlurmNode"]: ...

    def resume(self, nodes: str | Iterable[str]) -> dict[str, "SlurmNode"]: ...

    def power_down(self, nodes: str | Iterable[str]) -> dict[str, "SlurmNode"]: ...

    def power_up(self, nodes: str | Iterable[str]) -> dict[str, "SlurmNode"]: ...


class KubeClient(Protocol):
    def pending_pods(self) -> list["PendingPod"]: ...

    def nodes(self, names: Iterable[str] | None = None) -> dict[str, "KubeNode"]: ...

    def node(self, name: str) -> "KubeNode | None": ...

    def cordon(self, name: str) -> bool: ...

    def uncordon(self, name: str) -> None: ...

    def label(self, name: str, role: str) -> None: ...

    def mark_hold(self, name: str, reason: str | None) -> None: ...

    def evict_pods(self, name: str) -> "EvictionResult": ...

    def close(self) -> None: ...


class PowerFn(Protocol):
    """powering.power_nodes: one result per node, never raises for a node's failure."""

    def __call__(self, site: "Site", nodes: Sequence["Node"], action: str, *, netboot: bool = False,
                 **kwargs: Any) -> list["PowerResult"]: ...
