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

Lending and reclaim (Kueue's cohorts, for whole nodes moved between two clusters):
- every shared node has a `home` side (default: the static split). A side borrows the other's
  idle home nodes, but only those the lender's own waiting work does not need (a side keeps the
  idle nodes its pending work would fill: nodes gathered for a wide head job stay, as EASY
  backfill's reservation keeps them) and at most `policy.lending_limit[lender]` at once;
- when a side's demand persists and its home nodes are lent to the other side, they come home:
  an idle one moves at once (no cooldown: the home side's claim wins); a busy one is a *reclaim*
  (Move.reclaim): drained or cordoned at once, its work gets `policy.reclaim_grace_s[lender]`,
  then pods are evicted through the Eviction API (PodDisruptionBudgets honoured) and jobs that
  can be requeued are requeued when that loses less work than the wait it saves the home side
  (requeue_pays; the others run to their end, the node drained). A node whose eviction a
  PodDisruptionBudget refused stays where it is for cooldown_s (Decision.held says why);
- idle nodes are preferred (borrowing an idle node costs no work), then reclaims;
- room on busy Kubernetes-side nodes (SharedNode.room_*) covers pending pods that fit there, so
  no node moves for a pod the scheduler can still place where it is.

Asks: a scheduler may name the node it wants (slurmctld's ResumeProgram: "resume sn03") or
let one go (SuspendProgram: "suspend sn03"). The same rules answer them, except that an ask
needs no persistence (the scheduler has decided) and goes before polled demand:
- resume: granted (a move to slurm, or a boot when the node is in SLURM already), refused with
  the reason (pinned, busy, failed, cooldown, a minimum), or deferred while the switch slots
  are full (it stays open; slurmctld's ResumeTimeout bounds the wait);
- suspend: the node goes to Kubernetes when Kubernetes has work for it, else it is powered off
  (what SLURM expects of a suspended node); answered "done" either way.

Gang asks: Kubernetes asks for N nodes of a shape at once (a ProvisioningRequest, e.g. Kueue's).
All or nothing: nodes move for it only when every node it needs can come now (idle on the
Kubernetes side, or idle in SLURM and free to move); the nodes it books are kept from SLURM
until the booking ends; a gang larger than the shared pool, or one no shared node can serve,
fails with the reason.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from provisioner.model import Policy
from provisioner.nodeset import fold
from provisioner.states import EVICT, FAILED, K8S, REQUEUE, SLURM, STEADY, WAIT
from provisioner.taints import Taint, Toleration, untolerated

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
    tolerations: tuple[Toleration, ...] = ()


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
    k8s_taints: tuple[Taint, ...] = ()  # the taints it carries as a k8s node (its Node object's)
    held_by: str | None = None  # why it is unavailable, for the notes
    home: str | None = None  # the side it belongs to (None: no home; it is never reclaimed)
    # Room left on it as a busy Kubernetes node (allocatable minus the requests of its pods).
    room_cpu_m: int = 0
    room_memory: int = 0
    room_gpus: int = 0
    movable: bool = True  # its work can be moved: pods evictable / jobs requeueable, as far as known
    # What a reclaim would cost now: the node-seconds its work has run (a requeued job loses all
    # of its nodes' time, a wide job's too; an evicted pod its own), and when that work ends by
    # its time limit (None: unknown). Reclaims take the cheapest nodes first.
    work_cost: float = 0.0
    work_ends_at: float | None = None
    work_ids: tuple[str, ...] = ()  # its jobs' ids, for the reasons
    # The last reclaim's eviction a PodDisruptionBudget refused: when, and its message.
    evict_refused_at: float | None = None
    evict_refused: str | None = None
    # Switching as a reclaim: when its grace ends (its work is moved then). None: not a reclaim.
    reclaim_deadline: float | None = None


RESUME, SUSPEND = "resume", "suspend"  # the kinds of ask the policy answers


@dataclass(frozen=True)
class Ask:
    id: int
    node: str
    kind: str  # RESUME (the asker wants the node in SLURM) or SUSPEND (SLURM lets it go)
    source: str  # who asked, e.g. "slurmctld"
    reason: str  # the asker's own words, e.g. "JobId=12 (ResumeProgram)"


@dataclass(frozen=True)
class Answer:
    ask: int
    node: str
    outcome: str  # granted | refused | deferred | done
    message: str


@dataclass(frozen=True)
class GangAsk:
    id: str  # e.g. "namespace/name" of the ProvisioningRequest
    pod_sets: tuple[tuple[PendingPod, int], ...]  # (what one pod needs, how many pods)
    booked: tuple[str, ...] = ()  # nodes booked for it in an earlier pass
    provisioned_at: float | None = None  # when it was answered "provisioned" (the booking's start)
    booking_s: float = 600.0  # how long provisioned nodes stay booked for it
    source: str = ""  # who asks, in words (default: the id)


@dataclass(frozen=True)
class GangAnswer:
    ask: str
    outcome: str  # provisioned | switching | waiting | failed | expired
    nodes: tuple[str, ...]  # the nodes booked for it (provisioned, switching)
    message: str


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
    asks: tuple[Ask, ...] = ()
    gangs: tuple[GangAsk, ...] = ()




@dataclass(frozen=True)
class Move:
    node: str
    to_role: str
    reason: str
    # A reclaim: the node is busy on the other side and goes home. The reconciler drains (SLURM)
    # or cordons (Kubernetes) it at once, and at `deadline` (now + grace_s) evicts its pods
    # (work=EVICT, through the Eviction API) or requeues its requeueable jobs (work=REQUEUE; the
    # others run to their end), then switches it as any move. work=WAIT (requeue_pays said no):
    # its jobs run to their end, `deadline` is their time limit (a release applies until then).
    reclaim: bool = False
    from_role: str = ""
    grace_s: float = 0.0
    deadline: float | None = None
    work: str = ""


@dataclass(frozen=True)
class Decision:
    moves: tuple[Move, ...]
    demand: dict[str, int]  # nodes each side could use now (servable demand, in nodes)
    notes: tuple[str, ...]  # why something did not happen, for `balance --dry-run`
    answers: tuple[Answer, ...] = ()  # one per ask (deferred ones stay open)
    boots: tuple[Move, ...] = ()  # power on into the role they have (asked for, already there)
    power_off: tuple[Move, ...] = ()  # released by SLURM and wanted by nobody: off, as SLURM expects
    # For SLURM power saving: each steady Kubernetes-side node -> None (SLURM may ask for it:
    # powered down and free) or why SLURM should not (held: drained with that reason).
    slurm_hold: dict[str, str | None] = field(default_factory=dict)
    # Home nodes a reclaim wanted but could not take now: node -> why (a PodDisruptionBudget's
    # refusal, non-requeueable work, pinned): for `nodes`, the dry run and a metric.
    held: dict[str, str] = field(default_factory=dict)
    lent: dict[str, int] = field(default_factory=dict)  # side -> its home nodes on (or going to) the other side
    gangs: tuple[GangAnswer, ...] = ()  # one per gang ask
    # Reclaims still in their grace that their home side no longer needs: node -> why. The
    # reconciler rolls them back (the work was never touched).
    release: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- demand


def node_serves_job(node: SharedNode, job: PendingJob) -> bool:
    """Could this node run the job (partition, CPUs, GPUs)? Also used by the decide benchmark."""
    if job.partitions and not set(job.partitions) & set(node.partitions):
        return False
    return job.cpus_per_node <= node.cpus and job.gpus_per_node <= node.gpus


def node_serves_pod(node: SharedNode, pod: PendingPod) -> bool:
    """Could this node run the pod (node selector, taints, CPUs, GPUs, memory)?"""
    labels = dict(node.k8s_labels)
    if any(labels.get(k) != v for k, v in pod.node_selector) or untolerated(node.k8s_taints, pod.tolerations):
        return False
    if pod.cpu_m > node.cpus * 1000 or pod.gpus > node.gpus:
        return False
    return not (node.memory and pod.memory > node.memory)


def _shape(node: SharedNode) -> tuple:
    return (node.cpus, node.memory, node.gpus, node.partitions, node.k8s_labels, node.k8s_taints)


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
        key = (pod.cpu_m, pod.memory, pod.gpus, pod.node_selector, pod.tolerations)
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


def fit_in_room(pods: Iterable[PendingPod], nodes: Iterable[SharedNode]) -> tuple[list[PendingPod], int]:
    """Pending pods that do not fit in the room left on busy Kubernetes-side shared nodes, and how
    many do. Each pod tries the node with the most CPU room (worst fit, the scheduler's
    LeastAllocated spirit); a pod that does not fit there counts as demand, so the answer errs
    towards moving a node, never towards starving a pod."""
    rooms = [[-n.room_cpu_m, i, n.room_memory, n.room_gpus, n] for i, n in enumerate(nodes)
             if n.role == K8S and n.phase == STEADY and n.available and n.busy and n.room_cpu_m > 0]
    pods = list(pods)
    if not rooms:
        return pods, 0
    heapq.heapify(rooms)
    left: list[PendingPod] = []
    for k, pod in enumerate(pods):
        if not rooms:
            left.extend(pods[k:])
            break
        top = rooms[0]
        node = top[4]
        if (pod.cpu_m <= -top[0] and pod.gpus <= top[3] and (not node.memory or pod.memory <= top[2])
                and node_serves_pod(node, pod)):
            top[0] += pod.cpu_m
            top[2] -= pod.memory
            top[3] -= pod.gpus
            if top[0] < 0:
                heapq.heapreplace(rooms, top)
            else:
                heapq.heappop(rooms)
        else:
            left.append(pod)
    return left, len(pods) - len(left)


def _demands(snap: Snapshot) -> dict[str, _Demand]:
    shapes: dict[tuple, SharedNode] = {}
    for n in snap.nodes:
        shapes.setdefault(_shape(n), n)
    pods, _ = fit_in_room(snap.pods, snap.nodes)
    return {
        SLURM: slurm_demand(snap.jobs, shapes, snap.slurm_reasons),
        K8S: k8s_demand(pods, shapes),
    }


def demand(snap: Snapshot) -> dict[str, int]:
    """Nodes each side's servable pending work would fill (pods that fit in the room of busy
    Kubernetes nodes left out; before subtracting idle and incoming nodes). The reconciler
    records when this became non-zero, for the persistence rule."""
    return {side: d.nodes_wanted for side, d in _demands(snap).items()}


def _why_not(n: SharedNode, to: str, snap: Snapshot) -> str | None:
    """Why this node may not move to `to` now (None: it may). The rules every move obeys; a node
    going home may be busy (a reclaim) and ignores the cooldown (its home's claim wins)."""
    home = n.home == to
    if n.phase != STEADY:
        return "failed" if n.phase == FAILED else f"switching ({n.phase})"
    if n.pinned:
        return f"pinned to {n.role} by an admin"
    if n.busy and not home:
        return f"busy in {n.role}"
    if not n.available and n.role == K8S and n.held_by and "someone else" in n.held_by:
        return n.held_by
    if home and n.busy:
        if not n.available:
            return n.held_by or f"not available in {n.role}"
        return reclaim_held(n.evict_refused_at, n.evict_refused, snap.policy.cooldown_s, snap.now)
    if not home and n.last_switch_at is not None and snap.now - n.last_switch_at < snap.policy.cooldown_s:
        return f"switched less than cooldown_s={snap.policy.cooldown_s} s ago"
    return None


def _reclaim_cost(n: SharedNode, snap: Snapshot) -> tuple:
    """Busy nodes to reclaim: work that ends within the grace first (nothing lost), then work
    that will be moved (the least work lost first), then work waited for (the soonest end first;
    an unknown end last)."""
    if not n.busy:
        return (0, 0.0)
    deadline = snap.now + snap.policy.reclaim_grace_s.get(n.role, 0)
    if n.work_ends_at is not None and n.work_ends_at <= deadline:
        return (0, 0.0)
    if n.movable and (n.role == K8S or requeue_pays(snap.policy, n.work_cost, n.work_ends_at, deadline)):
        return (1, n.work_cost)
    return (2, math.inf if n.work_ends_at is None else n.work_ends_at)


def requeue_pays(policy: Policy, work_cost: float, work_ends_at: float | None, deadline: float) -> bool:
    """Is requeueing a reclaimed SLURM node's jobs at `deadline` (the end of their grace) worth
    it? Only when the work they lose (work_cost: node-seconds run, a wide job's every node) is
    less than the wait it saves the home side (one node, from the deadline to their time limit);
    else they run to their end. Jobs with no time limit: yes. Waiting for them has no bound,
    and the home side was promised one; a job whose owner gave no end cannot count on one.
    policy.reclaim_requeue=always: every job that can be. The simulator carries out the Move
    this makes (Move.work), so it measures this very rule."""
    if policy.reclaim_requeue == "always" or work_ends_at is None:
        return True
    return work_cost < work_ends_at - deadline


def reclaim_work(n: SharedNode, snap: Snapshot) -> tuple[str, float, str]:
    """How a reclaim of this busy node moves its work: (Move.work, Move.deadline, what happens
    to it, in words)."""
    grace = float(snap.policy.reclaim_grace_s.get(n.role, 0))
    deadline = snap.now + grace
    if n.role == K8S:
        return EVICT, deadline, "its pods are evicted (PodDisruptionBudgets honoured)"
    if not n.movable or requeue_pays(snap.policy, n.work_cost, n.work_ends_at, deadline):
        return REQUEUE, deadline, "its jobs are requeued (those that cannot be run to their end)"
    jobs = f"job {n.work_ids[0]}" if len(n.work_ids) == 1 else f"jobs {', '.join(n.work_ids) or 'on it'}"
    saves = max(0.0, n.work_ends_at - deadline)
    return WAIT, max(deadline, n.work_ends_at), (
        f"waiting for {jobs} to end (requeue would lose {n.work_cost / 3600:.1f} node-h, "
        f"to save {saves / 3600:.1f} h of one node)")


def reclaim_held(refused_at: float | None, refused: str | None, cooldown_s: float, now: float) -> str | None:
    """Why a node whose last reclaim a PodDisruptionBudget refused is held where it is (None:
    not held): for cooldown_s after the refusal. decide(), `provisioner nodes` and /metrics."""
    if refused_at is None or now - refused_at >= cooldown_s:
        return None
    return (f"reclaim held: a PodDisruptionBudget refused the eviction ({refused}); "
            f"tried again cooldown_s={cooldown_s} s after")


def reclaim_bound(policy: Policy, home: str, pass_interval_s: float, switch_s: float) -> float:
    """How long a side may wait for one of its lent home nodes once its work is pending: the
    persistence, one pass, the borrower's grace and the switch home (a PodDisruptionBudget that
    refuses holds the node longer; Decision.held says so). A switch slot is assumed free."""
    return policy.demand_persist_s + pass_interval_s + policy.reclaim_grace_s.get(OTHER[home], 0) + switch_s


def lending_lines(policy: Policy, homes: dict[str, int], pass_interval_s: float) -> list[str]:
    """What `provisioner check` prints about lending: per side, its home nodes, what it lends,
    and the reclaim bound for the site's knobs."""
    longer = {SLURM: "a PodDisruptionBudget that refuses the eviction holds it longer (shown as held)",
              K8S: "a job that cannot be requeued holds it until the job ends"}
    if policy.reclaim_requeue == "cheaper":
        longer[K8S] = ("or, busy with a job whose requeue would cost more than waiting for it (reclaim_requeue=cheaper: "
                       f"more node-hours run than the wait it saves), at that job's end; {longer[K8S]}")
    lines = []
    for side in (SLURM, K8S):
        limit = policy.lending_limit.get(side)
        lends = "any idle one it has no work for" if limit is None else f"at most {limit} at once"
        lines.append(
            f"{side}: {homes.get(side, 0)} home shared node(s), lends {lends}; a lent one is back within "
            f"{reclaim_bound(policy, side, pass_interval_s, 0):g} s + its switch (demand_persist_s="
            f"{policy.demand_persist_s} + a pass {pass_interval_s:g} s + {OTHER[side]}'s reclaim_grace_s="
            f"{policy.reclaim_grace_s.get(OTHER[side], 0)}; a switch phase times out after phase_timeout_s="
            f"{policy.phase_timeout_s}); {longer[side]}")
    return lines


def pods_per_node(node: SharedNode, pod: PendingPod) -> int:
    """How many such pods the node holds (0: it cannot run one)."""
    if not node_serves_pod(node, pod):
        return 0
    fits = [node.cpus * 1000 // pod.cpu_m if pod.cpu_m else None,
            node.memory // pod.memory if pod.memory and node.memory else None,
            node.gpus // pod.gpus if pod.gpus else None]
    return min((f for f in fits if f is not None), default=1 << 30)


def _place(gang: GangAsk, pool: list[SharedNode]) -> tuple[list[str], str | None]:
    """Nodes of `pool` (in order of preference) that hold every pod of the gang, or what is
    missing. Pods pack: a node holds as many pods of a pod set as its size allows."""
    taken: list[str] = []
    for pod, count in gang.pod_sets:
        left = count
        for n in pool:
            if left <= 0:
                break
            if n.name in taken:
                continue
            per = pods_per_node(n, pod)
            if per:
                taken.append(n.name)
                left -= per
        if left > 0:
            return taken, f"{left} of {count} pod(s) ({_pod_shape(pod)}) have no node"
    return taken, None


def _pod_shape(pod: PendingPod) -> str:
    parts = [f"{pod.cpu_m}m CPU"]
    if pod.memory:
        parts.append(f"{pod.memory >> 20} MiB")
    if pod.gpus:
        parts.append(f"{pod.gpus} GPU")
    if pod.node_selector:
        parts.append("selector " + ",".join(f"{k}={v}" for k, v in pod.node_selector))
    return ", ".join(parts)


def _serve_gangs(snap: Snapshot, slots: int, on_side: Counter,
                 lend_room: float) -> tuple[list[Move], list[GangAnswer], dict[str, str]]:
    """Gang asks, oldest first: all or nothing. Returns the moves, one answer per gang, and the
    nodes booked (node -> gang id), which nothing else may take. A node whose home is
    Kubernetes counts even when busy in SLURM (it comes home by reclaim, within the bound);
    SLURM's own home nodes count up to its lending limit (`lend_room` more of them)."""
    moves: list[Move] = []
    answers: list[GangAnswer] = []
    booked: dict[str, str] = {}
    by_name = {n.name: n for n in snap.nodes}
    for g in snap.gangs:
        if g.provisioned_at is not None and snap.now - g.provisioned_at >= g.booking_s:
            answers.append(GangAnswer(g.id, "expired", (), f"booked for {int(g.booking_s)} s since it was "
                                      "provisioned: the nodes are free for other work"))
            continue
        # Never servable: larger than the shared pool (every shared node that is not failed).
        pool = [n for n in snap.nodes if n.phase != FAILED]
        _, never = _place(g, pool)
        if never:
            total = sum(c for _, c in g.pod_sets)
            answers.append(GangAnswer(g.id, "failed", (), f"can never be served: {never} among the "
                                      f"{len(pool)} shared node(s) (the gang needs {total} pod(s) at once)"))
            continue
        mine = set(g.booked)
        ready, incoming, movable, why_not = [], [], [], Counter()
        for n in snap.nodes:
            if booked.get(n.name):
                why_not[f"booked for {booked[n.name]}"] += 1
            elif n.role == K8S and n.phase == STEADY and (n.name in mine or (n.available and not n.busy)):
                ready.append(n)
            elif n.role == K8S and n.phase not in (STEADY, FAILED) and n.name in mine:
                incoming.append(n)
            elif n.role == SLURM:
                why = _why_not(n, K8S, snap)
                if why is None and not n.available:
                    why = n.held_by or "not available in slurm"
                if why:
                    why_not[why] += 1
                else:
                    movable.append(n)
            else:
                why_not["busy in k8s" if n.busy else n.held_by or f"{n.phase} in {n.role}"] += 1
        first = lambda n: (n.name not in mine, n.name)  # noqa: E731 - booked nodes first, then by name
        # Idle nodes first, Kubernetes' own before SLURM's (which it lends up to its limit); a
        # busy node of Kubernetes' last, coming home by reclaim (that costs SLURM work).
        lent = sorted((n for n in movable if n.home != K8S), key=first)
        if len(lent) > lend_room:
            why_not[f"slurm lends at most lending_limit={snap.policy.lending_limit.get(SLURM)} home node(s)"] += \
                len(lent) - int(lend_room)
            lent = lent[:int(lend_room)]
        home_idle = sorted((n for n in movable if n.home == K8S and not n.busy), key=first)
        home_busy = sorted((n for n in movable if n.home == K8S and n.busy),
                           key=lambda n: (_reclaim_cost(n, snap), *first(n)))
        pool = sorted(ready + incoming, key=first) + home_idle + lent + home_busy
        nodes, missing = _place(g, pool)
        to_move = [by_name[x] for x in nodes if by_name[x].role == SLURM]
        if not missing and on_side[SLURM] - len(to_move) < snap.policy.min_nodes.get(SLURM, 0):
            missing = f"moving {len(to_move)} node(s) would leave SLURM below its minimum of " \
                      f"{snap.policy.min_nodes.get(SLURM, 0)} shared node(s)"
        if missing:
            held = "; ".join(f"{c} {why}" for why, c in why_not.most_common(3))
            answers.append(GangAnswer(g.id, "waiting", tuple(n.name for n in incoming),
                                      f"all or nothing: {missing} now" + (f" (others: {held})" if held else "")
                                      + "; nothing is switched for it"))
            for n in incoming:  # already on their way: still its own
                booked[n.name] = g.id
            continue
        for x in nodes:
            booked[x] = g.id
        started = to_move[:max(0, slots)]
        slots -= len(started)
        on_side[SLURM] -= len(started)
        lend_room -= sum(1 for n in to_move if n.home != K8S)
        for n in started:
            moves.append(_move(n, K8S, f"{g.source or g.id} asks for {len(nodes)} node(s) at once (all or "
                               "nothing)", snap))
        if all(by_name[x].role == K8S and by_name[x].phase == STEADY for x in nodes):
            answers.append(GangAnswer(g.id, "provisioned", tuple(nodes), f"{fold(nodes)} in Kubernetes, booked for it"))
        else:
            wait = f"; {len(to_move) - len(started)} wait for a switch slot" if len(started) < len(to_move) else ""
            answers.append(GangAnswer(g.id, "switching", tuple(nodes),
                                      f"{fold(nodes)} booked for it, {len(to_move)} switching from slurm{wait}"))
    return moves, answers, booked


def decide(snap: Snapshot) -> Decision:
    p = snap.policy
    notes: list[str] = []
    answers: list[Answer] = []
    boots: list[Move] = []
    demand = _demands(snap)
    by_name = {n.name: n for n in snap.nodes}

    switching = [n for n in snap.nodes if n.phase not in (STEADY, FAILED)]
    on_side = Counter(n.role for n in snap.nodes if n.phase != FAILED)  # includes nodes switching to it
    # Demand already covered: idle usable shared nodes on that side, and nodes switching to it.
    covered = Counter(n.role for n in switching)
    for n in snap.nodes:
        if n.phase == STEADY and n.available and not n.busy:
            covered[n.role] += 1
    # Lending: each side's home nodes on (or switching to) the other side, and its limit.
    lent = Counter(n.home for n in snap.nodes if n.home in OTHER and n.role != n.home and n.phase != FAILED)
    room = {side: math.inf if p.lending_limit.get(side) is None else p.lending_limit[side] - lent[side]
            for side in (SLURM, K8S)}
    # A side keeps the idle nodes its own pending work would fill (the head job's gathered
    # nodes among them): only the rest may be lent.
    spare = {side: covered[side] - demand[side].nodes_wanted for side in (SLURM, K8S)}

    def lendable(n: SharedNode) -> str | None:
        """Why an idle node may not be lent to the other side now (None: it may)."""
        if spare[n.role] <= 0:
            return f"{n.role}'s own pending work needs it"
        if n.home == n.role and room[n.role] <= 0:
            return f"{n.role} lends at most lending_limit={p.lending_limit[n.role]} home node(s)"
        return None

    def take(n: SharedNode) -> None:
        """Account for a node leaving its side in this decision."""
        if not n.busy:
            spare[n.role] -= 1
        if n.home == n.role:
            room[n.role] -= 1

    # Gang asks first (all or nothing; the nodes they book are nobody else's), then the asks that
    # name their node: neither needs persistence, and both go before polled demand.
    gang_moves, gang_answers, booked = _serve_gangs(snap, p.max_in_flight - len(switching), on_side, room[SLURM])
    for m in gang_moves:
        take(by_name[m.node])
    for n in snap.nodes:
        if n.name in booked and n.role == K8S and n.phase == STEADY and n.available and not n.busy:
            covered[K8S] -= 1  # booked for a gang: it does not cover other pods
    asked: list[tuple[Ask, SharedNode]] = []  # resume asks that may move their node to slurm
    released: dict[str, Ask] = {}  # suspend asks: slurm lets these go
    seen: set[tuple[str, str]] = set()
    for ask in snap.asks:
        n = by_name.get(ask.node)
        if (ask.node, ask.kind) in seen:
            answers.append(Answer(ask.id, ask.node, "done", "the same as an earlier ask in this pass"))
            continue
        seen.add((ask.node, ask.kind))
        if n is None:
            answers.append(Answer(ask.id, ask.node, "refused", "not a shared node: provisioner does not move it"))
        elif ask.kind == SUSPEND:
            if n.role == SLURM and n.phase == STEADY:
                released[n.name] = ask
            else:
                answers.append(Answer(ask.id, n.name, "done", f"already leaving SLURM ({n.phase}, to {n.role})"
                                      if n.phase != STEADY else f"already in {n.role}"))
        elif ask.kind != RESUME:
            answers.append(Answer(ask.id, n.name, "refused", f"unknown ask {ask.kind!r}"))
        elif n.role == SLURM:
            if n.phase == STEADY:
                boots.append(Move(n.name, SLURM, f"{ask.source} asks for it ({ask.reason}); in SLURM already"))
                answers.append(Answer(ask.id, n.name, "granted", "in SLURM already: powering it on"))
            elif n.phase == FAILED:
                answers.append(Answer(ask.id, n.name, "refused", "failed: an admin must look at it first"))
            else:
                answers.append(Answer(ask.id, n.name, "granted", f"already switching to slurm ({n.phase})"))
        else:
            why = (f"booked for {booked[n.name]} (all or nothing)" if n.name in booked
                   else _why_not(n, SLURM, snap) or (None if n.home == SLURM else lendable(n)))
            if why:
                answers.append(Answer(ask.id, n.name, "refused", why))
            else:
                asked.append((ask, n))
                take(n)

    # A node SLURM asks for no longer covers Kubernetes' demand: it is about to leave.
    covered[K8S] -= sum(1 for _, n in asked if n.available and not n.busy)
    wanted = {side: max(0, demand[side].nodes_wanted - covered[side]) for side in (SLURM, K8S)}
    for side in (SLURM, K8S):
        if demand[side].items and not wanted[side]:
            notes.append(f"{side}: {_describe(side, demand[side])}; already covered by "
                         f"{covered[side]} idle or incoming shared node(s)")

    # Reclaims still in their grace whose home side no longer needs them (its work started
    # elsewhere or went away): released before their work is moved, the latest first. Asks and
    # gangs keep theirs (their demand is not polled).
    release: dict[str, str] = {}
    kept = {a.node for a in snap.asks if a.kind == RESUME} | set(booked)
    for side in (SLURM, K8S):
        excess = covered[side] - demand[side].nodes_wanted
        in_grace = sorted((n for n in switching if n.role == side and n.reclaim_deadline is not None
                           and n.reclaim_deadline > snap.now and n.name not in kept),
                          key=lambda n: (-n.reclaim_deadline, n.name))
        for n in in_grace[:max(0, excess)]:
            release[n.name] = (f"{side} no longer needs it ({demand[side].nodes_wanted} node(s) wanted, "
                               f"{covered[side]} idle or incoming): reclaim ended within the grace, its work untouched")
            notes.append(f"{n.name}: {release[n.name]}")
            covered[side] -= 1

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

    slots = max(0, p.max_in_flight - len(switching) - len(gang_moves))
    if slots <= 0 and (any(wanted.values()) or asked):
        notes.append(f"{len(switching)} switch(es) in flight, max_in_flight is {p.max_in_flight}")

    # Candidates on each side that could go to the other (polled demand), in the order they
    # are taken: idle nodes going home, idle nodes lent (what SLURM released first), then busy
    # home nodes reclaimed (those whose work can move first).
    candidates: dict[str, list[SharedNode]] = {SLURM: [], K8S: []}
    held: dict[tuple[str, str], list[str]] = {}
    home_held: dict[str, str] = {}
    asked_names = {n.name for _, n in asked}
    order = sorted(snap.nodes, key=lambda n: (n.busy, n.home != OTHER.get(n.role), _reclaim_cost(n, snap),
                                              n.name not in released, n.last_switch_at or 0.0, n.name))
    for n in order:
        to = OTHER.get(n.role)
        if to is None or not wanted.get(to) or n.name in asked_names:
            continue
        going_home = n.home == to
        why_not = f"booked for {booked[n.name]}" if n.name in booked else _why_not(n, to, snap)
        if why_not is None and not n.available and n.name not in released:
            why_not = n.held_by or f"not available in {n.role}"
        if why_not is None and _shape(n) not in demand[to].shapes:
            why_not = f"cannot serve the pending {to} work"
        if why_not is None and not going_home and n.name not in released:
            why_not = lendable(n)
        if why_not is None and not going_home and n.name in released and n.home == n.role and room[n.role] <= 0:
            why_not = lendable(n)
        if why_not:
            held.setdefault((to, why_not), []).append(n.name)
            if going_home:
                home_held[n.name] = why_not
            continue
        if not going_home:
            take(n)
        candidates[n.role].append(n)
    for (to, why_not), names in held.items():  # one line per reason, not one per node
        notes.append(f"{fold(names)}: not moved to {to}: {why_not}")

    # Share the free slots between the sides that want nodes; asks count first on their side.
    want = {SLURM: len(asked) + min(wanted[SLURM], len(candidates[K8S])),
            K8S: min(wanted[K8S], len(candidates[SLURM]))}
    for to in (SLURM, K8S):
        if wanted[to] and not candidates[OTHER[to]]:
            notes.append(f"{to}: wants {wanted[to]} node(s) but no shared node on the {OTHER[to]} side is free to move")
    grant = _share(slots, want, p.share_rule)

    moves: list[Move] = list(gang_moves)
    for to in (SLURM, K8S):
        frm = OTHER[to]
        left_on_frm = on_side[frm]
        queue: list[tuple[Ask | None, SharedNode]] = (asked if to == SLURM else []) + \
            [(None, n) for n in candidates[frm]]
        granted = 0
        for ask, n in queue:
            if granted >= grant[to]:
                if ask is not None:
                    answers.append(Answer(ask.id, n.name, "deferred", f"{len(switching) + len(moves)} switch(es) in "
                                          f"flight, max_in_flight is {p.max_in_flight}: waiting for a slot"))
                continue
            if left_on_frm - 1 < p.min_nodes.get(frm, 0):
                why = f"{frm} keeps its minimum of {p.min_nodes.get(frm, 0)} shared node(s)"
                if ask is not None:
                    answers.append(Answer(ask.id, n.name, "refused", why))
                    continue
                notes.append(f"{n.name}: not moved to {to}: {why}")
                break
            left_on_frm -= 1
            granted += 1
            if ask is not None:
                why = f"{ask.source} asks for it ({ask.reason})"
                answers.append(Answer(ask.id, n.name, "granted", f"switching to {to}" +
                                      (f" after the {frm} grace" if n.busy else "")))
            else:
                why = _describe(to, demand[to])
                if n.name in released:
                    why += f"; SLURM released {n.name} ({released[n.name].reason})"
            moves.append(_move(n, to, why, snap))

    moved = {m.node for m in moves}
    slurm_hold = {}
    for n in snap.nodes:
        if n.role == K8S and n.phase == STEADY and n.name not in moved and n.name not in asked_names:
            slurm_hold[n.name] = _why_not(n, SLURM, snap) or (None if n.home == SLURM else lendable(n))
    for name, gang in booked.items():
        if name in slurm_hold:
            slurm_hold[name] = f"booked for {gang}"
    power_off = []
    for name, ask in released.items():
        if name in moved:
            answers.append(Answer(ask.id, name, "done", "given to Kubernetes, which has work for it"))
        else:
            power_off.append(Move(name, SLURM, f"released by {ask.source} ({ask.reason}); nothing else wants it"))
            answers.append(Answer(ask.id, name, "done", "powered off: Kubernetes has no work for it now"))
    for m in moves:
        if m.node in by_name and by_name[m.node].home in OTHER:
            lent[by_name[m.node].home] += 1 if m.to_role != by_name[m.node].home else -1
    return Decision(tuple(moves), {s: demand[s].nodes_wanted for s in demand}, tuple(notes), tuple(answers),
                    tuple(boots), tuple(power_off), slurm_hold, home_held, dict(lent), tuple(gang_answers),
                    release)


def _move(n: SharedNode, to: str, why: str, snap: Snapshot) -> Move:
    frm = n.role
    home = f"; its home is {to}" if n.home == to else ""
    if not n.busy:
        return Move(n.name, to, f"{why}; {n.name} idle in {frm}{home}")
    grace = float(snap.policy.reclaim_grace_s.get(frm, 0))
    work, deadline, then = reclaim_work(n, snap)
    when = f"{grace:g} s grace, then {then}" if work != WAIT else then
    return Move(n.name, to, f"{why}; reclaiming {n.name}, busy in {frm}{home}: "
                f"{'cordoned' if frm == K8S else 'drained'} now, {when}",
                reclaim=True, from_role=frm, grace_s=grace, deadline=deadline, work=work)


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
