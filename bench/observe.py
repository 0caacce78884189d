"""One balance pass's look at the world against the real parts: observe (SLURM + Kubernetes) and
decide, with 1,000 shared nodes, 10,000 pending pods and pending SLURM jobs.

- Kubernetes: a real control plane (testbed/), 1,000 Node objects (registered as kubelets do,
  cordoned: the shared nodes on the SLURM side), 10,000 pods the real scheduler marked
  Unschedulable, created through the API;
- SLURM: a real slurmctld with the same 1,000 nodes declared (no slurmd: down) and pending jobs;
- the pass's own code: Reconciler.observe() (the adapters) + snapshot + policy.decide().

The number of requests the API server served for one pass comes from its audit log, at 1,000
and at 10,000 pending pods in the same run: it grows by one page per LIST_PAGE pods, never per
pod. Baseline in the same run: the first landing's way to read the same three lists (the client's
model objects, one unpaged list each)."""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from provisioner import config, policy as pol
from provisioner.clusters.kubernetes import LIST_PAGE, KubernetesAdapter
from provisioner.reconcile import Reconciler, World
from provisioner.store import Store
from testbed.kube_api import ns_path
from testbed.kube_cluster import KubeCluster
from testbed.kubelets import SimKubelet
from testbed.wait import wait_for
from testbed.site import mac, write_site
from testbed.slurm_cluster import SlurmCluster

TITLE = "observe + decide: one pass's look at 1,000 nodes and 10,000 pending pods (real API server, real slurmctld)"
GOAL_S = 3.0


def add_arguments(group) -> None:
    group.add_argument("--observe-nodes", type=int, default=1000, help="shared nodes")
    group.add_argument("--observe-pods", type=int, default=10000, help="pending pods (the larger size)")
    group.add_argument("--observe-jobs", type=int, default=300, help="pending SLURM jobs")
    group.add_argument("--observe-repeats", type=int, default=5, help="timed passes per size (median reported)")


def _create(kube: KubeCluster, paths_bodies: list[tuple[str, dict]]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda pb: kube.api.create(*pb), paths_bodies))


def _add_pods(kube: KubeCluster, start: int, count: int) -> None:
    spec = kube.pod_spec({"cpu": "500m", "memory": "256Mi"})
    _create(kube, [(ns_path("pods", "bench"), {"metadata": {"name": f"p{i:05d}", "namespace": "bench"},
                                                "spec": spec}) for i in range(start, start + count)])


def _unschedulable(kube: KubeCluster) -> int:
    n = 0
    for p in kube.api.items(ns_path("pods", "bench"), fieldSelector="status.phase=Pending"):
        c = next((c for c in (p.get("status") or {}).get("conditions") or [] if c["type"] == "PodScheduled"), {})
        n += c.get("reason") == "Unschedulable"
    return n


def _measure(site, store, kube: KubeCluster, repeats: int) -> dict:
    parts: dict[str, list[float]] = {"slurm": [], "pending_pods": [], "kube_nodes": [], "decide": [], "total": []}
    requests = []
    for _ in range(repeats):
        mark = kube.plane.audit_mark()
        rec = Reconciler(site, store)
        t0 = time.perf_counter()
        snap_s = rec.slurm.observe()
        t1 = time.perf_counter()
        pods = rec.kube.pending_pods()
        t2 = time.perf_counter()
        nodes = rec.kube.nodes(rec.shared)
        t3 = time.perf_counter()
        # The same calls as Reconciler.observe(), timed apart.
        world = World(snap_s.nodes, tuple(snap_s.pending), nodes, tuple(pods), store.nodes(rec.shared))
        decision = pol.decide(rec.snapshot(world, record_demand=False))
        t4 = time.perf_counter()
        rec.kube.close()
        time.sleep(0.3)  # the audit log is written as requests complete
        requests.append(len(kube.plane.audit(mark)))
        for k, v in (("slurm", t1 - t0), ("pending_pods", t2 - t1), ("kube_nodes", t3 - t2), ("decide", t4 - t3),
                     ("total", t4 - t0)):
            parts[k].append(v)
    return {"median_s": {k: round(statistics.median(v), 3) for k, v in parts.items()},
            "max_total_s": round(max(parts["total"]), 3), "requests": requests, "pending_pods_seen": len(pods),
            "pending_jobs_seen": len(snap_s.pending), "kube_nodes_seen": len(nodes), "moves": len(decision.moves)}


def _baseline(kube: KubeCluster, site, repeats: int) -> float:
    """The first landing's reads: typed model objects, unpaged."""
    times = []
    for _ in range(repeats):
        adapter = KubernetesAdapter(site.kubernetes)
        t = time.perf_counter()
        adapter.core.list_pod_for_all_namespaces(field_selector="status.phase=Pending", _request_timeout=120)
        adapter.core.list_node(_request_timeout=120)
        adapter.core.list_pod_for_all_namespaces(field_selector="status.phase!=Succeeded,status.phase!=Failed",
                                                 _request_timeout=120)
        times.append(time.perf_counter() - t)
        adapter.close()
    return round(statistics.median(times), 3)


def run(args) -> dict:
    n_nodes = getattr(args, "observe_nodes", 1000)
    n_pods = getattr(args, "observe_pods", 10000)
    n_jobs = getattr(args, "observe_jobs", 300)
    repeats = getattr(args, "observe_repeats", 5)
    small = max(1, n_pods // 10)
    work = Path(tempfile.mkdtemp(prefix="bench-observe-"))
    names = [f"sn{i:04d}" for i in range(1, n_nodes + 1)]
    slurm = SlurmCluster(work / "slurm", nodes=[f"sn[0001-{n_nodes:04d}]"], started=[])
    # No heartbeats for 1,000 simulated kubelets: the grace period outlasts the benchmark.
    kube = KubeCluster(work / "kube", grace_s=3600)
    timings: dict[str, float] = {}
    try:
        t = time.monotonic()
        slurm.start()
        kube.start()
        timings["start_s"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        status = kube.kubelets._status
        _create(kube, [(ns_path("nodes"), {
            "metadata": {"name": n, "labels": {"kubernetes.io/hostname": n, "sched": "slurm"},
                         "annotations": {"provisioner/cordoned": "true"}},
            "spec": {"unschedulable": True},
            "status": status(SimKubelet(n, "64", "256Gi", ip=f"10.1.{i // 250}.{i % 250 + 1}"))})
            for i, n in enumerate(names)])
        timings["nodes_s"] = round(time.monotonic() - t, 1)
        for _ in range(n_jobs):  # pending: every node is down (no slurmd)
            slurm.run("sbatch", "--parsable", "--job-name=bench", f"--output={work}/job-%j.out", "--wrap=sleep 600")
        site_path = write_site(
            work / "site", nodes=[{"name": f"sn[0001-{n_nodes:04d}]", "pool": "shared", "default_role": "slurm",
                                   "macs": [mac(i, 3) for i in range(1, n_nodes + 1)],
                                   "bmc": {"address": "127.0.0.1"}}],
            slurm=slurm.site_section(),
            kubernetes={"kubeconfig": str(kube.provisioner_kubeconfig), "timeout_s": 120})
        site = config.load(site_path)
        store = Store(site.store)
        store.seed((n.name, n.default_role) for n in site.nodes.values())
        kube.namespace("bench")

        results = {}
        created = 0
        for size in (small, n_pods):
            t = time.monotonic()
            _add_pods(kube, created, size - created)
            created = size
            timings[f"create_{size}_pods_s"] = round(time.monotonic() - t, 1)
            t = time.monotonic()
            wait_for(lambda: _unschedulable(kube) >= size, 600, f"{size} pods Unschedulable", interval=2)
            timings[f"schedule_{size}_pods_s"] = round(time.monotonic() - t, 1)
            results[size] = _measure(site, store, kube, repeats)
            results[size]["baseline_s"] = _baseline(kube, site, max(1, repeats // 2))
        store.close()
    finally:
        kube.stop()
        slurm.stop()
    big = results[n_pods]
    return {"nodes": n_nodes, "jobs": n_jobs, "sizes": {str(k): v for k, v in results.items()}, "setup": timings,
            "goal_s": GOAL_S, "page": LIST_PAGE, "met": big["median_s"]["total"] <= GOAL_S}


def summary(result: dict) -> str:
    lines = [f"{result['nodes']:,} shared nodes, {result['jobs']} pending SLURM jobs; one pass's observe + decide "
             "(median of the timed passes):", "",
             "| pending pods | SLURM s | pending pods s | nodes + their pods s | decide s | **total s** | API requests "
             "per pass | first landing's reads (baseline) s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for size, r in result["sizes"].items():
        m = r["median_s"]
        lines.append(f"| {int(size):,} | {m['slurm']:.2f} | {m['pending_pods']:.2f} | {m['kube_nodes']:.2f} | "
                     f"{m['decide']:.2f} | **{m['total']:.2f}** | {'/'.join(map(str, sorted(set(r['requests']))))} | "
                     f"{r['baseline_s']:.2f} |")
    big = result["sizes"][max(result["sizes"], key=int)]
    lines += ["", f"- <= {result['goal_s']:g} s at {int(max(result['sizes'], key=int)):,} pending pods: "
              f"{big['median_s']['total']:.2f} s (worst {big['max_total_s']:.2f} s): "
              f"{'met' if result['met'] else 'MISSED'}",
              f"- requests: paged lists of {result['page']} items, no per-pod or per-node call",
              f"- set-up: {result['setup']}"]
    return "\n".join(lines)
