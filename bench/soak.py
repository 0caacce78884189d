"""The soak (testbed/soak.py) as a benchmark: `make soak` (SOAK_S seconds, default 900; SOAK_SEED
to replay a seed). Its own Kubernetes control plane, PostgreSQL and SimSite in a temporary folder;
two `provisioner run` hosts sharing the store, a seeded workload and seeded faults. The figures:
switches done and faults injected, and the counters that must be 0. Not in the default `make
bench` (it takes SOAK_S): run it by name."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from testbed.kube_cluster import KubeCluster
from testbed.postgres import PostgresServer
from testbed.simnodes import SimSite
from testbed.soak import Soak

TITLE = "soak: switches done under random faults, two `provisioner run` hosts on PostgreSQL (must-be-0 counters)"
BY_NAME_ONLY = True  # bench.run runs it only when named


def add_arguments(group) -> None:
    group.add_argument("--soak-s", type=float, default=float(os.environ.get("SOAK_S") or 900),
                       help="seconds of workload and faults (default $SOAK_S or 900)")
    group.add_argument("--soak-seed", type=int, default=int(os.environ["SOAK_SEED"]) if os.environ.get("SOAK_SEED")
                       else None, help="the seed to replay (default $SOAK_SEED or a new one, printed)")
    group.add_argument("--soak-keep", action="store_true", help="keep the temporary folder (the daemons' logs)")


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    kube, pg, sim = KubeCluster(work / "kube"), PostgresServer(), None
    started = time.monotonic()
    try:
        kube.start()
        pg.start()
        sim = SimSite(work / "sim", kube=kube, shared="sk[01-04]", fixed_k8s="kk01",
                      store=pg.site_store("soak", work / "sim" / "host-a"))
        sim.start()
        result = Soak(sim, pg, seed=args.soak_seed, duration_s=args.soak_s,
                      log=lambda line: print(line, file=sys.stderr, flush=True)).run()
    finally:
        if sim is not None:
            sim.stop()
        pg.stop()
        kube.stop()
        if not args.soak_keep:
            shutil.rmtree(work, ignore_errors=True)
    return {**result.as_dict(), "seconds": round(time.monotonic() - started, 1)}


def summary(result: dict) -> str:
    faults = ", ".join(f"{k} {v}" for k, v in sorted(result["faults_injected"].items())) or "none"
    rows = [("switches done", result["switches_done"], ""),
            ("faults injected", result["faults_total"], faults),
            ("nodes stranded", len(result["nodes_stranded"]), "must be 0"),
            ("jobs or pods killed by a switch", len(result["work_killed"]), "must be 0"),
            ("double power actions", len(result["double_power"]), "must be 0"),
            ("asks unanswered", len(result["asks_unanswered"]), "must be 0"),
            ("harness errors outside a fault's window", len(result["harness_errors"]),
             f"must be 0 ({len(result['expected_errors'])} inside one)"),
            ("power actions the harness could not check for work", len(result["unverified_power"]),
             "a cluster was down at that moment")]
    lines = [f"seed {result['seed']}, {result['duration_s']:.0f} s of faults and workload "
             f"({result['jobs_submitted']} jobs, {result['pods_created']} pods, {result['asks_made']} asks), "
             f"settled in {result['settle_s']:.0f} s; {'OK' if result['ok'] else 'FAILED'}", "",
             "| counter | value | note |", "| --- | ---: | --- |"]
    lines += [f"| {name} | {value} | {note} |" for name, value, note in rows]
    for key in ("nodes_stranded", "work_killed", "double_power", "asks_unanswered", "harness_errors"):
        lines += [f"- {key}: {item}" for item in result[key][:10]]
    return "\n".join(lines)
