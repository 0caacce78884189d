"""A synthetic workload that makes both sides bursty and wide, with a seed.

Busy and quiet periods alternate (`period_s` each) and the two sides are out of phase: while
SLURM's jobs come in a burst, Kubernetes is quiet, and the other way round, so each side's home
nodes are idle for the other to borrow and wanted back when its own burst starts.
- jobs: Poisson arrivals at `busy_load` of the static SLURM side's node-seconds in a busy period,
  `quiet_load` in a quiet one; sizes: half 1 node, a third 2-8 nodes, the rest from 9 nodes up
  to the whole static SLURM side (wider than its fixed nodes: they need the shared pool); run
  times exponential (mean `job_mean_s`, 1 min to 24 x the mean), estimates 1-3 x the run time;
- pods: the same for the static Kubernetes side's cores, 4-32 cores (as `pods.generate`),
  4 GiB a core, exponential durations (mean `pod_mean_s`).
"""

from __future__ import annotations

import random

from provisioner.simulate.engine import Cluster
from provisioner.simulate.pods import GIB, SIZES, Pod
from provisioner.simulate.swf import Job


def _arrivals(rng: random.Random, span_s: float, period_s: float, busy_rate: float, quiet_rate: float,
              busy_first: bool) -> list[float]:
    out, t = [], 0.0
    while t < span_s:
        busy = (int(t // period_s) % 2 == 0) == busy_first
        rate = busy_rate if busy else quiet_rate
        step = rng.expovariate(rate) if rate > 0 else period_s
        end = (t // period_s + 1) * period_s
        if t + step >= end:  # no arrival before the period changes: start over at its end
            t = end
            continue
        t += step
        out.append(t)
    return [a for a in out if a < span_s]


def workload(cluster: Cluster, span_s: float, seed: int = 1, period_s: float = 86400.0,
             busy_load: float = 1.2, quiet_load: float = 0.2, job_mean_s: float = 3600.0,
             pod_mean_s: float = 1800.0) -> tuple[list[Job], list[Pod]]:
    rng = random.Random(seed)
    width = cluster.static_slurm_nodes
    wide_from = min(9, width)
    mean_nodes = 0.5 * 1 + 1 / 3 * 5 + 1 / 6 * (wide_from + width) / 2
    job_rate = width / (mean_nodes * job_mean_s)  # jobs per second that fill the side
    jobs = []
    for i, t in enumerate(_arrivals(rng, span_s, period_s, busy_load * job_rate, quiet_load * job_rate, True)):
        u = rng.random()
        n = 1 if u < 0.5 else rng.randint(2, max(2, min(8, width))) if u < 5 / 6 else rng.randint(wide_from, width)
        runtime = min(max(60.0, rng.expovariate(1 / job_mean_s)), 24 * job_mean_s)
        jobs.append(Job(i + 1, t, runtime, min(n, width), runtime * rng.uniform(1, 3)))
    cores = (cluster.k8s_nodes + cluster.start_k8s) * cluster.cpus
    pod_sizes = [min(s, cluster.cpus) for s in SIZES]
    pod_rate = cores / (sum(pod_sizes) / len(pod_sizes) * pod_mean_s)
    pods = []
    for i, t in enumerate(_arrivals(rng, span_s, period_s, busy_load * pod_rate, quiet_load * pod_rate, False)):
        c = rng.choice(pod_sizes)
        pods.append(Pod(i, t, rng.expovariate(1 / pod_mean_s), c * 1000, c * 4 * GIB, 0))
    return jobs, pods
