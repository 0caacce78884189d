"""`provisioner simulate` at the issue's size: a 10,000-job SWF trace and as many synthetic pods,
all four policies (static split, the paper's rule, provisioner's decide(), the bound), timed each.
Goal: <= 60 s for the four on this machine. The side-by-side baseline in the same run is
the static split (no balancing at all: the schedulers alone).

With --sim-trace FILE.swf the benchmark replays that trace (e.g. lublin_256.swf); without it, it
writes a synthetic SWF of 10,000 jobs (seeded: the same every run) and replays that."""

from __future__ import annotations

import math
import random
import tempfile
import time
from pathlib import Path

from provisioner.simulate import engine, pods as podsmod, report, swf

TITLE = "provisioner simulate: 10,000 jobs + 10,000 pods, four policies"
GOAL_S = 60.0


def add_arguments(group) -> None:
    group.add_argument("--sim-trace", metavar="FILE.swf",
                       help="the SWF trace to replay (default: a synthetic 10,000-job trace, seeded)")
    group.add_argument("--sim-jobs", type=int, default=10_000, help="jobs in the synthetic trace (default 10,000)")


def synthetic_swf(path: Path, jobs: int, seed: int = 1, machine: int = 256) -> None:
    """Poisson arrivals, power-of-two sizes up to the machine, log-uniform run times (10 s - 1.5 d),
    offered load about 0.95 of `machine` nodes; estimates 1-3x the run time."""
    rng = random.Random(seed)
    sizes = [1 << k for k in range(int(math.log2(machine)) + 1)]
    weights = [1 / (k + 1) for k in range(len(sizes))]
    mean_work = sum(w * s for w, s in zip(weights, sizes)) / sum(weights) * (129600 - 10) / math.log(129600 / 10)
    rate = 0.95 * machine / mean_work
    t = 0.0
    lines = ["; Version: 2", "; Note: synthetic trace for bench/simulate.py", f"; MaxJobs: {jobs}",
             f"; MaxNodes: {machine}", f"; MaxProcs: {machine}"]
    for i in range(1, jobs + 1):
        t += rng.expovariate(rate)
        size = rng.choices(sizes, weights)[0]
        runtime = int(math.exp(rng.uniform(math.log(10), math.log(129600))))
        estimate = int(runtime * rng.uniform(1, 3))
        lines.append(f"{i} {int(t)} -1 {runtime} {size} -1 -1 {size} {estimate} -1 1 -1 -1 -1 0 -1 -1 -1")
    path.write_text("\n".join(lines) + "\n")


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-simulate-") as tmp:
        source = args.sim_trace
        if not source:
            source = str(Path(tmp) / "synthetic.swf")
            synthetic_swf(Path(source), args.sim_jobs)
        t0 = time.perf_counter()
        trace = swf.load(source)
        t_load = time.perf_counter() - t0
    cluster = engine.Cluster()
    span = max(j.submit for j in trace.jobs) or 1.0
    t0 = time.perf_counter()
    pods = podsmod.generate(len(trace.jobs), span, (cluster.k8s_nodes + cluster.start_k8s) * cluster.cpus,
                            0.6, 1, cluster.cpus)
    t_pods = time.perf_counter() - t0
    jobs, pods, left_out = engine.usable(cluster, trace.jobs, pods)
    timings, rows = {}, []
    for kind in engine.POLICIES:
        t0 = time.perf_counter()
        result = engine.simulate(kind, cluster, jobs, pods, engine.Settings())
        timings[kind] = round(time.perf_counter() - t0, 2)
        rows.append(report.row(kind, result))
    total = t_load + t_pods + sum(timings.values())
    return {
        "trace": Path(source).name if args.sim_trace else f"synthetic SWF, {args.sim_jobs} jobs, seed 1",
        "jobs": len(jobs), "pods": len(pods), "left_out": left_out, "span_days": round(span / 86400, 1),
        "load_s": round(t_load, 2), "pods_s": round(t_pods, 2), "seconds": timings, "total_s": round(total, 2),
        "goal_s": GOAL_S, "rows": rows,
    }


def summary(result: dict) -> str:
    s = result["seconds"]
    lines = [
        f"trace: {result['trace']}: {result['jobs']} jobs over {result['span_days']} days, {result['pods']} synthetic "
        f"pods (load 0.6); default cluster (224 SLURM + 32 Kubernetes + 64 shared nodes)",
        "",
        "| policy | seconds | decide() calls |",
        "| --- | ---: | ---: |",
    ]
    calls = {r["policy"]: r["decide_calls"] for r in result["rows"]}
    for kind in engine.POLICIES:
        label = f"{kind} (baseline: no balancing)" if kind == "static" else kind
        lines.append(f"| {label} | {s[kind]:.2f} | {calls[kind]} |")
    lines += [f"| reading the trace + generating the pods | {result['load_s'] + result['pods_s']:.2f} | |",
              f"| **all four** | **{result['total_s']:.2f}** | |", "",
              f"- goal <= {result['goal_s']:.0f} s for all four: "
              f"**{'met' if result['total_s'] <= result['goal_s'] else 'MISSED'}**", "",
              report.markdown_table(result["rows"])]
    return "\n".join(lines)
