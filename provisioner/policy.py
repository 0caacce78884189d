"""The decision: which shared node should go to which side, and why. A PURE function.

`decide(snapshot)` reads plain data (both clusters' pending work, every shared node's state in
both clusters and in the store, the policy knobs, the time) and returns moves with human reasons.
No I/O, no clock, no randomness: the reconciler, the unit tests, the benchmarks and the trace
simulator all call it with data, and the same data always gives the same moves.

The paper's loop, plus what it lacks:
- only demand a shared node could actually serve counts (partition, CPUs, memory, GPUs,
  node selectors), and demand already covered (idle shared nodes on that side, nodes switching
  to it) is subtracted;
- pinned, failed, switching and busy nodes never move; a cooldown after each switch;
- a minimum number of shared nodes per side;
- demand must persist `demand_persist_s` before it moves anything (no flapping);
- at most `max_in_flight` switches at once;
- when both sides want nodes, the free switch slots are shared by a stated rule
  (`proportional` to the nodes each side wants, or `slurm-first` / `k8s-first`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from provisioner.model import Policy
from provisioner.nodeset import fold
from provisioner.states import FAILED, K8S, SLURM, STEADY

OTHER = {SLURM: K8S, K8S: SLURM}


# --------------------------------------------------------------------------- the snapshot


@dataclass(frozen=True)
class PendingJob:
    job_id: str
    reason: str
    partitions: tuple[str, ...]  # a job may be submitted to several partitions
    num_nodes: int = 1
    cpus_per_node: int = 1
    gpus_per_node: int = 0


@dataclass(frozen=True)
class PendingPod:
    namespace: str
    name: str
    cpu_m: int = 0  # millicores requested
    memory: int = 0  # bytes
    gpus: int = 0
    node_selector: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SharedNode:
    name: str
    role: str  # the side it is on or switching to (the store's desired role)
    phase: str = STEADY
    pinned: bool = False
    busy: bool = False  # runs jobs (on the slurm side) or non-DaemonSet pods (on the k8s side)
    available: bool = True  # healthy and usable on its side (responding, Ready, not held by someone else)
    last_switch_at: float | None = None
    cpus: int = 1
    memory: int = 0  # bytes; 0 = unknown
    gpus: int = 0
    partitions: tuple[str, ...] = ()
    k8s_labels: tuple[tuple[str, str], ...] = ()  # the labels it carries as a k8s node (sched=k8s included)
    held_by: str | None = None  # why it is unavailable, for the notes


@dataclass(frozen=True)
class Snapshot:
    now: float
    policy: Policy
    nodes: tuple[SharedNode, ...]
    jobs: tuple[PendingJob, ...] = ()
    pods: tuple[PendingPod, ...] = ()
    # When each side's servable demand was first seen (and has been seen ever since), from the
    # store; None: not seen before this pass.
    demand_since: dict[str, float | None] = field(default_factory=dict)
    slurm_reasons: tuple[str, ...] = ("Resources", "Priority")


@dataclass(frozen=True)
class Move:
    node: str
    to_role: str
    reason: str


@dataclass(frozen=True)
class Decision:
    moves: tuple[Move, ...]
    demand: dict[str, int]  # nodes each side could use now (servable demand, in nodes)
    notes: tuple[str, ...]  # why something did not happen, for `balance --dry-run`


# --------------------------------------------------------------------------- demand


def node_serves_job(node: SharedNode, job: PendingJob) -> bool:
    """Could this node run the job (partition, CPUs, GPUs)? Also used by the decide benchmark."""
    if job.partitions and not set(job.partitions) & set(node.partitions):
        return False
    return job.cpus_per_node <= node.cpus and job.gpus_per_node <= node.gpus


def node_serves_pod(node: SharedNode, pod: PendingPod) -> bool:
    """Could this node run the pod (node selector, CPUs, GPUs, memory)?"""
    labels = dict(node.k8s_labels)
    if any(labels.get(k) != v for k, v in pod.node_selector):
        return False
    if pod.cpu_m > node.cpus * 1000 or pod.gpus > node.gpus:
        return False
    return not (node.memory and pod.memory > node.memory)


def _shape(node: SharedNode) -> tuple:
    return (node.cpus, node.memory, node.gpus, node.partitions, node.k8s_labels)


@dataclass
class _Demand:
    items: int = 0  # jobs or pods a shared node could serve
    nodes_wanted: int = 0  # how many shared nodes they would fill
    what: Counter = field(default_factory=Counter)  # (reason/partition) -> count, for the reason text
    shapes: set = field(default_factory=set)  # node shapes that serve at least one item


def slurm_demand(jobs: Iterable[PendingJob], shapes: dict[tuple, SharedNode], reasons: tuple[str, ...]) -> _Demand:
    d = _Demand()
    cache: dict[tuple, frozenset] = {}
    for job in jobs:
        if job.reason not in reasons:
            continue
        key = (job.partitions, job.cpus_per_node, job.gpus_per_node)
        serving = cache.get(key)
        if serving is None:
            serving = cache[key] = frozenset(s for s, n in shapes.items() if node_serves_job(n, job))
        if not serving:
            continue
        d.items += 1
        d.nodes_wanted += max(1, job.num_nodes)
        d.what[(job.reason, ",".join(job.partitions) or "any")] += 1
        d.shapes |= serving
    return d


def k8s_demand(pods: Iterable[PendingPod], shapes: dict[tuple, SharedNode]) -> _Demand:
    d = _Demand()
    cache: dict[tuple, frozenset] = {}
    cpu_m = 0
    for pod in pods:
        key = (pod.cpu_m, pod.memory, pod.gpus, pod.node_selector)
        serving = cache.get(key)
        if serving is None:
            serving = cache[key] = frozenset(s for s, n in shapes.items() if node_serves_pod(n, pod))
        if not serving:
            continue
        d.items += 1
        cpu_m += max(pod.cpu_m, 1)
        d.what[("Unschedulable", pod.namespace)] += 1
        d.shapes |= serving
    if d.items:
        # Pods pack: the nodes wanted is their CPU total over a typical serving node's CPUs.
        per_node = min(shapes[s].cpus for s in d.shapes) * 1000
        d.nodes_wanted = max(1, math.ceil(cpu_m / per_node))
    return d


def _describe(side: str, d: _Demand) -> str:
    parts = []
    for (reason, where), count in d.what.most_common(3):
        noun = ("job" if side == SLURM else "pod") + ("s" if count != 1 else "")
        place = "partition" if side == SLURM else "namespace"
        parts.append(f"{count} {noun} Pending ({reason}) in {place} {where}")
    more = len(d.what) - 3
    if more > 0:
        parts.append(f"and {more} more group(s)")
    return ", ".join(parts)


# --------------------------------------------------------------------------- the decision


def _demands(snap: Snapshot) -> dict[str, _Demand]:
    shapes: dict[tuple, SharedNode] = {}
    for n in snap.nodes:
        shapes.setdefault(_shape(n), n)
    return {
        SLURM: slurm_demand(snap.jobs, shapes, snap.slurm_reasons),
        K8S: k8s_demand(snap.pods, shapes),
    }


def demand(snap: Snapshot) -> dict[str, int]:
    """Nodes each side's servable pending work would fill (before subtracting what is covered).
    The reconciler records when this became non-zero, for the persistence rule."""
    return {side: d.nodes_wanted for side, d in _demands(snap).items()}


def decide(snap: Snapshot) -> Decision:
    p = snap.policy
    notes: list[str] = []
    demand = _demands(snap)

    switching = [n for n in snap.nodes if n.phase not in (STEADY, FAILED)]
    on_side = Counter(n.role for n in snap.nodes if n.phase != FAILED)  # includes nodes switching to it
    # Demand already covered: idle usable shared nodes on that side, and nodes switching to it.
    covered = Counter(n.role for n in switching)
    for n in snap.nodes:
        if n.phase == STEADY and n.available and not n.busy:
            covered[n.role] += 1

    wanted = {side: max(0, demand[side].nodes_wanted - covered[side]) for side in (SLURM, K8S)}
    for side in (SLURM, K8S):
        if demand[side].items and not wanted[side]:
            notes.append(f"{side}: {_describe(side, demand[side])}; already covered by "
                         f"{covered[side]} idle or incoming shared node(s)")

    # Persistence: demand must have been seen continuously for demand_persist_s.
    for side in (SLURM, K8S):
        if not wanted[side]:
            continue
        if p.demand_persist_s <= 0:  # persistence switched off: demand counts on first sight
            continue
        since = snap.demand_since.get(side)
        age = None if since is None else snap.now - since
        if age is None or age < p.demand_persist_s:
            notes.append(f"{side}: demand seen for {0 if age is None else int(age)} s, "
                         f"waiting for {p.demand_persist_s} s before moving a node")
            wanted[side] = 0

    slots = p.max_in_flight - len(switching)
    if slots <= 0 and any(wanted.values()):
        notes.append(f"{len(switching)} switch(es) in flight, max_in_flight is {p.max_in_flight}")
        return Decision((), {s: demand[s].nodes_wanted for s in demand}, tuple(notes))

    # Candidates on each side that could go to the other.
    candidates: dict[str, list[SharedNode]] = {SLURM: [], K8S: []}
    held: dict[tuple[str, str], list[str]] = {}
    for n in sorted(snap.nodes, key=lambda n: (n.last_switch_at or 0.0, n.name)):
        to = OTHER.get(n.role)
        if to is None or not wanted.get(to):
            continue
        why_not = None
        if n.phase != STEADY:
            why_not = "failed" if n.phase == FAILED else f"switching ({n.phase})"
        elif n.pinned:
            why_not = "pinned by an admin"
        elif n.busy:
            why_not = f"busy in {n.role}"
        elif not n.available:
            why_not = n.held_by or f"not available in {n.role}"
        elif n.last_switch_at is not None and snap.now - n.last_switch_at < p.cooldown_s:
            why_not = f"switched less than cooldown_s={p.cooldown_s} s ago"
        elif _shape(n) not in demand[to].shapes:
            why_not = f"cannot serve the pending {to} work"
        if why_not:
            held.setdefault((to, why_not), []).append(n.name)
            continue
        candidates[n.role].append(n)
    for (to, why_not), names in held.items():  # one line per reason, not one per node
        notes.append(f"{fold(names)}: not moved to {to}: {why_not}")

    # Share the free slots between the sides that want nodes.
    want = {to: min(wanted[to], len(candidates[OTHER[to]])) for to in (SLURM, K8S)}
    for to in (SLURM, K8S):
        if wanted[to] and not candidates[OTHER[to]]:
            notes.append(f"{to}: wants {wanted[to]} node(s) but no shared node on the {OTHER[to]} side is free to move")
    grant = _share(slots, want, p.share_rule)

    moves: list[Move] = []
    for to in (SLURM, K8S):
        frm = OTHER[to]
        left_on_frm = on_side[frm]
        for n in candidates[frm][: grant[to]]:
            if left_on_frm - 1 < p.min_nodes.get(frm, 0):
                notes.append(f"{n.name}: not moved to {to}: {frm} keeps its minimum of {p.min_nodes.get(frm, 0)} shared node(s)")
                break
            left_on_frm -= 1
            moves.append(Move(n.name, to, f"{_describe(to, demand[to])}; {n.name} idle in {frm}"))
    return Decision(tuple(moves), {s: demand[s].nodes_wanted for s in demand}, tuple(notes))


def _share(slots: int, want: dict[str, int], rule: str) -> dict[str, int]:
    """Split `slots` switch slots between the sides by the policy's rule."""
    total = sum(want.values())
    if total <= slots:
        return dict(want)
    if rule in ("slurm-first", "k8s-first"):
        first = SLURM if rule == "slurm-first" else K8S
        a = min(want[first], slots)
        return {first: a, OTHER[first]: min(want[OTHER[first]], slots - a)}
    # proportional, largest remainder; a side that wants something gets at least one slot
    # whenever there are slots for both.
    exact = {s: slots * w / total for s, w in want.items()}
    grant = {s: min(want[s], int(exact[s])) for s in want}
    if slots >= 2:
        for s in want:
            if want[s] and not grant[s]:
                grant[s] = 1
    while sum(grant.values()) > slots:
        s = max(grant, key=lambda k: grant[k])
        grant[s] -= 1
    for s in sorted(want, key=lambda k: exact[k] - int(exact[k]), reverse=True):
        if sum(grant.values()) < slots and grant[s] < want[s]:
            grant[s] += 1
    return grant
