#!/usr/bin/env python3
"""`make demo`: the whole thing on one machine, with real parts.

A real SLURM cluster (slurmctld, munged, one slurmd per node: cn01 fixed, sn01 and sn02 shared),
a real Kubernetes control plane (kube-apiserver, kube-scheduler, kube-controller-manager and etcd
v1.34.3, built from their Go modules; kn01 fixed), one IPMI BMC simulator per shared node, the boot
server (`provisioner serve`), and two qemu VMs, sn01 and sn02, that network-boot through iPXE
from it: the tiny image, as the slurm role or the k8s role. The balancer (`provisioner balance`,
as cron would run it, but every few seconds instead of every minute) moves a shared node when
work is pending on the other side; its BMC resets the VM, which boots the other image; when its
callback says slurm, the node's slurmd starts (its kubelet goes Ready when it says k8s).

`--redfish sn01` powers that node by Redfish instead: sushy-tools' emulator (libvirt driver) in front
of our libvirtd, which runs the node's VM as a domain; provisioner then resets it and sets its
one-time network boot through the emulator, the way it drives a Redfish BMC (docs/redfish.md).

Kueue's controller manager runs next to the control plane (testbed/kueue.py) with the queues of
examples/kubernetes/kueue-provisioning.yaml: `gang N` queues a Job of N whole-node pods, Kueue
asks provisioner for N nodes at once (a ProvisioningRequest), all or nothing (docs/kueue.md).

    make demo                                  interactive: poke it, Ctrl-C to stop
    make demo DEMO_ARGS='--duration 180'       submits work itself, exits 0 when both moves
                                               happened (or 1 when they did not in time)
    make demo DEMO_ARGS='--redfish sn01'       sn01 powered by Redfish, sn02 by IPMI

Everything runs under var/demo/ and is stopped (by pid) on the way out, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from provisioner import images, nodeset  # noqa: E402
from provisioner.errors import ProvisionerError  # noqa: E402
from testbed.vm_site import IPXE_ROM, VmSite  # noqa: E402
from testbed.simnodes import provisioner_cmd  # noqa: E402
from testbed.tinyimage import CACHE, DEFINITIONS  # noqa: E402
from testbed.vm import QEMU, accelerator, qemu_binary  # noqa: E402
from testbed.kube_control_plane import BinariesMissing, kubectl_path  # noqa: E402
from testbed.kueue import Kueue  # noqa: E402
from testbed.parts import PartMissing, require_binary  # noqa: E402
from testbed.redfish_bmc import emulator_binary  # noqa: E402

# The demo's policy: demand must last a few seconds before a node moves (no flapping on a blip),
# no cooldown (so the same node can be seen going both ways within a minute).
POLICY = {"demand_persist_s": 4, "cooldown_s": 0, "phase_timeout_s": 150, "max_retries": 1, "max_in_flight": 1}


SHARED = ("sn01", "sn02")

# slurmstepd's socket WORKDIR/slurm/spool/slurmd-NODE/NODE_JOB.4294967291 must fit in 108 bytes.
MAX_WORKDIR = 60


class Log:
    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, who: str, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {who:<10} {text}"
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")


class Demo:
    def __init__(self, args, log: Log):
        self.args, self.log = args, log
        self.workdir = Path(args.workdir).resolve()
        self.sim: VmSite | None = None
        self.stop = threading.Event()
        self.seen_boots = 0
        self.seen_errors: set[int] = set()
        self.last_pending: tuple | None = None
        self.last_notes: tuple = ()
        self.placed: dict[str, str] = {}  # job id or ns/pod -> where it runs
        self.moves: list[tuple[str, str]] = []
        self.jobs = 0
        self.kueue: Kueue | None = None

    # ----------------------------------------------------------------------- set-up

    def start(self) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        self.log("demo", f"building the tiny image (a Debian kernel + busybox initramfs) into {self.workdir}/images")
        built = images.build(DEFINITIONS, self.workdir / "images", "tiny", cache=CACHE, actor="demo")
        self.log("demo", f"tiny image version {built.version} built and published in {built.seconds:.1f} s")
        redfish = tuple(self.args.redfish)
        ipmi = [n for n in SHARED if n not in redfish]
        bmcs = ", ".join(filter(None, [
            f"IPMI BMC simulators for {' and '.join(ipmi)}" if ipmi else "",
            f"libvirtd and sushy-tools' Redfish emulator for {' and '.join(redfish)}" if redfish else ""]))
        self.log("demo", "starting slurmctld + munged + slurmd (cn01, sn01, sn02), a real Kubernetes control plane "
                         f"(kn01), {bmcs}, and the boot server")
        self.sim = VmSite(self.workdir, self.workdir / "images", shared="sn[01-02]", roles={"sn02": "k8s"},
                          policy=POLICY, redfish=redfish)
        self.log("demo", f"booting the VMs (qemu, {accelerator().upper()}): sn01 as a SLURM node, sn02 as a "
                         "Kubernetes node; about 15 s")
        self.sim.start()
        self.start_kueue()
        for b in self.sim.vm_boots:
            self.log(b["node"], f"VM booted the {b['role']} image {b['version']} (console: {b['line']})")
        self.sim.vm_boots.clear()

    def start_kueue(self) -> None:
        try:
            self.kueue = Kueue(self.sim.kube, self.workdir / "kueue")
        except BinariesMissing as exc:
            self.log("demo", f"no Kueue ({exc}); `gang N` is off")
            return
        try:
            self.kueue.start()
        except RuntimeError as exc:  # the demo's own story goes on without it
            self.kueue = None
            self.log("demo", f"Kueue did not start ({str(exc)[:300]}); `gang N` is off")
            return
        example = ROOT / "examples" / "kubernetes" / "kueue-provisioning.yaml"
        subprocess.run([str(kubectl_path()), "--kubeconfig", str(self.sim.kube.kubeconfig), "apply", "-f",
                        str(example)], check=True, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(self.workdir)})
        self.sim.write_config(POLICY, kubernetes={"provisioning_requests": True})
        self.log("demo", f"Kueue's controller manager runs (pid {self.kueue.pid}) with the queues of {example.name}")

    def add_gang(self, n: int) -> None:
        if self.kueue is None:
            raise RuntimeError("Kueue is not running (not built: `make kube-bins`)")
        self.jobs += 1
        name = f"gang-{self.jobs}"
        self.sim.kube.api.create("/apis/batch/v1/namespaces/default/jobs", {
            "metadata": {"name": name, "labels": {"kueue.x-k8s.io/queue-name": "shared"}},
            "spec": {"parallelism": n, "completions": n, "suspend": True, "template": {"spec": {
                "restartPolicy": "Never", "containers": [{"name": "work", "image": "busybox", "resources": {
                    "requests": {"cpu": "1", "memory": "128Mi"}}}]}}}})
        self.log("you", f"Job {name} of {n} whole-node pod(s) queued in Kueue: it asks for {n} node(s) at once")

    def poke_help(self) -> str:
        sim = self.sim
        env = (f"export SLURM_CONF={sim.slurm.slurm_conf} KUBECONFIG={sim.kube.kubeconfig} "
               f"PROVISIONER_CONFIG={sim.config} PATH={Path(provisioner_cmd()[0]).parent}:$PATH")
        kubectl = kubectl_path()
        mac = sim.nodes["sn01"].mac
        return "\n".join([
            "",
            "Poke it from another shell (everything is on 127.0.0.1):",
            f"  {env}",
            "  provisioner nodes                       # roles, phases, what each node booted",
            f"  curl '{sim.boot.url}/ipxe?mac={mac}'   # what sn01 boots now",
            "  provisioner role sn01 k8s --reason test --now   # force (pin) a switch; `provisioner release sn01`",
            "  sbatch --wrap 'sleep 300'               # SLURM work; squeue / sinfo to watch",
            f"  {kubectl} get nodes -L sched        # Kubernetes' view",
            "  provisioner history sn01                # the audit log",
            f"  tail -f {sim.workdir}/vms/sn01.serial.log   # sn01's console",
            "Or type here: `pods N` (N one-CPU pods), `jobs N` (N jobs), `gang N` (a Kueue Job of N whole-node",
            "pods: N nodes at once or none), `finish` (end all work), `quit`.",
            "Every node has 1 CPU: `jobs 3` fills cn01 and sn01 and leaves one job waiting, so the balancer",
            "moves sn02 to SLURM; then `finish` and `pods 3` make Kubernetes want a node back.",
            "Ctrl-C stops everything.",
            "",
        ])

    # ----------------------------------------------------------------------- work

    def add_pods(self, n: int, prefix: str = "train") -> None:
        for _ in range(n):
            self.jobs += 1
            self.sim.kube.add_pod(f"{prefix}-{self.jobs}", namespace="ml", requests={"cpu": "1", "memory": "128Mi"})
        self.log("you" if prefix == "pod" else "scenario", f"{n} pod(s) of 1 CPU submitted to Kubernetes (namespace ml)")

    def add_jobs(self, n: int, who: str = "scenario") -> None:
        ids = [self.sim.slurm.sbatch("--job-name=demo") for _ in range(n)]
        self.log(who, f"{n} SLURM job(s) submitted: {', '.join(ids)}")

    def finish_work(self, who: str = "scenario") -> None:
        self.sim.slurm.run("scancel", "--name=demo", check=False)
        for p in self.sim.kube.pods():
            if p["metadata"]["namespace"] == "ml" and p["status"].get("phase") in ("Running", "Pending"):
                if p["spec"].get("nodeName"):
                    self.sim.kube.set_pod_phase("ml", p["metadata"]["name"], "Succeeded")
                else:  # never started: its owner withdraws it
                    self.sim.kube.delete_pod(p["metadata"]["name"], "ml")
        self.log(who, "all demo jobs cancelled and pods finished")

    # ----------------------------------------------------------------------- watching

    def pending(self) -> tuple:
        jobs = [line.split("|", 1) for line in self.sim.slurm.run("squeue", "-h", "-t", "PD", "-o", "%i|%r",
                                                                  check=False).splitlines() if "|" in line]
        pods = [p["metadata"]["name"] for p in self.sim.kube.pods()
                if not p["spec"].get("nodeName") and p["status"].get("phase") == "Pending"]
        return tuple(f"{j} ({r})" for j, r in jobs), tuple(pods)

    def watch(self) -> None:
        jobs, pods = self.pending()
        if (jobs, pods) != self.last_pending:
            self.last_pending = (jobs, pods)
            self.log("pending", f"SLURM: {len(jobs)} job(s) {' '.join(jobs)}".rstrip() +
                     f"; Kubernetes: {len(pods)} pod(s) {' '.join(pods)}".rstrip())
        for b in self.sim.vm_boots[self.seen_boots:]:
            since = f", {b['callback_at'] - b['powered_at']:.1f} s after power-on/reset" if b.get("powered_at") else ""
            self.log(b["node"], f"VM booted the {b['role']} image {b['version']} and called back{since}; "
                                f"console: {b['line']}")
            self.log(b["node"], "its slurmd starts" if b["role"] == "slurm" else "its kubelet reports Ready")
        self.seen_boots = len(self.sim.vm_boots)
        for i, b in enumerate(self.sim.boots):
            if b.get("error") and i not in self.seen_errors:
                self.seen_errors.add(i)
                self.log(b["node"], f"boot failed: {b['error'].splitlines()[0]}")
        for line in self.sim.slurm.run("squeue", "-h", "-t", "R", "-o", "%i|%N", check=False).splitlines():
            if "|" not in line:
                continue
            job, node = line.split("|", 1)
            if self.placed.get(job) != node:
                self.placed[job] = node
                self.log("slurm", f"job {job} running on {node}")
        for p in self.sim.kube.pods():
            key, node = f"{p['metadata']['namespace']}/{p['metadata']['name']}", p["spec"].get("nodeName")
            if node and p["status"].get("phase") == "Running" and self.placed.get(key) != node:
                self.placed[key] = node
                self.log("k8s", f"pod {key} running on {node}")

    def balance(self) -> None:
        proc = subprocess.run([*provisioner_cmd(), "--config", str(self.sim.config), "balance", "--json"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            self.log("balancer", f"pass failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
            return
        for m in report["moves"]:
            self.moves.append((m["node"], m["to"]))
            self.log("balancer", f"MOVE {m['node']} -> {m['to']}: {m['reason']}")
        for s in report["steps"]:
            self.log("balancer", f"{s['node']} {s['action']}: {s['message']}" + ("" if s["ok"] else "  [FAILED]"))
        notes = tuple(report["notes"])
        if notes != self.last_notes:
            self.last_notes = notes
            for n in notes:
                self.log("balancer", f"note: {n}")
        for e in report["errors"]:
            self.log("balancer", f"error: {e}")

    # ----------------------------------------------------------------------- the loop

    def run(self) -> bool:
        scenario = Scenario(self) if self.args.duration else None
        interactive = scenario is None and sys.stdin.isatty()
        deadline = time.monotonic() + self.args.duration if self.args.duration else None
        next_pass = time.monotonic()
        self.log("demo", f"balancer pass every {self.args.every:g} s" +
                 (f"; scenario for at most {self.args.duration:g} s" if scenario else "; Ctrl-C to stop"))
        while not self.stop.is_set():
            self.watch()  # before the pass: a boot's lines come before the pass that notices it
            if time.monotonic() >= next_pass:
                next_pass = time.monotonic() + self.args.every
                self.balance()
            if scenario and scenario.step():
                self.log("demo", "scenario complete: sn01 went to Kubernetes and came back to SLURM, "
                                 "each time booting the other image")
                return True
            if deadline and time.monotonic() > deadline:
                self.log("demo", f"scenario NOT complete after {self.args.duration:g} s (at: {scenario.stage}); "
                                 f"see {self.workdir}")
                return False
            if interactive:
                ready, _, _ = select.select([sys.stdin], [], [], 1.0)
                if ready:
                    self.command(sys.stdin.readline())
            else:
                self.stop.wait(1.0)
        return scenario is None

    def command(self, line: str) -> None:
        words = line.split()
        try:
            if not words:
                return
            if words[0] == "pods":
                self.add_pods(int(words[1]) if len(words) > 1 else 1, prefix="pod")
            elif words[0] == "jobs":
                self.add_jobs(int(words[1]) if len(words) > 1 else 1, who="you")
            elif words[0] == "gang":
                self.add_gang(int(words[1]) if len(words) > 1 else 2)
            elif words[0] == "finish":
                self.finish_work(who="you")
            elif words[0] in ("quit", "exit"):
                self.stop.set()
            else:
                print("commands: pods N | jobs N | gang N | finish | quit", flush=True)
        except (ValueError, ProvisionerError, RuntimeError) as exc:
            print(f"demo: {exc}", flush=True)


class Scenario:
    """Non-interactive: Kubernetes gets busy (sn01 moves there), then SLURM does (it comes back)."""

    def __init__(self, demo: Demo):
        self.demo, self.sim = demo, demo.sim
        self.stage = "start"
        self.since = time.monotonic()
        self.job: str | None = None

    def _go(self, stage: str) -> None:
        self.stage, self.since = stage, time.monotonic()

    def step(self) -> bool:
        d, sim, age = self.demo, self.sim, time.monotonic() - self.since
        if self.stage == "start" and age > 3:
            d.log("scenario", "Kubernetes gets busy: kn01 and sn02 are full, one more pod needs a node")
            sim.kube.add_pod("serving-0", namespace="ml", node="kn01", requests={"cpu": "1", "memory": "128Mi"})
            sim.kube.add_pod("serving-1", namespace="ml", node="sn02", requests={"cpu": "1", "memory": "128Mi"})
            d.add_pods(1)
            self._go("k8s-demand")
        elif self.stage == "k8s-demand" and sim.state("sn01").phase == "steady" and sim.serving("sn01") == {"k8s"} \
                and any(p["spec"].get("nodeName") == "sn01" for p in sim.kube.pods()):
            d.log("scenario", "the pod runs on sn01; in a few seconds it finishes, then SLURM gets busy")
            self._go("k8s-done")
        elif self.stage == "k8s-done" and age > 5:
            for p in sim.kube.pods():
                if p["metadata"]["namespace"] == "ml" and p["metadata"]["name"].startswith("train"):
                    sim.kube.set_pod_phase("ml", p["metadata"]["name"], "Succeeded")
            d.log("scenario", "SLURM gets busy: a job fills cn01, one more job needs a node")
            d.add_jobs(1)
            self.job = sim.slurm.sbatch("--job-name=demo")
            d.log("scenario", f"SLURM job {self.job} submitted")
            self._go("slurm-demand")
        elif self.stage == "slurm-demand" and sim.slurm.job_state(self.job) == ("RUNNING", "sn01") \
                and sim.state("sn01").phase == "steady":
            return True
        return False


def preflight(redfish: bool = False) -> str | None:
    if os.geteuid() != 0:
        return "run it as root: the SLURM daemons (munged, slurmctld, slurmd) run as root here"
    if qemu_binary() is None or not Path(IPXE_ROM).is_file():
        return f"{QEMU} or the iPXE ROM is missing; run `make system-deps` (or `make demo`, which does)"
    for tool in ("slurmctld", "slurmd", "munged"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            return f"{tool} is missing; run `make system-deps`"
    try:
        kubectl_path()
    except BinariesMissing as exc:
        return str(exc)
    if redfish:
        try:
            emulator_binary()
            require_binary("libvirtd")
        except PartMissing as exc:
            return f"{exc}; run `make system-deps` (or `make demo`, which does)"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=0,
                   help="run a scripted scenario for at most this many seconds, then exit (default: interactive)")
    p.add_argument("--every", type=float, default=5.0, help="seconds between balancer passes (cron: 60)")
    p.add_argument("--workdir", default=str(ROOT / "var" / "demo"), help="state, logs, consoles (recreated)")
    p.add_argument("--redfish", default="", metavar="NODES",
                   help="shared nodes (a hostlist: sn01, sn[01-02]) powered by Redfish through sushy-tools' emulator "
                        "and libvirtd instead of an IPMI BMC simulator")
    args = p.parse_args(argv)
    try:
        args.redfish = nodeset.expand(args.redfish) if args.redfish else []
    except nodeset.NodeSetError as exc:
        print(f"demo: --redfish: {exc}", file=sys.stderr)
        return 2
    unknown = [n for n in args.redfish if n not in SHARED]
    if unknown:
        print(f"demo: --redfish names {', '.join(unknown)}: the demo's shared nodes are {', '.join(SHARED)}",
              file=sys.stderr)
        return 2
    why = preflight(redfish=bool(args.redfish))
    if why:
        print(f"demo: {why}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir).resolve()
    if len(str(workdir)) > MAX_WORKDIR:
        print(f"demo: --workdir {workdir} is too long: slurmstepd's sockets under it must stay within 108 bytes; "
              f"use a folder of at most {MAX_WORKDIR} characters", file=sys.stderr)
        return 2
    workdir.parent.mkdir(parents=True, exist_ok=True)
    log = Log(workdir.parent / f"{workdir.name}.log")
    demo = Demo(args, log)
    starting = [True]

    def interrupted(*_) -> None:
        demo.stop.set()
        if starting[0]:  # unwinds the start-up, which stops what it had started (once: a second
            starting[0] = False  # Ctrl-C must not cut that clean-up short)
            raise KeyboardInterrupt

    # Also SIGINT: a shell starts background jobs with it ignored; Ctrl-C and kill -INT both stop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupted)
    ok = False
    try:
        try:
            demo.start()
        except KeyboardInterrupt:
            log("demo", "interrupted during start-up")
            return 130
        starting[0] = False
        print(demo.poke_help(), flush=True)
        ok = demo.run()
    except (ProvisionerError, RuntimeError) as exc:
        log("demo", f"failed: {exc}")
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if demo.kueue is not None:
            demo.kueue.stop()
        if demo.sim is not None:
            log("demo", "stopping the VMs, the boot server, the BMC simulators, the API server and SLURM")
            demo.sim.stop()
        log("demo", f"everything stopped; the log is {log.file.name}, consoles and state under {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
