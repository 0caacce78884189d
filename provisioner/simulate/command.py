"""`provisioner simulate`: its options, and the run (the CLI only hands over the parsed args).

Exit codes: 0 ok; 2 a usage error (a malformed trace names the file and the line); 1 the plots
could not be written (matplotlib missing: the message says what to install).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from provisioner.errors import UsageError
from provisioner.model import Policy
from provisioner.policy import reclaim_bound
from provisioner.simulate import engine, pods as podsmod, report, swf
from provisioner.states import K8S, SLURM

DEFAULT_POD_LOAD = 0.6


def add_arguments(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("workload")
    g.add_argument("--slurm-trace", metavar="FILE.swf",
                   help="SLURM jobs in the Parallel Workloads Archive's SWF")
    g.add_argument("--synthetic", type=float, metavar="DAYS",
                   help="instead of traces: DAYS of the synthetic workload with both sides bursty (out of phase) "
                        "and wide jobs (provisioner/simulate/synthetic.py; --seed applies)")
    g.add_argument("--procs-per-node", type=int, metavar="N",
                   help="SWF processors per node (default: the header's MaxProcs / MaxNodes, else 1)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed SWF lines and count them (default: stop at the first, naming it)")
    g.add_argument("--pod-trace", metavar="FILE.csv",
                   help="pods: CSV with the columns arrival,duration,cpu,memory,gpus (s, s, cores, GiB, count); "
                        "default: the synthetic generator")
    g.add_argument("--pods", type=int, metavar="N", help="synthetic pods (default: as many as the trace's jobs)")
    g.add_argument("--pod-load", type=float, default=DEFAULT_POD_LOAD, metavar="F",
                   help=f"synthetic pods' offered CPU load, as a fraction of the static Kubernetes side "
                        f"(default {DEFAULT_POD_LOAD})")
    g.add_argument("--seed", type=int, default=1, help="for the pod generator and the switch times (default 1)")
    g = sp.add_argument_group("cluster")
    d = engine.Cluster()
    g.add_argument("--slurm-nodes", type=int, default=d.slurm_nodes, help=f"fixed SLURM nodes (default {d.slurm_nodes})")
    g.add_argument("--k8s-nodes", type=int, default=d.k8s_nodes, help=f"fixed Kubernetes nodes (default {d.k8s_nodes})")
    g.add_argument("--shared-nodes", type=int, default=d.shared_nodes, help=f"shared nodes (default {d.shared_nodes})")
    g.add_argument("--static-k8s", type=int, metavar="N",
                   help="shared nodes in Kubernetes at the start and in the static split (default: half)")
    g.add_argument("--node-cpus", type=int, default=d.cpus, help=f"cores per node (default {d.cpus})")
    g.add_argument("--node-memory-gb", type=int, default=d.memory_gb, help=f"GiB per node (default {d.memory_gb})")
    g.add_argument("--node-gpus", type=int, default=d.gpus, help=f"GPUs per node (default {d.gpus})")
    g = sp.add_argument_group("policy")
    g.add_argument("--site", metavar="SITE.yaml", help="take provisioner's knobs from this site's policy: section "
                                                     "(default: the built-in defaults)")
    g.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                   help="change a knob: cooldown_s, demand_persist_s, max_in_flight, share_rule, min_nodes.SIDE, "
                        "reclaim_grace_s.SIDE, lending_limit.SIDE, reclaim_requeue (SIDE: slurm or k8s; repeatable)")
    g.add_argument("--sweep", metavar="KNOB=V1,V2,...",
                   help="one provisioner row per value, e.g. cooldown_s=0,300,600")
    g.add_argument("--policies", default=",".join(engine.POLICIES),
                   help=f"which to run (default: {','.join(engine.POLICIES)})")
    g.add_argument("--switch-time", action="append", default=[], metavar="[to-slurm=|to-k8s=]DIST",
                   help="switch time: vm (default: the VM benchmark's measured switches, to slurm uniform 37.7-37.9 s, "
                        "to k8s uniform 62.1-75.1 s), SECONDS, uniform:LO:HI or normal:MEAN:SD; prefix to-slurm= or "
                        "to-k8s= for one direction (repeatable)")
    g.add_argument("--pass-interval", type=float, default=60.0, metavar="S",
                   help="seconds between balancing passes (cron: 60)")
    g.add_argument("--flap-window", type=float, default=1800.0, metavar="S",
                   help="a node moved back within this long after its last switch is a flap (default 1800)")
    g = sp.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    g.add_argument("--plots", default="simulate-plots", metavar="DIR",
                   help="write the PNG plots here (default: simulate-plots/)")
    g.add_argument("--no-plots", action="store_true", help="write no plots (no matplotlib needed)")


def parse_dist(text: str) -> engine.Dist:
    t = text.strip()
    try:
        if t == "vm":
            raise LookupError
        if ":" not in t:
            return engine.Dist("fixed", _nonneg(float(t)))
        kind, rest = t.split(":", 1)
        a, b = (float(x) for x in rest.split(":"))
        if kind == "uniform" and 0 <= a <= b:
            return engine.Dist("uniform", a, b)
        if kind == "normal" and a >= 0 and b >= 0:
            return engine.Dist("normal", a, b)
    except ValueError:
        pass
    raise UsageError(f"--switch-time {text!r}: use vm, SECONDS, uniform:LO:HI or normal:MEAN:SD")


def _nonneg(x: float) -> float:
    if x < 0:
        raise ValueError
    return x


def switch_times(specs: list[str]) -> dict:
    out = dict(engine.VM_SWITCH)
    for spec in specs:
        sides = (SLURM, K8S)
        if "=" in spec:
            which, spec = spec.split("=", 1)
            if which not in ("to-slurm", "to-k8s"):
                raise UsageError(f"--switch-time {which}=...: the directions are to-slurm and to-k8s")
            sides = (which[3:],)
        for side in sides:
            out[side] = engine.VM_SWITCH[side] if spec.strip() == "vm" else parse_dist(spec)
    return out


def knobs(args) -> Policy:
    policy = Policy()
    if args.site:
        from provisioner import config as configmod
        policy = configmod.load(args.site, check_files=False).policy
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: use KNOB=VALUE")
        try:
            policy = engine.with_knob(policy, key.strip(), value.strip())
        except ValueError as exc:
            raise UsageError(f"--set {item}: {exc}") from None
    return policy


def sweep_values(args, policy: Policy) -> list[tuple[str, Policy]]:
    if not args.sweep:
        return [("provisioner", policy)]
    key, sep, values = args.sweep.partition("=")
    if not sep or not values:
        raise UsageError(f"--sweep {args.sweep!r}: use KNOB=V1,V2,...")
    out = []
    for v in values.split(","):
        try:
            out.append((f"provisioner {key}={v}", engine.with_knob(policy, key.strip(), v.strip())))
        except ValueError as exc:
            raise UsageError(f"--sweep {args.sweep}: {exc}") from None
    return out


def run(args) -> int:
    kinds = [k.strip() for k in args.policies.split(",") if k.strip()]
    bad = [k for k in kinds if k not in engine.POLICIES]
    if bad or not kinds:
        raise UsageError(f"--policies: unknown {', '.join(bad) or '(none)'}; known: {', '.join(engine.POLICIES)}")
    for name in ("slurm_nodes", "k8s_nodes", "shared_nodes", "node_cpus", "node_memory_gb", "node_gpus"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative")
    if args.pass_interval <= 0 or args.node_cpus <= 0:
        raise UsageError("--pass-interval and --node-cpus must be positive")
    policy = knobs(args)  # a broken --site is a ConfigError naming the file and the field: exit 2
    runs = sweep_values(args, policy)
    cluster = engine.Cluster(args.slurm_nodes, args.k8s_nodes, args.shared_nodes, args.static_k8s,
                             args.node_cpus, args.node_memory_gb, args.node_gpus)
    started = time.monotonic()
    if (args.slurm_trace is None) == (args.synthetic is None):
        raise UsageError("give --slurm-trace FILE.swf or --synthetic DAYS (one of them)")
    if args.synthetic is not None:
        if args.synthetic <= 0:
            raise UsageError("--synthetic DAYS must be positive")
        from provisioner.simulate import synthetic
        sjobs, spods = synthetic.workload(cluster, args.synthetic * 86400, args.seed)
        trace = swf.Trace(sjobs, path=f"synthetic ({args.synthetic:g} days, seed {args.seed})")
        args.slurm_trace = trace.path
    else:
        trace = swf.load(args.slurm_trace, args.procs_per_node, args.skip_bad_lines)
    if not trace.jobs:
        raise UsageError(f"{args.slurm_trace}: no job to replay (empty trace, or every job cancelled)")
    span = max(j.submit for j in trace.jobs) or 1.0
    static_k8s_cores = (cluster.k8s_nodes + cluster.start_k8s) * cluster.cpus
    if args.synthetic is not None and not args.pod_trace:
        pods = spods
        pod_source = f"synthetic: bursty, out of phase with the jobs, seed {args.seed}"
    elif args.pod_trace:
        pods = podsmod.load_csv(args.pod_trace)
        pod_source = args.pod_trace
    else:
        count = len(trace.jobs) if args.pods is None else args.pods
        pods = podsmod.generate(count, span, static_k8s_cores, args.pod_load, args.seed, cluster.cpus)
        pod_source = f"synthetic: {count} pods, offered load {args.pod_load} of the static Kubernetes side, seed {args.seed}"
    jobs, pods, left_out = engine.usable(cluster, trace.jobs, pods)
    settings = engine.Settings(policy=policy, switch=switch_times(args.switch_time), pass_interval_s=args.pass_interval,
                               flap_window_s=args.flap_window, seed=args.seed)

    results: list[tuple[str, engine.Result]] = []
    for kind in kinds:
        if kind == "provisioner":
            for label, pol in runs:
                results.append((label, engine.simulate(kind, cluster, jobs, pods, engine.Settings(
                    policy=pol, switch=settings.switch, pass_interval_s=settings.pass_interval_s,
                    flap_window_s=settings.flap_window_s, seed=settings.seed))))
        else:
            results.append((kind, engine.simulate(kind, cluster, jobs, pods, settings)))
    rows = [report.row(label, r) for label, r in results]
    elapsed = time.monotonic() - started
    files = [] if args.no_plots else report.plot(results, args.plots)

    info = {
        "slurm_trace": {"file": args.slurm_trace, "jobs": len(jobs), "skipped_unusable": trace.skipped_unusable,
                        "skipped_malformed": trace.skipped_malformed, "procs_per_node": trace.procs_per_node,
                        "span_days": round(span / 86400, 2), "left_out_too_wide": left_out["jobs_too_wide"]},
        "pods": {"source": pod_source, "pods": len(pods), "left_out_too_big": left_out["pods_too_big"]},
        "cluster": {"slurm_nodes": cluster.slurm_nodes, "k8s_nodes": cluster.k8s_nodes,
                    "shared_nodes": cluster.shared_nodes, "static_k8s": cluster.start_k8s, "cpus": cluster.cpus,
                    "memory_gb": cluster.memory_gb, "gpus": cluster.gpus},
        "switch_time": {side: str(d) for side, d in settings.switch.items()},
        "pass_interval_s": settings.pass_interval_s, "flap_window_s": settings.flap_window_s,
        "provisioner_knobs": {"cooldown_s": policy.cooldown_s, "demand_persist_s": policy.demand_persist_s,
                              "max_in_flight": policy.max_in_flight, "share_rule": policy.share_rule,
                              "min_nodes": dict(policy.min_nodes), "reclaim_grace_s": dict(policy.reclaim_grace_s),
                              "lending_limit": dict(policy.lending_limit),
                              "reclaim_requeue": policy.reclaim_requeue},
        # How much later than the static split a side may see its lent node back (persistence,
        # a pass, the borrower's grace, the longest switch home).
        "reclaim_bound_s": {side: reclaim_bound(policy, side, settings.pass_interval_s,
                                                max(settings.switch[side].a, settings.switch[side].b))
                            for side in (SLURM, K8S)},
        "seconds": round(elapsed, 2),
        "plots": [str(f) for f in files],
    }
    if args.json:
        json.dump({**info, "rows": rows}, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return 0
    t, p, c = info["slurm_trace"], info["pods"], info["cluster"]
    print(f"SLURM trace {t['file']}: {t['jobs']} jobs over {t['span_days']} days ({t['procs_per_node']} processor(s) "
          f"per node; skipped: {t['skipped_unusable']} cancelled or incomplete, {t['skipped_malformed']} malformed, "
          f"{t['left_out_too_wide']} wider than the static SLURM side)")
    print(f"pods: {p['source']} ({p['pods']} pods; {p['left_out_too_big']} bigger than a node left out)")
    print(f"cluster: {c['slurm_nodes']} SLURM + {c['k8s_nodes']} Kubernetes + {c['shared_nodes']} shared nodes "
          f"({c['static_k8s']} of them in Kubernetes in the static split), {c['cpus']} cores, {c['memory_gb']} GiB, "
          f"{c['gpus']} GPUs each")
    k = info["provisioner_knobs"]
    print(f"provisioner's knobs: cooldown_s={k['cooldown_s']} demand_persist_s={k['demand_persist_s']} "
          f"max_in_flight={k['max_in_flight']} share_rule={k['share_rule']} min_nodes={k['min_nodes']}; "
          f"passes every {settings.pass_interval_s:g} s; switch to slurm {info['switch_time'][SLURM]}, "
          f"to k8s {info['switch_time'][K8S]}; flap: moved back within {settings.flap_window_s:g} s")
    b = info["reclaim_bound_s"]
    print(f"lending: reclaim_grace_s={k['reclaim_grace_s']} lending_limit={k['lending_limit']} "
          f"reclaim_requeue={k['reclaim_requeue']}; reclaim bound: "
          f"slurm {report.human(b[SLURM])}, k8s {report.human(b[K8S])}")
    print()
    print(report.format_table(rows))
    print()
    print(f"simulated in {elapsed:.1f} s" + (f"; plots: {', '.join(str(f) for f in files)}" if files else ""))
    return 0
