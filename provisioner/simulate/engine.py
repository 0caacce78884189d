"""The discrete-event simulation: fixed SLURM nodes, fixed Kubernetes nodes and a shared pool,
in simulated time, under one of four policies:

- `static`: no sharing: the shared nodes stay where they start (`Cluster.static_k8s` of them in
  Kubernetes, the rest in SLURM);
- `paper`: the published cron rule: every pass (60 s), for each side with pending work, move as
  many of the other side's idle shared nodes as that work would fill (jobs: their nodes; pods:
  their CPUs over a node's); no persistence, no cooldown, no limit on switches in flight, no
  minimum, and nothing subtracted for nodes already on their way;
- `provisioner`: `provisioner.policy.decide()`, unchanged, called every pass with a snapshot of
  the simulated world and the site's knobs, as `provisioner balance` calls it (a pass where its
  own rules allow no move skips the call; `always_decide` turns that off, for the tests);
- `bound`: one pool and zero switch time: an idle shared node serves whichever side asks for it,
  at once (not a strict optimum, but what no switching policy can beat by much).

Models:
- SLURM: FCFS with EASY backfilling over whole, exclusive nodes (a job asks for N nodes; the
  first job in the queue gets a reservation at the earliest time enough nodes free up by the
  running jobs' estimates; later jobs start early when they fit now and either end before that
  time or leave the reserved nodes alone). At most BACKFILL_DEPTH queued jobs are tried per
  scheduling round (SLURM's bf_max_job_test). When the first job needs more nodes than SLURM has
  now (the rest lent to Kubernetes, drained), it gets no reservation and every job behind it that
  fits starts (slurmctld 22.05 does so: tests/test_slurm_wide_job.py).
- Kubernetes: FIFO first-fit: pending pods in arrival order, each on the first node (fixed nodes
  first, then shared ones) with enough free CPU, memory and GPUs; a pod that fits nowhere waits
  and does not block the ones behind it.
- Homes: a shared node's home is where it starts (the static split). provisioner's decide() gets
  each node's home, the room left on busy Kubernetes nodes, and what reclaiming it would cost.
- A switch: an idle node leaves its side at once, serves nobody for its switch time, then
  serves the other side. A busy node its home reclaims (decide()'s Move.reclaim) takes no new
  work at once (drained / cordoned); when its work ends, or at the end of the grace, it switches;
  at the end of the grace its job is requeued (all of the job's nodes are freed, the job goes
  back to the queue in submit order and later runs again from the start) or its pods are evicted
  (back to the pending queue in arrival order, run again from the start). The time they had run
  is the work lost; a requeued job's or evicted pod's wait is taken at its last start, less the
  time it ran before. A job whose requeue would lose more than the wait it saves (decide()'s
  Move.work WAIT, policy.requeue_pays) runs to its end instead. A reclaim decide() releases
  before its deadline (Decision.release: its home side no longer needs the node) is rolled
  back: the drain or cordon lifted, its work untouched.

Left out: node failures and retries; job priorities other than arrival order, fair share,
partitions, QOS, SLURM's own preemption and time limits killing jobs (a job runs for its trace run
time); SLURM's requeue delay (a requeued job may start again only about 2 minutes later, when
its old credential has expired); jobs that cannot be requeued (every batch job can, SLURM's
JobRequeue default) and PodDisruptionBudgets (every pod can be evicted); topology; pod
priorities, affinities, DaemonSets and the scheduler's scoring (spread, balanced allocation);
SLURM power saving (with it a wide job takes a lent node at once and waits for it, instead of
being backfilled around: tests/test_slurm_wide_job.py shows both) and its asks; the time
slurmctld and the Kubernetes scheduler take to react (both place work the moment it can run).
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from dataclasses import dataclass, field, replace

from provisioner import policy as pol
from provisioner.model import Policy
from provisioner.simulate.pods import Pod
from provisioner.simulate.swf import Job
from provisioner.states import BOOTING, CORDONING, DRAINING, FAILED, K8S, SLURM, STEADY, WAIT

POLICIES = ("static", "paper", "provisioner", "bound")
BACKFILL_DEPTH = 500
OTHER = {SLURM: K8S, K8S: SLURM}

# Event kinds, in the order they are handled at the same instant.
_JOB_END, _POD_END, _SWITCH_DONE, _GRACE_END, _JOB_SUBMIT, _POD_ARRIVE, _PASS = range(7)
RECLAIMING = (DRAINING, CORDONING)  # a reclaimed node whose work still runs (SLURM drains, Kubernetes cordons)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Cluster:
    slurm_nodes: int = 224  # fixed SLURM nodes
    k8s_nodes: int = 32  # fixed Kubernetes nodes
    shared_nodes: int = 64
    static_k8s: int | None = None  # shared nodes in Kubernetes at the start and in the static split (default: half)
    cpus: int = 32  # per node, every node alike
    memory_gb: int = 128
    gpus: int = 0

    @property
    def start_k8s(self) -> int:
        return self.shared_nodes // 2 if self.static_k8s is None else min(self.static_k8s, self.shared_nodes)

    @property
    def static_slurm_nodes(self) -> int:
        return self.slurm_nodes + self.shared_nodes - self.start_k8s


@dataclass(frozen=True)
class Dist:
    """A switch time distribution: fixed, uniform(lo, hi) or normal(mean, sd) clipped at 0."""
    kind: str
    a: float
    b: float = 0.0

    def sample(self, rng: random.Random) -> float:
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "normal":
            return max(0.0, rng.gauss(self.a, self.b))
        return self.a

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a

    def __str__(self) -> str:
        return {"fixed": f"{self.a:g} s", "uniform": f"uniform {self.a:g}-{self.b:g} s",
                "normal": f"normal {self.a:g} s, sd {self.b:g} s"}[self.kind]


# The VM benchmark (BENCHMARKS.md, vm_boot, the real Debian images, 2026-12-02): work submitted ->
# running on the switched node, min-max of the rounds: to slurm 37.7-37.9 s, to k8s 62.1-75.1 s.
VM_SWITCH = {SLURM: Dist("uniform", 37.7, 37.9), K8S: Dist("uniform", 62.1, 75.1)}


@dataclass(frozen=True)
class Settings:
    policy: Policy = field(default_factory=Policy)  # provisioner's knobs (site.yaml's policy:)
    switch: dict = field(default_factory=lambda: dict(VM_SWITCH))  # to-role -> Dist
    pass_interval_s: float = 60.0  # cron's minute
    flap_window_s: float = 1800.0  # a node moved back within this long after a switch is a flap
    seed: int = 1
    samples: int = 600  # time series points for the plots


# --------------------------------------------------------------------------- state


class Node:
    __slots__ = ("name", "pool", "role", "phase", "last_switch_at", "last_switch_end", "free_cpu", "free_mem",
                 "free_gpus", "job", "pods", "index", "shared_view", "home", "target", "pod_ids", "reclaim_id",
                 "reclaim_deadline")

    def __init__(self, name: str, pool: str, role: str, cl: Cluster, index: int):
        self.name, self.pool, self.role, self.phase, self.index = name, pool, role, STEADY, index
        self.home = role  # the static split: where the node starts
        self.target: str | None = None  # while reclaimed: the side it goes to once its work is gone
        self.pod_ids: set[int] = set()
        self.reclaim_id = 0
        self.reclaim_deadline: float | None = None  # while reclaimed: when its grace ends
        self.last_switch_at: float | None = None
        self.last_switch_end: float | None = None
        self.free_cpu, self.free_mem, self.free_gpus = cl.cpus * 1000, cl.memory_gb << 30, cl.gpus
        self.job: int | None = None
        self.pods = 0
        self.shared_view = None

    @property
    def busy(self) -> bool:
        return self.job is not None or self.pods > 0


@dataclass
class Result:
    policy: str
    knobs: dict
    job_waits: list[float]
    pod_waits: list[float]
    util: dict[str, float]
    switches: dict[str, int]
    switch_hours: dict[str, float]
    flaps: dict[str, int]
    samples: list[tuple]  # (t, slurm nodes, k8s nodes, switching, pending jobs, pending pods)
    unfinished: dict[str, int]
    end: float
    decide_calls: int = 0
    # Reclaims: busy nodes taken home, and the work they cost: jobs requeued (their node-hours
    # run before), pods evicted (their hours run before; they start again from the beginning).
    reclaims: dict[str, int] = field(default_factory=lambda: {SLURM: 0, K8S: 0})  # by the side that took it home
    requeued: int = 0
    evicted: int = 0
    lost_job_node_h: float = 0.0
    lost_pod_h: float = 0.0
    released: int = 0  # reclaims rolled back within their grace (Decision.release): their work untouched
    waited: int = 0  # reclaims that waited for their job to end (its requeue would lose more than it saves)


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def wait_stats(waits: list[float]) -> dict:
    s = sorted(waits)
    return {"count": len(s), "mean_s": (sum(s) / len(s)) if s else None,
            "median_s": _percentile(s, 0.5), "p95_s": _percentile(s, 0.95), "p99_s": _percentile(s, 0.99),
            "max_s": s[-1] if s else None}


# --------------------------------------------------------------------------- the simulation


class Simulation:
    always_decide = False  # the tests turn the skipping of no-op decide() calls off, to compare
    def __init__(self, kind: str, cluster: Cluster, jobs: list[Job], pods: list[Pod], settings: Settings):
        if kind not in POLICIES:
            raise ValueError(f"unknown policy {kind!r}; one of {', '.join(POLICIES)}")
        self.kind, self.cl, self.st = kind, cluster, settings
        self.rng = random.Random(settings.seed)
        self.jobs = {j.id: j for j in jobs}
        self.pods = pods
        self.pod_by_id = {p.id: p for p in pods}
        self.nodes: list[Node] = []
        i = 0
        for pool, count, role in ((SLURM, cluster.slurm_nodes, SLURM), (K8S, cluster.k8s_nodes, K8S)):
            for n in range(count):
                self.nodes.append(Node(f"{pool[0]}n{n + 1:04d}", pool, role, cluster, i))
                i += 1
        self.shared: list[Node] = []
        for n in range(cluster.shared_nodes):
            role = K8S if n < cluster.start_k8s else SLURM
            node = Node(f"sn{n + 1:04d}", "shared", role, cluster, i)
            i += 1
            self.nodes.append(node)
            self.shared.append(node)
        self.heap: list[tuple] = []
        self.seq = 0
        self.now = 0.0
        # SLURM
        self.queue: list[Job] = []
        self.free_slurm: list[int] = sorted(n.index for n in self.nodes if n.role == SLURM)  # node indexes, fixed first
        self.running: dict[int, tuple[float, list[int]]] = {}  # job id -> (estimated end, nodes)
        self.slurm_full_scan = True
        self.slurm_scan_from = 0
        self.shadow, self.extra = math.inf, 0
        # Kubernetes
        self.pending: list[Pod] = []
        self.k8s_full_scan = True
        self.k8s_scan_from = 0
        self.pod_node: dict[int, int] = {}
        # metrics: waits by job / pod id (a requeued job's or evicted pod's wait is taken at its
        # last start, less the time it ran before)
        self.job_wait: dict[int, float] = {}
        self.pod_wait: dict[int, float] = {}
        self.job_ran: dict[int, float] = {}
        self.pod_ran: dict[int, float] = {}
        self.started: dict[int, float] = {}  # job id -> its start
        self.pod_started: dict[int, float] = {}
        self.job_gen: dict[int, int] = {}  # a requeued job's or evicted pod's old end event is stale
        self.pod_gen: dict[int, int] = {}
        self.reclaims = {SLURM: 0, K8S: 0}
        self.requeued = self.evicted = self.released = self.waited = 0
        self.lost_job_node_s = self.lost_pod_s = 0.0
        self.job_work = 0.0  # node-seconds
        self.pod_work = 0.0  # millicore-seconds
        self.side_time = {SLURM: 0.0, K8S: 0.0}  # steady node-seconds per side
        self.count = {SLURM: sum(1 for n in self.nodes if n.role == SLURM), K8S: sum(1 for n in self.nodes if n.role == K8S)}
        self.switching = 0
        self.last_t = 0.0
        self.switches = {SLURM: 0, K8S: 0}
        self.switch_s = {SLURM: 0.0, K8S: 0.0}
        self.flaps = {SLURM: 0, K8S: 0}
        self.samples: list[tuple] = []
        self.next_sample = 0.0
        self.sample_every = 60.0
        self.demand_since: dict[str, float | None] = {SLURM: None, K8S: None}
        self.decide_calls = 0
        self.pass_pending = False
        self.arrivals_left = 0
        self.stuck_passes = 0
        self.pending_job_cache: dict[int, pol.PendingJob] = {}
        self.pending_pod_cache: dict[int, pol.PendingPod] = {}
        self.labels = (("sched", K8S),)

    # -- events ------------------------------------------------------------------------

    def push(self, t: float, kind: int, data) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, data))

    def run(self) -> Result:
        span = max([j.submit for j in self.jobs.values()] + [p.arrival for p in self.pods] + [1.0])
        self.sample_every = max(60.0, span / max(1, self.st.samples))
        for j in self.jobs.values():
            self.push(j.submit, _JOB_SUBMIT, j.id)
        for p in self.pods:
            self.push(p.arrival, _POD_ARRIVE, p)
        self.arrivals_left = len(self.jobs) + len(self.pods)
        while self.heap:
            t = self.heap[0][0]
            while t >= self.next_sample:
                self.sample(self.next_sample)
                self.next_sample += self.sample_every
            self.now = t
            while self.heap and self.heap[0][0] == t and self.heap[0][1] != _PASS:
                _, kind, _, data = heapq.heappop(self.heap)
                self.handle(kind, data)
            self.schedule()
            if self.heap and self.heap[0][0] == t and self.heap[0][1] == _PASS:
                heapq.heappop(self.heap)
                self.pass_pending = False
                self.balance_pass()
                self.schedule()
        self.account(self.now)
        self.sample(self.now)
        job_work_time = self.side_time[SLURM]
        pod_time = self.side_time[K8S] * self.cl.cpus * 1000
        total = (self.side_time[SLURM] + self.side_time[K8S]) or 1.0
        return Result(
            policy=self.kind,
            knobs={},
            job_waits=list(self.job_wait.values()), pod_waits=list(self.pod_wait.values()),
            util={SLURM: self.job_work / job_work_time if job_work_time else 0.0,
                  K8S: self.pod_work / pod_time if pod_time else 0.0,
                  "all": (self.job_work + self.pod_work / (self.cl.cpus * 1000)) / total},
            switches=dict(self.switches), switch_hours={s: v / 3600 for s, v in self.switch_s.items()},
            flaps=dict(self.flaps), samples=self.samples,
            unfinished={SLURM: len(self.queue), K8S: len(self.pending)}, end=self.now,
            decide_calls=self.decide_calls, reclaims=dict(self.reclaims), requeued=self.requeued,
            evicted=self.evicted, released=self.released, waited=self.waited, lost_job_node_h=self.lost_job_node_s / 3600,
            lost_pod_h=self.lost_pod_s / 3600,
        )

    def handle(self, kind: int, data) -> None:
        if kind == _JOB_END:
            job_id, gen = data
            if self.job_gen.get(job_id, 0) == gen:
                self.end_job(job_id)
        elif kind == _POD_END:
            pod, gen = data
            if self.pod_gen.get(pod.id, 0) == gen:
                node = self.end_pod(pod)
                if self.kind == "bound" and node.pool == "shared" and not node.busy:
                    self.slurm_full_scan = True
        elif kind == _SWITCH_DONE:
            self.finish_switch(self.nodes[data])
        elif kind == _GRACE_END:
            index, reclaim_id = data
            node = self.nodes[index]
            if node.phase in RECLAIMING and node.reclaim_id == reclaim_id:
                self.grace_over(node)
        elif kind == _JOB_SUBMIT:
            self.arrivals_left -= 1
            self.queue.append(self.jobs[data])
            self.ensure_pass()
        elif kind == _POD_ARRIVE:
            self.arrivals_left -= 1
            self.pending.append(data)
            self.ensure_pass()

    def end_job(self, job_id: int) -> list[Node]:
        """The job's nodes are free (it ended, or was requeued): back to SLURM's free list, or,
        when reclaimed and now idle, on their way home."""
        _, nodes = self.running.pop(job_id)
        freed = []
        for i in nodes:
            node = self.nodes[i]
            node.job = None
            freed.append(node)
            if node.role == SLURM and node.phase == STEADY:
                bisect.insort(self.free_slurm, i)
            elif node.phase in RECLAIMING:
                self.reclaimed_idle(node)
        self.slurm_full_scan = True
        return freed

    def end_pod(self, pod: Pod) -> Node:
        node = self.nodes[self.pod_node.pop(pod.id)]
        node.pods -= 1
        node.pod_ids.discard(pod.id)
        node.free_cpu += pod.cpu_m
        node.free_mem += pod.memory
        node.free_gpus += pod.gpus
        self.k8s_full_scan = True
        if node.phase in RECLAIMING and not node.busy:
            self.reclaimed_idle(node)
        return node

    # -- reclaim: a busy node goes home (drained / cordoned, the grace, then requeue / evict) --

    def reclaim(self, node: Node, to: str, deadline: float, work: str) -> None:
        """decide()'s reclaim: drained or cordoned now; at `deadline` its work is moved, unless
        decide() chose to wait for its job (states.WAIT, policy.requeue_pays): then the job runs
        to its end, which comes by the deadline (its time limit; a job here ends by its estimate)."""
        self.account(self.now)
        self.count[node.role] -= 1
        self.switching += 1
        node.phase = DRAINING if node.role == SLURM else CORDONING
        node.target = to
        node.reclaim_id += 1
        node.reclaim_deadline = deadline
        self.reclaims[to] += 1
        if node.role == K8S:
            self.k8s_full_scan = True
        if work == WAIT:
            self.waited += 1
        else:
            self.push(deadline, _GRACE_END, (node.index, node.reclaim_id))

    def release(self, node: Node) -> None:
        """decide()'s Decision.release: a reclaim still in its grace that its home side no longer
        needs is rolled back (the drain or cordon lifted, its work untouched)."""
        if node.phase not in RECLAIMING:
            return
        self.account(self.now)
        node.phase, node.target, node.reclaim_deadline = STEADY, None, None
        node.reclaim_id += 1  # its grace event goes stale
        self.count[node.role] += 1
        self.switching -= 1
        self.released += 1
        if node.role == SLURM and not node.busy:
            bisect.insort(self.free_slurm, node.index)
        self.slurm_full_scan = self.k8s_full_scan = True

    def reclaimed_idle(self, node: Node) -> None:
        """Its work is gone: the switch home starts (set_role keeps the counts it already took)."""
        to, node.target, node.reclaim_deadline = node.target, None, None
        self.set_role(node, to, self.st.switch[to].sample(self.rng))
        self.slurm_full_scan = self.k8s_full_scan = True

    def grace_over(self, node: Node) -> None:
        """The grace is over: requeue its job (SLURM's JobRequeue default: batch jobs can be), or
        evict its pods (no PodDisruptionBudgets here). The work restarts from the beginning."""
        if node.job is not None:
            job = self.jobs[node.job]
            self.lost_job_node_s += self.undo_start(job.id, self.started, self.job_ran, self.job_wait, self.job_gen) \
                * job.nodes
            self.job_work -= job.nodes * job.runtime
            self.requeued += 1
            self.end_job(job.id)
            self.queue.insert(bisect.bisect_right(self.queue, (job.submit, job.id), key=lambda j: (j.submit, j.id)), job)
            self.slurm_scan_from = 0
        for pod_id in sorted(node.pod_ids):
            pod = self.pod_by_id[pod_id]
            self.lost_pod_s += self.undo_start(pod_id, self.pod_started, self.pod_ran, self.pod_wait, self.pod_gen)
            self.pod_work -= pod.cpu_m * pod.duration
            self.evicted += 1
            self.end_pod(pod)
            self.pending.insert(bisect.bisect_right(self.pending, (pod.arrival, pod.id),
                                                    key=lambda p: (p.arrival, p.id)), pod)
            self.k8s_scan_from = 0

    def undo_start(self, item: int, started: dict, ran: dict, waits: dict, gens: dict) -> float:
        """A job or pod stops before its end (requeued, evicted): the time it ran is lost, its
        wait is taken again at its next start, its pending end event goes stale. Returns the time."""
        lost = self.now - started[item]
        ran[item] = ran.get(item, 0.0) + lost
        waits.pop(item, None)
        gens[item] = gens.get(item, 0) + 1
        return lost

    def ensure_pass(self) -> None:
        if self.kind in ("paper", "provisioner") and not self.pass_pending:
            iv = self.st.pass_interval_s
            t = math.floor(self.now / iv) * iv + iv
            self.push(t, _PASS, None)
            self.pass_pending = True

    # -- accounting -------------------------------------------------------------------

    def account(self, t: float) -> None:
        dt = t - self.last_t
        if dt > 0:
            self.side_time[SLURM] += self.count[SLURM] * dt
            self.side_time[K8S] += self.count[K8S] * dt
            self.last_t = t

    def sample(self, t: float) -> None:
        self.samples.append((t, self.count[SLURM], self.count[K8S], self.switching, len(self.queue), len(self.pending)))

    def set_role(self, node: Node, to: str, duration: float) -> None:
        """Start a switch of an idle node (duration 0: done at once, for the bound)."""
        frm = node.role
        self.account(self.now)
        was_steady = node.phase == STEADY
        if was_steady:
            self.count[frm] -= 1
            if frm == SLURM:
                self.free_slurm.remove(node.index)
                self.slurm_full_scan = True
        if node.last_switch_end is not None and self.now - node.last_switch_end < self.st.flap_window_s:
            self.flaps[to] += 1
        node.role = to
        node.last_switch_at = self.now
        self.switches[to] += 1
        self.switch_s[to] += duration
        if duration <= 0:
            node.phase = BOOTING
            self.finish_switch(node)
            return
        node.phase = BOOTING
        if was_steady:  # a reclaimed node was counted as switching when its reclaim began
            self.switching += 1
        self.push(self.now + duration, _SWITCH_DONE, node.index)

    def finish_switch(self, node: Node) -> None:
        self.account(self.now)
        if node.phase != STEADY and self.now > (node.last_switch_at or 0):
            self.switching -= 1
        node.phase = STEADY
        node.last_switch_end = self.now
        self.count[node.role] += 1
        if node.role == SLURM:
            bisect.insort(self.free_slurm, node.index)
            self.slurm_full_scan = True
        else:
            self.k8s_full_scan = True

    # -- the schedulers ---------------------------------------------------------------

    def schedule(self) -> None:
        if self.kind == "bound":
            self.schedule_bound()
            return
        if self.queue and (self.slurm_full_scan or self.slurm_scan_from < len(self.queue)):
            self.schedule_slurm()
        if self.pending and (self.k8s_full_scan or self.k8s_scan_from < len(self.pending)):
            self.schedule_k8s()

    def floating(self, side: str) -> list[Node]:
        """For the bound: idle steady shared nodes on the other side, free to take at once."""
        return [n for n in self.shared if n.role == OTHER[side] and n.phase == STEADY and not n.busy]

    def schedule_bound(self) -> None:
        # The side whose oldest pending item waits longer goes first.
        first_job = self.queue[0].submit if self.queue else math.inf
        first_pod = self.pending[0].arrival if self.pending else math.inf
        order = (SLURM, K8S) if first_job <= first_pod else (K8S, SLURM)
        for side in order:
            if side == SLURM and self.queue:
                self.slurm_full_scan = True
                self.schedule_slurm(self.floating(SLURM))
            elif side == K8S and self.pending:
                self.k8s_full_scan = True
                self.schedule_k8s(self.floating(K8S))

    def start_job(self, job: Job, extra_nodes: list[Node]) -> None:
        take: list[int] = []
        while len(take) < job.nodes and self.free_slurm:
            take.append(self.free_slurm.pop(0))
        while len(take) < job.nodes:  # the bound: take idle shared nodes from Kubernetes at once
            node = extra_nodes.pop()
            self.set_role(node, SLURM, 0.0)
            self.free_slurm.remove(node.index)
            take.append(node.index)
        for i in take:
            self.nodes[i].job = job.id
        self.running[job.id] = (self.now + job.estimate, take)
        self.job_wait[job.id] = self.now - job.submit - self.job_ran.get(job.id, 0.0)
        self.started[job.id] = self.now
        self.job_work += job.nodes * job.runtime
        self.push(self.now + job.runtime, _JOB_END, (job.id, self.job_gen.get(job.id, 0)))

    def schedule_slurm(self, extra_nodes: list[Node] | None = None) -> None:
        extra_nodes = extra_nodes if extra_nodes is not None else []
        queue = self.queue
        free = len(self.free_slurm) + len(extra_nodes)
        full = self.slurm_full_scan or self.slurm_scan_from == 0
        if full:
            # The head of the queue starts while it fits.
            k = 0
            while k < len(queue) and queue[k].nodes <= free:
                self.start_job(queue[k], extra_nodes)
                free -= queue[k].nodes
                k += 1
            del queue[:k]
            self.slurm_full_scan = False
            self.slurm_scan_from = 1
            if not queue:
                self.slurm_scan_from = 0
                return
            head = queue[0]
            capacity = self.count[SLURM] + len(extra_nodes)
            if head.nodes > capacity:
                # More nodes than SLURM has (the rest lent, drained): slurmctld plans no start for
                # the head, so it reserves nothing and backfills every job that fits now (seen on
                # slurmctld 22.05: 1-node jobs start behind a 4-node job whose 4th node is drained).
                self.shadow, self.extra = math.inf, 0
            else:
                ends = sorted((end, len(nodes)) for end, nodes in self.running.values())
                avail, self.shadow = free, math.inf
                for end, n in ends:
                    avail += n
                    if avail >= head.nodes:
                        self.shadow, self.extra = end, avail - head.nodes
                        break
                else:
                    self.shadow, self.extra = math.inf, 0
        if self.shadow == -math.inf or free <= 0:
            self.slurm_scan_from = len(queue)
            return
        # EASY backfill behind the head, from where the last round stopped.
        started = []
        for k in range(max(1, self.slurm_scan_from), min(len(queue), 1 + BACKFILL_DEPTH)):
            job = queue[k]
            if job.nodes > free:
                continue
            ends_before = self.now + job.estimate <= self.shadow
            if ends_before or job.nodes <= self.extra:
                self.start_job(job, extra_nodes)
                free -= job.nodes
                if not ends_before:
                    self.extra -= job.nodes
                started.append(k)
                if free <= 0:
                    break
        if started:
            gone = set(started)
            self.queue = queue = [j for k, j in enumerate(queue) if k not in gone]
        self.slurm_scan_from = len(queue)

    def schedule_k8s(self, extra_nodes: list[Node] | None = None) -> None:
        nodes = [n for n in self.nodes if n.role == K8S and n.phase == STEADY]
        if extra_nodes:
            nodes += extra_nodes
        start = 0 if self.k8s_full_scan else self.k8s_scan_from
        self.k8s_full_scan = False
        max_free = max((n.free_cpu for n in nodes), default=0)
        placed = set()
        for k in range(start, len(self.pending)):
            if max_free <= 0:
                break
            pod = self.pending[k]
            if pod.cpu_m > max_free:
                continue
            for node in nodes:
                if node.free_cpu >= pod.cpu_m and node.free_mem >= pod.memory and node.free_gpus >= pod.gpus:
                    if node.role != K8S:  # the bound: an idle shared SLURM node, taken at once
                        self.set_role(node, K8S, 0.0)
                    node.free_cpu -= pod.cpu_m
                    node.free_mem -= pod.memory
                    node.free_gpus -= pod.gpus
                    node.pods += 1
                    node.pod_ids.add(pod.id)
                    self.pod_node[pod.id] = node.index
                    self.pod_wait[pod.id] = self.now - pod.arrival - self.pod_ran.get(pod.id, 0.0)
                    self.pod_started[pod.id] = self.now
                    self.pod_work += pod.cpu_m * pod.duration
                    self.push(self.now + pod.duration, _POD_END, (pod, self.pod_gen.get(pod.id, 0)))
                    placed.add(k)
                    if node.free_cpu + pod.cpu_m == max_free:
                        max_free = max((n.free_cpu for n in nodes), default=0)
                    break
        if placed:
            self.pending = [p for k, p in enumerate(self.pending) if k not in placed]
        self.k8s_scan_from = len(self.pending)

    # -- the balancing pass -----------------------------------------------------------

    def balance_pass(self) -> None:
        active = bool(self.queue or self.pending or self.switching)
        if not (self.queue or self.pending):
            self.demand_since = {SLURM: None, K8S: None}
        moves = self.paper_moves() if self.kind == "paper" else self.provisioner_moves()
        for node, to, deadline, work in moves:
            if node.busy:
                self.reclaim(node, to, deadline, work)
            else:
                self.set_role(node, to, self.st.switch[to].sample(self.rng))
        if moves:
            self.slurm_full_scan = self.k8s_full_scan = True
        # Stuck: work pending that nothing will ever serve (nothing runs, switches or arrives).
        idle = not self.running and not self.pod_node and not self.switching and not self.arrivals_left
        self.stuck_passes = self.stuck_passes + 1 if (idle and not moves) else 0
        limit = (self.st.policy.cooldown_s + self.st.policy.demand_persist_s) / self.st.pass_interval_s + 5
        if active and self.stuck_passes <= limit:
            self.ensure_pass()

    def paper_moves(self) -> list[tuple[Node, str, float, str]]:
        want = {SLURM: sum(j.nodes for j in self.queue),
                K8S: math.ceil(sum(p.cpu_m for p in self.pending) / (self.cl.cpus * 1000))}
        moves = []
        for to in (SLURM, K8S):
            frm = OTHER[to]
            if not want[to]:
                continue
            idle = [n for n in self.shared if n.role == frm and n.phase == STEADY and not n.busy]
            moves += [(n, to, self.now, "") for n in idle[:want[to]]]
        return moves

    def provisioner_moves(self) -> list[tuple[Node, str, float, str]]:
        p = self.st.policy
        # decide() moves a node to a side only when that side has pending work (seen for
        # demand_persist_s), a switch slot is free, and an idle steady shared node on the other side
        # is out of its cooldown. When no side passes these checks, decide() would move nothing:
        # skip the call and keep only the persistence clock, as the reconciler's store does.
        movable = self.always_decide or self.releasable()
        if not movable and sum(1 for n in self.shared if n.phase != STEADY) < p.max_in_flight:
            for to, items in ((SLURM, self.queue), (K8S, self.pending)):
                since = self.demand_since[to]
                if not items or (p.demand_persist_s > 0 and (since is None or self.now - since < p.demand_persist_s)):
                    continue
                # SLURM keeps the idle nodes its own queue would fill (decide()'s reservation):
                # with no spare one, only its nodes going home may move to Kubernetes.
                keeps = to == K8S and self.slurm_spare() <= 0
                # The lender at its lending limit lends none of its own home nodes.
                limit = p.lending_limit.get(OTHER[to])
                full = limit is not None and sum(1 for n in self.shared if n.home == OTHER[to] and
                                                 (n.target or n.role) != n.home) >= limit
                if any(n.role != to and n.phase == STEADY and (n.home == to or not n.busy and not keeps and
                       not (full and n.home == n.role) and
                       (n.last_switch_at is None or self.now - n.last_switch_at >= p.cooldown_s)) for n in self.shared):
                    movable = True
                    break
        if not movable:
            for side, items in ((SLURM, self.queue), (K8S, self.pending)):
                if not items:
                    self.demand_since[side] = None
                elif self.demand_since[side] is None:
                    self.demand_since[side] = self.now
            return []
        snap = self.snapshot()
        self.decide_calls += 1
        decision = pol.decide(snap)
        for side, amount in decision.demand.items():
            if amount <= 0:
                self.demand_since[side] = None
            elif self.demand_since[side] is None:
                self.demand_since[side] = self.now
        by_name = {n.name: n for n in self.shared}
        for name in decision.release:
            self.release(by_name[name])
        return [(by_name[m.node], m.to_role, m.deadline, m.work) for m in decision.moves]

    def releasable(self) -> bool:
        """Could decide() release a reclaim in its grace (Decision.release)? Only when the side it
        goes to has more idle or incoming nodes than its pending work wants; for Kubernetes that
        work is at least the pods' CPUs less the room on its busy shared nodes."""
        sides = {n.target for n in self.shared if n.reclaim_deadline is not None and n.reclaim_deadline > self.now}
        if SLURM in sides and self.slurm_spare() > 0:
            return True
        if K8S not in sides:
            return False
        cover = sum(1 for n in self.shared if (n.target or n.role) == K8S and
                    (n.phase not in (STEADY, FAILED) or not n.busy))
        per_node = self.cl.cpus * 1000
        room = sum(n.free_cpu for n in self.shared if n.role == K8S and n.phase == STEADY and n.busy)
        enough, cpu = (2 * len(self.shared) + 1) * per_node, 0
        for p in self.pending:  # as far as the snapshot carries them
            cpu += max(p.cpu_m, 1)
            if cpu >= enough:
                break
        wanted = 0 if cpu <= room else max(1, math.ceil((cpu - room) / per_node))
        return cover > wanted

    def slurm_spare(self) -> int:
        """decide()'s spare SLURM nodes: idle or incoming shared ones beyond what the queue would
        fill (the queue counted as far as the snapshot carries it)."""
        cover = sum(1 for n in self.shared if (n.target or n.role) == SLURM and
                    (n.phase not in (STEADY, FAILED) or not n.busy))
        enough, want = 2 * len(self.shared) + 1, 0
        for j in self.queue:
            want += j.nodes
            if want >= enough:
                break
        return cover - want

    def snapshot(self) -> pol.Snapshot:
        cl = self.cl
        shared = []
        for n in self.shared:
            busy_k8s = n.busy and n.role == K8S
            cost, ends = 0.0, None
            if n.job is not None:
                est_end, job_nodes = self.running[n.job]
                cost, ends = (self.now - self.started[n.job]) * len(job_nodes), est_end
            elif n.pod_ids:
                cost = sum(self.now - self.pod_started[i] for i in n.pod_ids) / len(n.pod_ids)
            shared.append(pol.SharedNode(
                name=n.name, role=n.target or n.role, phase=n.phase, busy=n.busy, available=n.phase == STEADY,
                last_switch_at=n.last_switch_at, cpus=cl.cpus, memory=cl.memory_gb << 30, gpus=cl.gpus,
                k8s_labels=self.labels, home=n.home, room_cpu_m=n.free_cpu if busy_k8s else 0,
                room_memory=n.free_mem if busy_k8s else 0, room_gpus=n.free_gpus if busy_k8s else 0,
                work_cost=cost, work_ends_at=ends,
                reclaim_deadline=n.reclaim_deadline if n.phase in RECLAIMING else None))
        # Pending work in queue order, up to what could fill every shared node: more cannot
        # change a decision (only the wording of its reasons).
        enough = 2 * len(self.shared) + 1
        jobs, nodes = [], 0
        for j in self.queue:
            pj = self.pending_job_cache.get(j.id)
            if pj is None:
                pj = self.pending_job_cache[j.id] = pol.PendingJob(str(j.id), "Resources", (), j.nodes, 1, 0)
            jobs.append(pj)
            nodes += j.nodes
            if nodes >= enough:
                break
        pods, cpu = [], 0
        for p in self.pending:
            pp = self.pending_pod_cache.get(p.id)
            if pp is None:
                pp = self.pending_pod_cache[p.id] = pol.PendingPod("sim", f"pod-{p.id}", p.cpu_m, p.memory, p.gpus)
            pods.append(pp)
            cpu += p.cpu_m
            if cpu >= enough * cl.cpus * 1000:
                break
        return pol.Snapshot(now=self.now, policy=self.st.policy, nodes=tuple(shared), jobs=tuple(jobs),
                            pods=tuple(pods), demand_since=dict(self.demand_since))


def usable(cluster: Cluster, jobs: list[Job], pods: list[Pod]) -> tuple[list[Job], list[Pod], dict]:
    """Work every policy can run: jobs no wider than the static split's SLURM side, pods that fit
    a node. The rest is left out of every run alike, and counted."""
    width = cluster.static_slurm_nodes
    ok_jobs = [j for j in jobs if j.nodes <= width]
    ok_pods = [p for p in pods if p.cpu_m <= cluster.cpus * 1000 and p.memory <= cluster.memory_gb << 30
               and p.gpus <= cluster.gpus]
    return ok_jobs, ok_pods, {"jobs_too_wide": len(jobs) - len(ok_jobs), "pods_too_big": len(pods) - len(ok_pods)}


def simulate(kind: str, cluster: Cluster, jobs: list[Job], pods: list[Pod], settings: Settings) -> Result:
    result = Simulation(kind, cluster, jobs, pods, settings).run()
    if kind == "provisioner":
        p = settings.policy
        result.knobs = {"cooldown_s": p.cooldown_s, "demand_persist_s": p.demand_persist_s,
                        "max_in_flight": p.max_in_flight, "share_rule": p.share_rule,
                        "reclaim_requeue": p.reclaim_requeue,
                        "min_nodes": dict(p.min_nodes)}
    return result


def with_knob(policy: Policy, key: str, value: str) -> Policy:
    """The policy with one knob changed (for --set and --sweep); ValueError names what is wrong."""
    if key.startswith("min_nodes."):
        side = key.split(".", 1)[1]
        if side not in (SLURM, K8S):
            raise ValueError(f"{key}: the sides are {SLURM} and {K8S}")
        return replace(policy, min_nodes={**policy.min_nodes, side: int(value)})
    if key == "share_rule":
        from provisioner.model import SHARE_RULES
        if value not in SHARE_RULES:
            raise ValueError(f"share_rule: one of {', '.join(SHARE_RULES)}")
        return replace(policy, share_rule=value)
    if key.split(".")[0] in ("reclaim_grace_s", "lending_limit") and key.count(".") == 1:
        knob, side = key.split(".")
        if side not in (SLURM, K8S):
            raise ValueError(f"{key}: the sides are {SLURM} and {K8S}")
        n = None if knob == "lending_limit" and value in ("", "none") else int(value)
        if n is not None and n < 0:
            raise ValueError(f"{key}: must be at least 0")
        return replace(policy, **{knob: {**getattr(policy, knob), side: n}})
    if key == "reclaim_requeue":
        from provisioner.model import REQUEUE_RULES
        if value not in REQUEUE_RULES:
            raise ValueError(f"reclaim_requeue: one of {', '.join(REQUEUE_RULES)}")
        return replace(policy, reclaim_requeue=value)
    if key in ("cooldown_s", "demand_persist_s", "max_in_flight"):
        n = int(value)
        if n < (1 if key == "max_in_flight" else 0):
            raise ValueError(f"{key}: must be at least {1 if key == 'max_in_flight' else 0}")
        return replace(policy, **{key: n})
    raise ValueError(f"unknown policy knob {key!r}; known: cooldown_s, demand_persist_s, max_in_flight, "
                     "share_rule, min_nodes.slurm, min_nodes.k8s, reclaim_grace_s.slurm, reclaim_grace_s.k8s, "
                     "lending_limit.slurm, lending_limit.k8s, reclaim_requeue")
