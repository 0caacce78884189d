"""What runs on nodes before an admin's power action: jobs from SLURM, pods from Kubernetes.

`observe_work` asks the adapters (I/O); `refusals` decides (pure): a node that runs jobs or
pods, or whose work cannot be read, is refused unless the admin forces it. The balancer never
comes here: it drains and evicts first (provisioner.reconcile)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from provisioner.errors import OperationError
from provisioner.model import Node, Site

# The actions that stop what runs on a node (boot resets a node that is on).
DISRUPTIVE = ("off", "soft", "reset", "cycle", "boot")


@dataclass
class Work:
    """Per node: the jobs and pods that run there; `unknown`: a cluster that could not be read."""

    jobs: dict[str, list[str]] = field(default_factory=dict)
    pods: dict[str, list[str]] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)  # "slurm"/"kubernetes" -> why


def refusals(nodes: Iterable[Node], work: Work) -> dict[str, str]:
    """{node: why} for the nodes a power action would hurt. A cluster that could not be read
    refuses every node it serves: unseen work is not absent work."""
    out = {}
    for node in nodes:
        why = []
        if node.pool in ("slurm", "shared"):
            if "slurm" in work.unknown:
                why.append(f"may run jobs (SLURM cannot be read: {work.unknown['slurm']})")
            elif work.jobs.get(node.name):
                why.append(f"runs job(s) {', '.join(work.jobs[node.name])}")
        if node.pool in ("k8s", "shared"):
            if "kubernetes" in work.unknown:
                why.append(f"may run pods (Kubernetes cannot be read: {work.unknown['kubernetes']})")
            elif work.pods.get(node.name):
                why.append(f"runs pod(s) {', '.join(work.pods[node.name])}")
        if why:
            out[node.name] = " and ".join(why)
    return out


def observe_work(site: Site, nodes: Iterable[Node], slurm=None, kube=None) -> Work:
    """Ask SLURM about the nodes it serves and Kubernetes about the ones it serves."""
    nodes = list(nodes)
    work = Work()
    in_slurm = [n.name for n in nodes if n.pool in ("slurm", "shared")]
    in_kube = [n.name for n in nodes if n.pool in ("k8s", "shared")]
    if in_slurm:
        try:
            if slurm is None:
                from provisioner.clusters.slurm import SlurmAdapter

                slurm = SlurmAdapter(site.slurm)
            work.jobs = slurm.running_jobs(in_slurm)
        except OperationError as exc:
            work.unknown["slurm"] = str(exc)
    if in_kube:
        try:
            if kube is None:
                from provisioner.clusters.kubernetes import KubernetesAdapter

                kube = KubernetesAdapter(site.kubernetes)
            work.pods = {name: [p.key for p in node.pods] for name, node in kube.nodes(in_kube).items() if node.pods}
        except OperationError as exc:
            work.unknown["kubernetes"] = str(exc)
    return work


def describe(refused: Mapping[str, str]) -> str:
    return "; ".join(f"{name} {why}" for name, why in refused.items())
