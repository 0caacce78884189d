"""The PostgreSQL store against SQLite, in the same run: the boot storm on one and on
two boot servers, and one balance pass's reads and decide with 10,000 nodes in the store.

- Boot storm: the same 10,000-node site (shared nodes) served by `provisioner serve` with
  site.store on SQLite and on PostgreSQL (Debian's real server, testbed/postgres.py, started in a
  temporary folder); wrk asks for a random node's script (`GET /ipxe?mac=`, bench/boot_storm.lua
  through boot_storm's own functions). One server: every worker of the machine's default.
  Two servers: two site configs ("hosts": separate folders, the same store, the same secret),
  half the workers each (the same CPU budget on this one machine), two wrk at once, half the
  connections each, requests/s summed and the worse p99. Every store read of a request is a
  real query: the endpoint caches no role. Before the timed runs, a sample of MACs must give
  the same script on every server (the callback URL's port aside).
- Balance pass: the store side of one pass with 10,000 shared nodes in it: store.nodes() of
  every node, Reconciler.observe() (its store reads: nodes + open asks) and snapshot()
  (set_demand writes the demand's first-seen times) and policy.decide(), against in-process
  stand-ins for SLURM and Kubernetes (tests/fakes.py: their cost is the same for both stores).

Each timed part is run R times alternating which store goes first; medians are reported, with
PostgreSQL's time or throughput as a ratio of SQLite's from the same run.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench.boot_storm import LUA, binary, mac_of, tool_version, tree_cpu_s
from provisioner import config, policy as pol
from provisioner.boot.server import default_workers
from provisioner.reconcile import Reconciler
from provisioner.store import Store
from testbed.boot_server import BootServer
from testbed.postgres import PostgresServer
from testbed.process import free_port
from testbed.site import write_site

TITLE = "store: boot storm (one and two boot servers) and a balance pass's reads, PostgreSQL vs SQLite"
SAMPLE = 20
SECRET = "5e" * 32 + "\n"


# -- wrk and CPU accounting, as bench/boot_storm.py does them (its helpers are private to it) ----


def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def _wrk(url: str, macs_file: Path, seconds: float, threads: int, connections: int) -> dict:
    """wrk with bench/boot_storm.lua (a random MAC per request); its JSON line parsed."""
    cmd = [binary("wrk"), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
           "-s", str(LUA), url, "--", str(macs_file)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            raw = json.loads(line[len("BENCH_JSON "):])
            lat, errors = raw["latency_us"], raw["errors"]
            return {"requests_per_s": raw["requests"] / (raw["duration_us"] / 1e6), "requests": raw["requests"],
                    "p50_ms": lat["p50"] / 1000, "p99_ms": lat["p99"] / 1000,
                    "non_2xx": errors.pop("status"), "socket_errors": errors}
    raise RuntimeError(f"wrk gave no result (exit {out.returncode}): {(out.stderr or out.stdout)[-500:]}")


def _machine_busy_s() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def add_arguments(group) -> None:
    group.add_argument("--store-nodes", type=int, default=10_000, metavar="N", help="nodes in the site (default 10000)")
    group.add_argument("--store-duration", type=float, default=8.0, metavar="S",
                       help="seconds per timed wrk run (default 8)")
    group.add_argument("--store-warmup", type=float, default=2.0, metavar="S", help="warm-up before each (default 2)")
    group.add_argument("--store-connections", type=int, default=64, metavar="C",
                       help="concurrent clients in all (default 64)")
    group.add_argument("--store-rounds", type=int, default=3, metavar="R",
                       help="timed runs per configuration, alternating; medians reported (default 3)")
    group.add_argument("--store-pass-repeats", type=int, default=7, metavar="K",
                       help="balance-pass measurements per store (default 7)")


def _site(folder: Path, n: int, port: int, store: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "secret").write_text(SECRET)
    (folder / "secret").chmod(0o600)
    width = max(5, len(str(n)))
    return write_site(
        folder,
        nodes=[{"name": f"bn[{1:0{width}d}-{n:0{width}d}]", "pool": "shared", "default_role": "slurm",
                "macs": [mac_of(i) for i in range(1, n + 1)], "bmc": {"address": "127.0.0.1"}}],
        site={"name": "bench", "boot_url": f"http://127.0.0.1:{port}", "listen": f"127.0.0.1:{port}",
              "secret_file": str(folder / "secret"), **store})


def _open(site) -> Store:
    return Store(site.store_url, password_file=site.store_password_file) if site.store_url else Store(site.store)


def _storm(servers: list[dict], pids: list[int], macs_file: Path, seconds: float, total_c: int) -> dict:
    """One timed run: one wrk per server at once, the connections split between them."""
    per = max(1, total_c // len(servers))
    wrk_threads = 1 if len(servers) > 1 else 2
    cpu0 = sum(tree_cpu_s(p) for p in pids)
    busy0 = _machine_busy_s()
    wrk0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    results: list[dict | Exception] = [None] * len(servers)  # type: ignore[list-item]

    def one(i: int) -> None:
        try:
            results[i] = _wrk(servers[i]["url"], macs_file, seconds, wrk_threads, per)
        except Exception as exc:  # noqa: BLE001 - re-raised below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, Exception):
            raise r
    cpu_s = sum(tree_cpu_s(p) for p in pids) - cpu0
    wrk1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_s = (wrk1.ru_utime + wrk1.ru_stime) - (wrk0.ru_utime + wrk0.ru_stime)
    requests = sum(r["requests"] for r in results)
    return {
        "requests_per_s": sum(r["requests_per_s"] for r in results),
        "requests": requests,
        "p50_ms": max(r["p50_ms"] for r in results),
        "p99_ms": max(r["p99_ms"] for r in results),
        "non_2xx": sum(r["non_2xx"] for r in results),
        "socket_errors": [r["socket_errors"] for r in results],
        # the boot servers and, for PostgreSQL, the database server (its backends included)
        "server_cpu_s": round(cpu_s, 2), "wrk_cpu_s": round(wrk_s, 2),
        "other_cpu_s": round(max(0.0, _machine_busy_s() - busy0 - cpu_s - wrk_s), 2),
        "server_cpu_us_per_request": cpu_s / requests * 1e6 if requests else None,
    }


def _median(runs: list[dict]) -> dict:
    keys = ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_request")
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def _pass_costs(site, store: Store, repeats: int) -> dict:
    """The store's part of one balance pass, timed apart, with stand-in clusters."""
    from tests.fakes import FakeKube, FakeSlurm, slurm_node

    slurm = FakeSlurm(**{n: slurm_node(n) for n in site.nodes})
    kube = FakeKube()
    parts: dict[str, list[float]] = {"nodes_all": [], "observe": [], "snapshot": [], "decide": [], "pass": []}
    for _ in range(repeats):
        rec = Reconciler(site, store, slurm=slurm, kube=kube, power=lambda *a, **k: [])
        t0 = time.perf_counter()
        states = store.nodes()
        t1 = time.perf_counter()
        world = rec.observe()
        t2 = time.perf_counter()
        snap = rec.snapshot(world, record_demand=True)
        t3 = time.perf_counter()
        decision = pol.decide(snap)
        t4 = time.perf_counter()
        for k, v in (("nodes_all", t1 - t0), ("observe", t2 - t1), ("snapshot", t3 - t2), ("decide", t4 - t3),
                     ("pass", t4 - t1)):
            parts[k].append(v)
    assert len(states) == len(site.nodes) and len(world.states) == len(site.nodes), (len(states), len(world.states))
    return {"median_s": {k: round(statistics.median(v), 4) for k, v in parts.items()},
            "moves": len(decision.moves), "nodes_read": len(states)}


def run(args) -> dict:
    n = args.store_nodes
    wrk = binary("wrk")
    tmp = Path(tempfile.mkdtemp(prefix="provisioner-bench-store-"))
    pg = PostgresServer()
    daemons: list = []
    try:
        pg.start()
        url = pg.create_database("bench")
        macs = [mac_of(i) for i in range(1, n + 1)]
        macs_file = tmp / "macs.txt"
        macs_file.write_text("\n".join(macs) + "\n")
        workers = default_workers()
        half = max(1, workers // 2)
        pg_store = {"store": url, "store_password_file": str(pg.password_file)}
        layouts = {  # name -> [(folder, store settings, workers)]
            "sqlite_1": [("sqlite-1", {"store": str(tmp / "shared.db")}, workers)],
            "postgresql_1": [("pg-1", {**pg_store, "state_dir": str(tmp / "pg-1" / "state")}, workers)],
            "sqlite_2": [(f"sqlite-2{x}", {"store": str(tmp / "shared.db")}, half) for x in "ab"],
            "postgresql_2": [(f"pg-2{x}", {**pg_store, "state_dir": str(tmp / f"pg-2{x}" / "state")}, half)
                             for x in "ab"],
        }
        configs: dict[str, list[dict]] = {}
        t0 = time.monotonic()
        for name, hosts in layouts.items():
            configs[name] = []
            for folder, store, w in hosts:
                port = free_port()
                path = _site(tmp / folder, n, port, store)
                configs[name].append({"path": path, "port": port, "workers": w, "url": f"http://127.0.0.1:{port}"})
        sites = {"sqlite": config.load(configs["sqlite_1"][0]["path"]),
                 "postgresql": config.load(configs["postgresql_1"][0]["path"])}
        seed_s = {}
        for kind, site in sites.items():  # the servers would seed on start; timed here
            t = time.monotonic()
            s = _open(site)
            s.seed((nd.name, nd.default_role) for nd in site.nodes.values())
            s.close()
            seed_s[kind] = round(time.monotonic() - t, 2)
        setup_s = round(time.monotonic() - t0, 1)

        # ---------------------------------------------------------------- the balance pass
        pass_costs: dict[str, dict] = {}
        stores = {k: _open(s) for k, s in sites.items()}
        try:
            for kind in ("sqlite", "postgresql", "sqlite", "postgresql"):  # warm, then measured
                pass_costs[kind] = _pass_costs(sites[kind], stores[kind], args.store_pass_repeats)
        finally:
            for s in stores.values():
                s.close()

        # ---------------------------------------------------------------- the boot storm
        rnd = random.Random(3)
        sample = sorted({macs[0], macs[-1], *rnd.sample(macs, min(SAMPLE, n))})
        runs: dict[str, list[dict]] = {k: [] for k in layouts}
        for r in range(args.store_rounds):
            keys = list(layouts)
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            for key in order:
                servers = [BootServer(c["path"], c["port"], tmp / f"{key}-{i}-serve.log", workers=c["workers"])
                           for i, c in enumerate(configs[key])]
                daemons.extend(servers)
                for s in servers:
                    s.start(timeout=180)
                try:
                    if r == 0:
                        _check_sample(configs, key, sample)
                    pids = [s.proc.pid for s in servers] + ([pg.proc.pid] if key.startswith("postgresql") else [])
                    if args.store_warmup > 0:
                        _storm(configs[key], pids, macs_file, args.store_warmup, args.store_connections)
                    runs[key].append(_storm(configs[key], pids, macs_file, args.store_duration, args.store_connections))
                finally:
                    for s in servers:
                        s.stop()
                        daemons.remove(s)
        tracebacks = sum(p.read_text(errors="replace").count("Traceback") for p in tmp.glob("*.log"))
        pg_version = tool_version([str(pg.bin / "postgres"), "--version"])
    finally:
        for d in daemons:
            d.stop()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    storm = {k: {"runs": v, "median": _median(v), "servers": len(layouts[k]),
                 "workers_each": layouts[k][0][2]} for k, v in runs.items()}
    ratios = {}
    for servers in ("1", "2"):
        s, p = storm[f"sqlite_{servers}"]["median"], storm[f"postgresql_{servers}"]["median"]
        ratios[f"storm_{servers}_rps"] = p["requests_per_s"] / s["requests_per_s"]
        ratios[f"storm_{servers}_p99"] = p["p99_ms"] / s["p99_ms"]
        ratios[f"storm_{servers}_cpu"] = p["server_cpu_us_per_request"] / s["server_cpu_us_per_request"]
    for part in ("nodes_all", "observe", "snapshot", "decide", "pass"):
        s, p = pass_costs["sqlite"]["median_s"][part], pass_costs["postgresql"]["median_s"][part]
        ratios[f"pass_{part}"] = p / s if s else None
    return {
        "params": {"nodes": n, "duration_s": args.store_duration, "warmup_s": args.store_warmup,
                   "connections": args.store_connections, "rounds": args.store_rounds, "workers": workers,
                   "pass_repeats": args.store_pass_repeats},
        "versions": {"wrk": tool_version([wrk, "-v"]), "postgres": pg_version},
        "setup": {"configs_s": setup_s, "seed_s": seed_s},
        "storm": storm, "pass": pass_costs, "ratios": ratios,
        "correct": all(r["non_2xx"] == 0 for v in runs.values() for r in v) and tracebacks == 0,
        "server_tracebacks": tracebacks,
        "nproc": len(os.sched_getaffinity(0)),
    }


def _check_sample(configs: dict, key: str, sample: list[str]) -> None:
    """Every server of this layout gives each sampled MAC its node's script, the same as SQLite's
    single server would (the port in the callback URL aside)."""
    for c in configs[key]:
        for m in sample:
            status, text = _get(c["port"], f"/ipxe?mac={m}")
            i = int(m.replace(":", "")[-6:], 16)
            if status != 200 or "images/slurm/vmlinuz" not in text or f"provisioner.node=bn{i:05d}" not in text:
                raise RuntimeError(f"{key} on port {c['port']}: {status} for {m}: {text[:300]}")


def summary(result: dict) -> str:
    st, ps, ra = result["storm"], result["pass"], result["ratios"]
    p = result["params"]
    lines = [f"{p['nodes']:,} shared nodes; {result['versions']['postgres']} (fsync off, a throw-away cluster "
             f"on this machine); wrk, {p['connections']} connections in all, {p['duration_s']:g} s runs, "
             f"median of {p['rounds']}; {result['nproc']} CPUs.", "",
             "| boot servers | store | requests/s | p50 ms | p99 ms | CPU us/request (servers + postgres) |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for key in ("sqlite_1", "postgresql_1", "sqlite_2", "postgresql_2"):
        m = st[key]["median"]
        lines.append(f"| {st[key]['servers']} x {st[key]['workers_each']} workers | {key.split('_')[0]} | "
                     f"{m['requests_per_s']:,.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
                     f"{m['server_cpu_us_per_request']:.0f} |")
    lines += ["", f"| balance pass, {p['nodes']:,} nodes in the store (median s) | SQLite | PostgreSQL | PG / SQLite |",
              "| --- | ---: | ---: | ---: |"]
    labels = {"nodes_all": "store.nodes() (every row)", "observe": "observe (store reads; clusters stand-ins)",
              "snapshot": "snapshot (set_demand write)", "decide": "policy.decide", "pass": "observe + snapshot + decide"}
    for part, label in labels.items():
        s, q = ps["sqlite"]["median_s"][part], ps["postgresql"]["median_s"][part]
        lines.append(f"| {label} | {s:.4f} | {q:.4f} | {ra['pass_' + part]:.2f} |")
    lines += ["", f"- PostgreSQL / SQLite, one server: {ra['storm_1_rps']:.2f} x the requests/s, p99 "
              f"{ra['storm_1_p99']:.2f} x, CPU per request {ra['storm_1_cpu']:.2f} x",
              f"- two servers: {ra['storm_2_rps']:.2f} x the requests/s, p99 {ra['storm_2_p99']:.2f} x, "
              f"CPU per request {ra['storm_2_cpu']:.2f} x",
              f"- no non-2xx, no traceback: {'yes' if result['correct'] else 'NO'}; set-up {result['setup']}"]
    return "\n".join(lines)
