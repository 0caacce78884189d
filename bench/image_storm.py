"""Image storm: N nodes at once pull the kernel, the initrds and the root image their script names,
from `provisioner serve` alone, from nginx (sendfile) and from the recommended deployment (nginx in
front of provisioner serve, /images/ served by nginx), in the same run.

Each node is a client thread with one keep-alive connection: GET the kernel and each initrd
whole, then the root image in Range requests of --image-range-mib (as a node's root-image fetcher
resumes or splits a download). Every answer is checked: status 200 or 206, Content-Range and
the byte count of what was asked for, and the first bytes of every piece against the file. The
clients run in --image-procs processes (threads in each), started together; per server and N it
records the aggregate throughput (all bytes / time until the last node has everything), that
time, and the median node's time. The files are random bytes under a private image root, so
the page cache holds them (loopback; the disk is not measured). Stopped by pid at the end.
"""

from __future__ import annotations

import http.client
import multiprocessing
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from provisioner import config
from provisioner.boot.plan import BootPlanner
from provisioner.boot.server import default_workers
from provisioner.tokens import load_or_create_secret
from bench.boot_storm import binary, mac_of, nginx, tool_version, tree_cpu_s
from testbed.boot_nginx import BootNginx
from testbed.boot_server import BootServer
from testbed.process import free_port
from testbed.site import write_site

TITLE = "image storm: N nodes pull kernel, initrds and root image at once; provisioner serve vs nginx"
GOAL = 0.9  # the recommended deployment, as a fraction of nginx alone


def add_arguments(group) -> None:
    group.add_argument("--image-nodes", default="10,100,500", metavar="N[,N]", help="node counts (default 10,100,500)")
    group.add_argument("--image-sizes-mib", default="8,16,2,38", metavar="K,I1,I2,R",
                       help="kernel, initrds..., root image in MiB (default 8,16,2,38: 64 MiB a node)")
    group.add_argument("--image-range-mib", type=int, default=8, metavar="M", help="Range piece of the root image (default 8)")
    group.add_argument("--image-procs", type=int, default=2, metavar="P", help="client processes (default 2)")
    group.add_argument("--image-rounds", type=int, default=3, metavar="R",
                       help="runs per server and N, alternating; the median by throughput is reported (default 3)")
    group.add_argument("--image-servers", default="provisioner,nginx,deployment", metavar="NAME[,NAME]",
                       help="which servers (default provisioner,nginx,deployment)")


# --------------------------------------------------------------------------- the clients


def _fetch_node(port: int, files: list[tuple[str, int, bytes]], piece: int, out: list, idx: int, start: float) -> None:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    got = 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for i, (path, size, head) in enumerate(files):
            ranged = i == len(files) - 1  # the root image: in pieces
            spans = [(o, min(o + piece, size) - 1) for o in range(0, size, piece)] if ranged else [None]
            for span in spans:
                headers = {"Range": f"bytes={span[0]}-{span[1]}"} if span else {}
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                want = size if span is None else span[1] - span[0] + 1
                if resp.status != (206 if span else 200):
                    raise RuntimeError(f"{path} {headers}: HTTP {resp.status}")
                if span and resp.getheader("Content-Range") != f"bytes {span[0]}-{span[1]}/{size}":
                    raise RuntimeError(f"{path}: Content-Range {resp.getheader('Content-Range')}")
                n, first = 0, None
                while True:
                    k = resp.readinto(view)
                    if not k:
                        break
                    if first is None:
                        first = bytes(view[:min(k, 16)])
                    n += k
                expect = head[span[0]:span[0] + 16] if span else head[:16]
                if n != want or (first or b"")[:len(expect)] != expect[:len(first or b"")]:
                    raise RuntimeError(f"{path} {headers}: {n} bytes, wanted {want}, or wrong content")
                got += n
        out[idx] = (time.monotonic() - start, got, None)
    except Exception as exc:  # noqa: BLE001 - counted, reported
        out[idx] = (time.monotonic() - start, got, f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def _client_proc(port, files, piece, nodes, go_at, queue) -> None:
    out: list = [None] * nodes
    threads = [threading.Thread(target=_fetch_node, args=(port, files, piece, out, i, go_at), daemon=True)
               for i in range(nodes)]
    while time.monotonic() < go_at:
        time.sleep(0.001)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put(out)


def _storm(port: int, files, piece: int, n: int, procs: int, pid: int) -> dict:
    cpu0 = tree_cpu_s(pid)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    share = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    go_at = time.monotonic() + 0.5 + 0.002 * n  # every process ready (its threads made) before the start
    ps = [ctx.Process(target=_client_proc, args=(port, files, piece, k, go_at, queue)) for k in share if k]
    for p in ps:
        p.start()
    results = [r for _ in ps for r in queue.get(timeout=1800)]
    for p in ps:
        p.join()
    cpu = tree_cpu_s(pid) - cpu0
    times = [r[0] for r in results]
    total = sum(r[1] for r in results)
    errors = [r[2] for r in results if r[2]]
    last = max(times)
    return {"nodes": n, "bytes": total, "last_node_s": round(last, 3), "median_node_s": round(statistics.median(times), 3),
            "gib_per_s": total / last / 2**30 if last else None,
            "server_cpu_s_per_gib": cpu / (total / 2**30) if total else None, "errors": len(errors), "first_error": errors[0] if errors else None}


# --------------------------------------------------------------------------- the run


def run(args) -> dict:
    nginx_bin = binary("nginx")
    counts = [int(x) for x in args.image_nodes.split(",") if x]
    sizes = [int(float(x) * 2**20) for x in args.image_sizes_mib.split(",")]
    if len(sizes) < 2:
        raise RuntimeError("--image-sizes-mib: a kernel and at least a root image")
    servers_wanted = [s for s in args.image_servers.split(",") if s]
    tmp = Path(tempfile.mkdtemp(prefix="provisioner-imgbench-"))
    tmp.chmod(0o755)
    daemons: list = []
    try:
        port_p = free_port()
        kernel, *initrds, rootfs = ["slurm/vmlinuz", *[f"slurm/initrd{i}.img" for i in range(len(sizes) - 2)],
                                    "slurm/root.squashfs"]
        path = write_site(
            tmp / "site", nodes=[{"name": "bn[0001-0002]", "pool": "slurm", "macs": [mac_of(1), mac_of(2)],
                                  "bmc": {"address": "127.0.0.1"}}],
            site={"name": "imgbench", "boot_url": f"http://127.0.0.1:{port_p}", "listen": f"127.0.0.1:{port_p}"},
            images={"slurm": {"version": "1", "kernel": kernel, "initrds": initrds, "rootfs": rootfs,
                              "cmdline": "console=ttyS0"},
                    "k8s": {"version": "1", "kernel": "k8s/vmlinuz", "initrds": ["k8s/initrd.img"]}})
        for rel, size in zip([kernel, *initrds, rootfs], sizes):
            with open(tmp / "site" / "images" / rel, "wb") as f:
                left = size
                while left:
                    chunk = os.urandom(min(left, 1 << 20))
                    f.write(chunk)
                    left -= len(chunk)
        site = config.load(path)
        for d in (tmp / "site", site.image_root, site.image_root / "slurm"):
            d.chmod(0o755)
        # The URLs a node's script names, from the endpoint's own planner.
        node = next(iter(site.nodes.values()))
        plan = BootPlanner(site, load_or_create_secret(site.secret_file)).plan(node, "slurm")
        urls = [plan.kernel_url, *plan.initrd_urls, plan.rootfs_url]
        files = []
        for url, rel, size in zip(urls, [kernel, *initrds, rootfs], sizes):
            with open(site.image_root / rel, "rb") as f:
                head = f.read()  # kept whole: the clients check the start of every Range piece
            files.append((urlsplit(url).path, size, head))

        workers = default_workers()
        nproc = len(os.sched_getaffinity(0))
        targets: dict[str, dict] = {}
        if "provisioner" in servers_wanted:
            boot = BootServer(path, port_p, tmp / "serve.log", workers=workers)
            daemons.append(boot)
            boot.start(timeout=120)
            targets["provisioner"] = {"label": f"provisioner serve alone (gunicorn, {workers} workers x 4 threads)",
                                      "port": port_p, "pid": boot.proc.pid}
        if "nginx" in servers_wanted:
            www = tmp / "www"
            www.mkdir()
            (www / "images").symlink_to(site.image_root)
            www.chmod(0o755)
            port = free_port()
            web = nginx(nginx_bin, tmp / "nginx", www, port, workers=nproc)
            daemons.append(web)
            conf = web.cmd[web.cmd.index("-c") + 1]
            Path(conf).write_text(Path(conf).read_text().replace("access_log off;", "access_log off;\n    sendfile on;"))
            web.start(files[0][0], timeout=60)
            targets["nginx"] = {"label": f"nginx alone, {nproc} workers, sendfile", "port": port, "pid": web.proc.pid}
        if "deployment" in servers_wanted:
            dep = BootNginx(path, free_port(), tmp / "deployment", workers=workers, nginx_workers=nproc)
            daemons.append(dep)
            dep.start(timeout=120)
            targets["deployment"] = {"label": "recommended: nginx in front of provisioner serve (/images/ by nginx)",
                                     "port": dep.port, "pid": dep.nginx.proc.pid}

        piece = args.image_range_mib * 2**20
        rows: dict[str, dict[int, dict]] = {k: {} for k in targets}
        runs: dict[str, dict[int, list]] = {k: {n: [] for n in counts} for k in targets}
        for n in counts:
            for r in range(args.image_rounds):
                keys = list(targets)
                order = keys[r % len(keys):] + keys[:r % len(keys)]  # each server goes first in turn
                for key in order:
                    runs[key][n].append(_storm(targets[key]["port"], files, piece, n, args.image_procs,
                                                targets[key]["pid"]))
        for key in targets:
            for n in counts:
                ranked = sorted(runs[key][n], key=lambda x: x["gib_per_s"] or 0)
                cpus = [x["server_cpu_s_per_gib"] for x in runs[key][n] if x["server_cpu_s_per_gib"]]
                rows[key][n] = {**ranked[(len(ranked) - 1) // 2],
                                "cpu_s_per_gib_median": statistics.median(cpus) if cpus else None,
                                "rounds_gib_per_s": [round(x["gib_per_s"] or 0, 3) for x in runs[key][n]],
                                "errors": sum(x["errors"] for x in runs[key][n])}
    finally:
        for d in reversed(daemons):
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "params": {"rounds": args.image_rounds, "counts": counts, "sizes_bytes": sizes, "range_bytes": piece, "procs": args.image_procs,
                   "per_node_bytes": sum(sizes), "requests_per_node": len(sizes) - 1 + -(-sizes[-1] // piece)},
        "versions": {"nginx": tool_version([nginx_bin, "-v"])},
        "targets": {k: {"label": targets[k]["label"], "by_n": {str(n): v for n, v in rows[k].items()}} for k in targets},
        "nproc": len(os.sched_getaffinity(0)),
        "goal": GOAL,
    }
    if "nginx" in targets:
        for k in targets:
            for n in counts:
                base, row = rows["nginx"][n], rows[k][n]
                row["x_nginx"] = row["gib_per_s"] / base["gib_per_s"] if base["gib_per_s"] and row["gib_per_s"] else None
                row["x_nginx_cpu"] = (base["cpu_s_per_gib_median"] / row["cpu_s_per_gib_median"]
                                      if base["cpu_s_per_gib_median"] and row["cpu_s_per_gib_median"] else None)
        if "deployment" in targets:
            result["met"] = all((rows["deployment"][n].get("x_nginx") or 0) >= GOAL and rows["deployment"][n]["errors"] == 0
                                for n in counts)
    result["errors"] = sum(rows[k][n]["errors"] for k in targets for n in counts)
    return result


def summary(result: dict) -> str:
    p = result["params"]
    mib = [s / 2**20 for s in p["sizes_bytes"]]
    lines = [
        f"per node: kernel {mib[0]:g} MiB, initrds {', '.join(f'{m:g}' for m in mib[1:-1])} MiB, root image "
        f"{mib[-1]:g} MiB in Range pieces of {p['range_bytes'] / 2**20:g} MiB ({p['requests_per_node']} requests, "
        f"{p['per_node_bytes'] / 2**20:g} MiB); one keep-alive connection a node, clients in {p['procs']} processes; "
        f"loopback, files in the page cache; median of {p['rounds']} runs each (errors: all runs); "
        f"{result['versions']['nginx']}",
        "",
        "| server | N | GiB/s (all bytes / last node done) | x nginx | last node has everything (s) | median node (s) "
        "| server CPU s per GiB (median) | x nginx by CPU | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in result["targets"].values():
        for n, row in t["by_n"].items():
            x, xc, c = row.get("x_nginx"), row.get("x_nginx_cpu"), row.get("cpu_s_per_gib_median")
            lines.append(f"| {t['label']} | {int(n):,} | {row['gib_per_s'] or 0:.2f} | "
                         f"{'-' if x is None else f'{x:.2f}'} | {row['last_node_s']:.2f} | {row['median_node_s']:.2f} | "
                         f"{'-' if c is None else f'{c:.3f}'} | {'-' if xc is None else f'{xc:.2f}'} | {row['errors']} |")
    lines.append("")
    if "met" in result:
        lines += [f"- the recommended deployment >= {result['goal']} x nginx at every N, no errors: "
                      f"{'met' if result['met'] else 'MISSED'}"]
    first = [r["first_error"] for t in result["targets"].values() for r in t["by_n"].values() if r["first_error"]]
    if first:
        lines.append(f"- first error: {first[0]}")
    return "\n".join(lines)
