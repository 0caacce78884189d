"""policy.decide() on synthetic snapshots: 1,000 and 10,000 shared nodes, 100,000 pending jobs,
50,000 pending pods, with lending and reclaim at work (every node has a home, a third of them
lent to the other side, half each way, all busy and reclaimable; room on busy Kubernetes nodes;
PDB refusals).
Baselines in the same run: decide() on the same snapshots without homes or room (the rules
before lending), and a straightforward reference that checks every pending job and pod against
every node (what the policy does without grouping by shape), capped in time and extrapolated
where it cannot finish."""

from __future__ import annotations

import random
import statistics
import time

from provisioner.model import Policy
from provisioner.policy import PendingJob, PendingPod, SharedNode, Snapshot, decide
from provisioner.states import WAIT

TITLE = "balancer decision: decide() at 1,000 / 10,000 nodes, 100,000 jobs, 50,000 pods"
GOAL_MS = 200.0
BASELINE_BUDGET_S = 10.0


def add_arguments(group) -> None:
    group.add_argument("--decide-repeats", type=int, default=5, help="timed runs per size (median reported)")


def snapshot(n_nodes: int, n_jobs: int, n_pods: int, seed: int = 1, lending: bool = True) -> Snapshot:
    rnd = random.Random(seed)
    now = 1_000_000.0
    shapes = [  # (cpus, memory, gpus, partitions)
        (64, 256 << 30, 0, ("batch",)), (64, 512 << 30, 0, ("batch", "bigmem")),
        (32, 256 << 30, 4, ("gpu",)), (128, 1024 << 30, 8, ("gpu", "ai")),
    ]
    nodes = []
    for i in range(n_nodes):
        cpus, mem, gpus, parts = shapes[i % len(shapes)]
        role = "slurm" if i % 3 else "k8s"
        phase = "steady" if i % 500 else "booting"
        # A third of the nodes are lent (with lending), half each way, and every lent node is busy
        # (it was lent for the borrower's work): with both sides' demand far above the idle nodes
        # they keep, decide()'s moves are then reclaims, both ways (requeue_pays decides the SLURM
        # ones). The same nodes are busy in the baseline without homes.
        lent = i % 3 == 0
        if lent and i % 2:
            role = "slurm"
        busy = rnd.random() < 0.7 or lent
        extra = {}
        if lending:  # a third lent to the other side; busy Kubernetes nodes with room; some PDB refusals
            extra = dict(home=("k8s" if role == "slurm" else "slurm") if lent else role,
                         room_cpu_m=rnd.choice([0, 1000, 8000, 16000]) if busy and role == "k8s" else 0,
                         room_memory=rnd.choice([0, 8 << 30, 64 << 30]) if busy and role == "k8s" else 0,
                         work_cost=rnd.uniform(0, 1e6) if busy else 0.0,
                         work_ends_at=now + rnd.randint(0, 86400) if busy else None,
                         movable=rnd.random() > 0.1,
                         evict_refused_at=now - 60 if i % 211 == 0 else None,
                         evict_refused="Cannot evict pod as it would violate the pod's disruption budget.")
        nodes.append(SharedNode(
            name=f"sn{i:05d}", role=role, phase=phase, pinned=i % 97 == 0, busy=busy,
            available=rnd.random() > 0.02, last_switch_at=now - rnd.randint(0, 7200), cpus=cpus, memory=mem,
            gpus=gpus, partitions=parts, k8s_labels=(("sched", "k8s"), ("zone", f"z{i % 4}")), **extra,
        ))
    reasons = ["Resources"] * 6 + ["Priority"] * 3 + ["Dependency"]
    parts = ["batch", "bigmem", "gpu", "ai", "debug"]
    jobs = tuple(PendingJob(str(j), rnd.choice(reasons), (rnd.choice(parts),), rnd.choice([1, 1, 1, 2, 4, 16]),
                            rnd.choice([1, 4, 16, 32, 64, 128]), rnd.choice([0, 0, 0, 1, 4]))
                 for j in range(n_jobs))
    pods = tuple(PendingPod(f"ns{p % 40}", f"pod{p}", rnd.choice([100, 500, 1000, 4000, 16000]),
                            rnd.choice([1 << 28, 1 << 30, 8 << 30]), rnd.choice([0, 0, 0, 1]),
                            rnd.choice([(), (), (("zone", f"z{p % 5}"),), (("sched", "slurm"),)]))
                 for p in range(n_pods))
    policy = Policy(min_nodes={"slurm": 10, "k8s": 10}, max_in_flight=max(2, n_nodes // 100), demand_persist_s=60,
                    lending_limit={"slurm": n_nodes // 2, "k8s": None} if lending else {"slurm": None, "k8s": None})
    return Snapshot(now=now, policy=policy, nodes=tuple(nodes), jobs=jobs, pods=pods,
                    demand_since={"slurm": now - 600, "k8s": now - 600})


def reference_demand(snap: Snapshot, budget_s: float) -> tuple[float, float]:
    """Per item, scan the nodes for one that serves it. Returns (seconds, fraction done)."""
    from provisioner.policy import node_serves_job, node_serves_pod

    items = [("j", j) for j in snap.jobs if j.reason in snap.slurm_reasons] + [("p", p) for p in snap.pods]
    start = time.perf_counter()
    done = 0
    for kind, item in items:
        check = node_serves_job if kind == "j" else node_serves_pod
        any(check(n, item) for n in snap.nodes)
        done += 1
        if done % 256 == 0 and time.perf_counter() - start > budget_s:
            break
    return time.perf_counter() - start, done / len(items)


def run(args) -> dict:
    repeats = getattr(args, "decide_repeats", 5)
    sizes = []
    for n_nodes in (1_000, 10_000):
        snap = snapshot(n_nodes, 100_000, 50_000)
        times, d = timed(snap, repeats)
        plain, _ = timed(snapshot(n_nodes, 100_000, 50_000, lending=False), repeats)
        ref_s, frac = reference_demand(snap, BASELINE_BUDGET_S)
        sizes.append({
            "nodes": n_nodes, "jobs": len(snap.jobs), "pods": len(snap.pods),
            "decide_ms_median": round(statistics.median(times), 1), "decide_ms_min": round(min(times), 1),
            "decide_ms_max": round(max(times), 1), "moves": len(d.moves), "notes": len(d.notes),
            "reclaims": sum(1 for m in d.moves if m.reclaim), "held": len(d.held),
            "reclaims_waiting": sum(1 for m in d.moves if m.work == WAIT),
            "no_lending_ms_median": round(statistics.median(plain), 1),
            "reference_ms": round(ref_s * 1000 / frac, 0), "reference_extrapolated": frac < 1.0,
        })
    return {"sizes": sizes, "goal_ms": GOAL_MS, "repeats": repeats,
            "met": sizes[-1]["decide_ms_median"] <= GOAL_MS}


def timed(snap: Snapshot, repeats: int) -> tuple[list[float], object]:
    decide(snap)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        d = decide(snap)
        times.append((time.perf_counter() - t) * 1000)
    return times, d


def summary(result: dict) -> str:
    lines = ["| nodes | jobs | pods | decide() with lending, median ms (min-max) | moves (reclaims, of them waiting; held) | "
             "baseline: without homes or room, median ms | per-item node scan (baseline) ms | speed-up |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in result["sizes"]:
        ref = f"{s['reference_ms']:,.0f}" + (" (extrapolated)" if s["reference_extrapolated"] else "")
        lines.append(f"| {s['nodes']:,} | {s['jobs']:,} | {s['pods']:,} | {s['decide_ms_median']:.1f} "
                     f"({s['decide_ms_min']:.1f}-{s['decide_ms_max']:.1f}) | {s['moves']} ({s['reclaims']}, "
                     f"{s['reclaims_waiting']}; {s['held']}) | {s['no_lending_ms_median']:.1f} | {ref} | "
                     f"{s['reference_ms'] / max(s['decide_ms_median'], 1e-9):,.0f} x |")
    last = result["sizes"][-1]
    lines.append("")
    lines.append(f"- <= {result['goal_ms']:g} ms at {last['nodes']:,} nodes: {last['decide_ms_median']:.1f} ms: "
                 f"{'met' if result['met'] else 'MISSED'}")
    return "\n".join(lines)
