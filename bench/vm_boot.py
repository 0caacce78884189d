"""A real VM's boot vs a whole switch, in the same run: qemu (TCG unless KVM works) network-boots
through iPXE from `provisioner serve`, powered through a BMC simulator over IPMI, with the real
SLURM cluster and a real Kubernetes control plane. Two worlds (--vm-images):
- tiny (default): both roles boot the tiny test image; the harness starts the node's slurmd or
  simulated kubelet on the callback (testbed/vm_site.py VmSite);
- real: the Debian slurm and k8s images (built through the build cache); the VM's own slurmd
  registers and its own kubelet joins with the client certificate provisioner had signed before
  the reboot, or by TLS bootstrap with kubelet_certificates off (ImageVmSite; --vm-join both
  compares the two in the same run). The raw boot is measured for each image; the same
  switches by kexec and by Redfish (sushy-tools' emulator, a libvirt domain) follow.

Per round, on the shared VM sn01:
- raw boot: IPMI one-time network boot + reset (provisioner.power.run_action) -> the boot
  callback recorded by the server; the console, polled every 0.1 s, splits it into phases;
- switch to slurm: cn01 is busy, a job is submitted (Pending, Resources) -> it RUNS on sn01,
  which the balancer had to move from Kubernetes: detect, cordon, IPMI, boot, slurmd joins, resume;
- switch to k8s: kn01 is full, a pod is submitted (Unschedulable) -> it is bound to sn01.
The balancer runs back to back as `provisioner balance` processes (as cron runs it, without the
minute in between: --vm-pass-interval), policy demand_persist_s=0, cooldown_s=0; the real
kube-scheduler retries unschedulable pods within 1-2 s. Each switch's phases come from the
store's events.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from provisioner import config, images
from provisioner.power import run_action
from testbed.wait import wait_for

TITLE = "VM boot: raw IPMI boot -> callback vs pending work -> running on the switched VM"
TARGET_OVERHEAD_S = 15.0

# Console markers of a boot, in order (first appearance after the power action).
TINY_MARKS = [
    ("ipxe", r"iPXE initialising devices"),          # firmware done, the NIC's ROM runs
    ("script", r"provisioner: sn01 -> "),             # DHCP done, stage 1 + the node's script fetched
    ("files", r"initramfs\.img\.\.\. ok"),            # kernel + initramfs downloaded
    ("kernel", r"Linux version"),                     # the kernel runs
    ("init", r"PROVISIONER-BOOTED"),                  # /init: drivers, DHCP, overlay applied
    ("callback", r"PROVISIONER-CALLBACK-OK"),         # the callback was accepted
]
# The Debian images: the initramfs fetches the squashfs root, then systemd boots it and the
# image's provisioner-callback.service reports once multi-user.target is reached.
REAL_MARKS = [
    ("ipxe", r"iPXE initialising devices"),
    ("script", r"provisioner: sn01 -> "),
    ("files", r"initramfs\.img\.\.\. ok"),
    ("kernel", r"Linux version"),
    ("rootfs", r"fetching the root file system"),     # initramfs: drivers, DHCP done
    ("systemd", r"starting the image's init"),        # squashfs in RAM, overlay applied
    ("services", r"Reached target .*Multi-User System"),
    ("init", r"PROVISIONER-BOOTED"),                  # provisioner-callback.service runs
    ("callback", r"PROVISIONER-CALLBACK-OK"),
]
CONSOLE_MARKS = TINY_MARKS


def add_arguments(group) -> None:
    group.add_argument("--vm-rounds", type=int, default=3, metavar="R",
                       help="rounds of raw boot + switch to slurm + switch to k8s (default 3)")
    group.add_argument("--vm-pass-interval", type=float, default=1.0, metavar="S",
                       help="seconds between the end of a balancer pass and the next (default 1; cron: 60)")
    group.add_argument("--vm-images", choices=("tiny", "real"), default="tiny",
                       help="tiny: the test image for both roles (default); real: the Debian slurm and k8s "
                            "images, whose own slurmd and kubelet join (needs root, mmdebstrap; built once)")
    group.add_argument("--vm-power", choices=("ipmi", "both", "redfish", "all"), default="all",
                       help="real images: after the IPMI rounds, the same switches by kexec over SSH "
                            "(power_method kexec+ipmi; both), by Redfish (the VM a libvirt domain powered "
                            "through sushy-tools' emulator; redfish), or both of those (all, the default)")
    group.add_argument("--vm-redfish-rounds", type=int, default=None, metavar="R",
                       help="real images: rounds of the Redfish switches (default: --vm-rounds)")
    group.add_argument("--vm-join", choices=("cert", "both"), default="both",
                       help="real images: each round switches to k8s once with the kubelet client certificate "
                            "signed by provisioner before the reboot (cert) and, with both (default), once more "
                            "with kubernetes.kubelet_certificates: false (TLS bootstrap), to compare the joins")
    group.add_argument("--vm-keep", action="store_true", help="keep the working folder (consoles, logs, store)")


class Console:
    """Polls a VM's console after byte `since` and timestamps the first sight of each marker."""

    def __init__(self, vm, since: int, marks=None):
        import re

        self.vm, self.since = vm, since
        self.marks = [(name, re.compile(rx)) for name, rx in (marks or CONSOLE_MARKS)]
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set() and len(self.seen) < len(self.marks):
            text, now = self.vm.serial_text(self.since), time.time()
            for name, rx in self.marks:
                if name not in self.seen and rx.search(text):
                    self.seen[name] = now
            self.stop.wait(0.1)

    def done(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join(5)
        return dict(self.seen)


class Bench:
    def __init__(self, sim, pass_interval: float, marks=None):
        self.sim, self.pass_interval, self.marks = sim, pass_interval, marks or CONSOLE_MARKS
        self.site = config.load(sim.config)
        self.pass_seconds: list[float] = []

    def raw_boot(self) -> dict:
        sim, vm = self.sim, self.sim.vm("sn01")
        role = sim.state("sn01").desired_role
        n = len(sim.boots)
        console = Console(vm, vm.serial_mark(), self.marks)
        # An admin's boot, as `provisioner power sn01 boot` makes it: the node may fetch its
        # overlay's secrets (munge key, kubelet credentials) once in the window this opens.
        sim.store.grant_boot(["sn01"], actor="bench", reason="bench raw boot")
        t0 = time.time()
        result = run_action(self.site, [self.site.nodes["sn01"]], "boot", netboot=True)[0]
        if not result.ok:
            raise RuntimeError(f"IPMI boot of sn01 failed: {result.error}")
        wait_for(lambda: len(sim.boots) > n and (sim.boots[-1].get("joined") or sim.boots[-1].get("error")),
              sim.boot_timeout + 10, "sn01 to boot")
        record = sim.boots[-1]
        if not record.get("ok"):
            raise RuntimeError(f"sn01 did not boot: {record.get('error')}")
        state = sim.state("sn01")
        marks = console.done()
        return {"role": role, "seconds": state.booted_at - t0, "ipmi_s": record["started"] - t0,
                "console": {k: v - t0 for k, v in marks.items()}}

    def switch(self, to: str, submit, done, ready=None) -> dict:
        """submit() creates the pending work; done() is true once it runs on sn01; ready(), if
        given, once the node serves its new role (the kubelet Ready after its new boot)."""
        sim = self.sim
        first_event = (sim.store.events(limit=1) or [None])[-1]
        after = first_event.id if first_event else 0
        n = len(sim.boots)
        vm = sim.vm("sn01")
        console = Console(vm, vm.serial_mark(), self.marks)
        reached: dict[str, float] = {}
        stop = threading.Event()

        def watch():  # the goal, at 0.25 s resolution (the real scheduler runs on its own)
            while not stop.is_set():
                if ready is not None and "ready" not in reached and ready():
                    reached["ready"] = time.time()
                if "running" not in reached and done():
                    reached["running"] = time.time()
                stop.wait(0.25)

        t0 = time.time()
        submit()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            deadline = time.monotonic() + 300
            while "running" not in reached or sim.state("sn01").phase != "steady":
                started = time.monotonic()
                proc, report = sim.balance()
                self.pass_seconds.append(time.monotonic() - started)
                if report is None:
                    raise RuntimeError(f"balance failed: {proc.stderr[-500:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"switch to {to} not done in 300 s: {sim.states()}")
                time.sleep(self.pass_interval)
        finally:
            stop.set()
            watcher.join(5)
        marks = console.done()
        events = [e for e in sim.store.events(["sn01"]) if e.id > after]

        def first(pred) -> float | None:
            return next((e.ts for e in events if pred(e)), None)

        boot = next((b for b in sim.boots[n:] if b.get("ok")), None)
        how = next((e.message.split(":", 1)[0] for e in events if e.kind == "power"), "?")
        if boot is not None and (boot["role"] != to or sim.state("sn01").booted_role != to):
            raise RuntimeError(f"switch to {to}: the VM booted {boot['role']} (store: {sim.state('sn01').booted_role})")
        t = {
            "requested": first(lambda e: e.kind == "switch"),
            # the BMC got the reset; a kexec has no BMC: the store's power event (its end)
            "power": boot["started"] if boot else first(lambda e: e.kind == "power"),
            "callback": first(lambda e: e.kind == "booted"),
            # slurmd started / kubelet Ready by the harness (tiny); the real images' own daemons
            # join unseen by the harness: the balancer's "switched" follows their join
            "joined": (boot.get("joined") if boot else None) if sim.host_daemons else first(lambda e: e.kind == "switched"),
            "switched": first(lambda e: e.kind == "switched"),
            "running": reached["running"],
        }
        if ready is not None:
            t["ready"] = reached.get("ready")
        if None in t.values():
            raise RuntimeError(f"switch to {to}: missing timestamps {t}; events: {[e.message for e in events]}")
        return {"to": to, "how": how, "seconds": t["running"] - t0, "at": {k: v - t0 for k, v in t.items()},
                "console": {k: v - t0 for k, v in marks.items()}}


def _real_pod(name: str) -> dict:
    """A pod only sn01 can take (kn01 is full), from the k8s image's locally built busybox."""
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "main", "image": "provisioner.local/busybox:1",
                                     "imagePullPolicy": "Never", "command": ["sleep", "3600"],
                                     "resources": {"requests": {"cpu": "100m", "memory": "32Mi"}}}],
                     "terminationGracePeriodSeconds": 1, "automountServiceAccountToken": False}}


def _keep_fixed_busy(sim) -> None:
    """cn01's filler job sleeps 10 min; a long run outlives it, and a free cn01 would take the
    job meant to need sn01."""
    if not sim.slurm.run("squeue", "-h", "-t", "RUNNING", "-w", "cn01", "-o", "%i", check=False).split():
        sim.fill_fixed()


def _switch_to_k8s(bench: Bench, sim, pod: str) -> dict:
    """A pod only sn01 can take, until it is Running there; then the pod goes."""
    def runs() -> bool:
        p = sim.kube.pod(pod) or {}
        return p.get("spec", {}).get("nodeName") == "sn01" and p.get("status", {}).get("phase") == "Running"

    before = ((sim.kube.node("sn01") or {}).get("status") or {}).get("nodeInfo", {}).get("bootID")

    def ready() -> bool:  # the kubelet of the new boot reports Ready
        node = sim.kube.node("sn01") or {}
        return (node.get("status") or {}).get("nodeInfo", {}).get("bootID") != before and sim.kube.ready("sn01")

    result = bench.switch("k8s", lambda: sim.kube.api.create("/api/v1/namespaces/default/pods", _real_pod(pod)),
                          runs, ready)
    result["units"] = _unit_times(sim)
    sim.kube.api.delete(f"/api/v1/namespaces/default/pods/{pod}")
    wait_for(lambda: sim.kube.pod(pod) is None, 120, f"pod {pod} to be gone")
    return result


UNITS = ("containerd", "provisioner-import-images", "kubelet", "provisioner-callback")


def _unit_times(sim) -> dict:
    """When the k8s image's units started and ended, seconds since the kernel started (systemd's
    monotonic clock): whether the import of the container images holds kubelet back. {} when
    the node cannot be asked (never fails the run)."""
    props = "ExecMainStartTimestampMonotonic,ExecMainExitTimestampMonotonic,ActiveEnterTimestampMonotonic"
    try:
        text = sim.ssh("sn01", " ; ".join(f"echo unit={u}; systemctl show -p {props} {u}.service" for u in UNITS))
    except Exception:  # noqa: BLE001 - a measurement, not a check
        return {}
    out: dict = {}
    unit = None
    for line in text.splitlines():
        key, _, value = line.strip().partition("=")
        if key == "unit":
            unit = value
        elif unit and value.isdigit() and int(value):
            out.setdefault(unit, {})[key.replace("TimestampMonotonic", "")] = int(value) / 1e6
    return out


def _switch_to_slurm(bench: Bench, sim, name: str) -> dict:
    """A job only sn01 can take (cn01 kept busy), until it RUNS there; then it is cancelled."""
    job: dict = {}

    def submit():
        _keep_fixed_busy(sim)
        job["id"] = sim.slurm.sbatch(f"--job-name={name}", "--chdir=/tmp")

    result = bench.switch("slurm", submit, lambda: sim.slurm.job_state(job["id"]) == ("RUNNING", "sn01"))
    sim.slurm.run("scancel", job["id"])
    wait_for(lambda: not sim.slurm.job_state(job["id"])[0], 60, "the job to end")
    return result


def _real_world(workdir: Path, root: Path, name: str, redfish: tuple[str, ...] = ()):
    from testbed.vm_site import REAL_POLICY, ImageVmSite

    return ImageVmSite(workdir / name, root, kube=None, fixed="cn01", shared="sn01", fixed_k8s="kn01",
                       policy={**REAL_POLICY, "demand_persist_s": 0, "cooldown_s": 0}, redfish=redfish)


def _certificates(bench: Bench, sim, on: bool) -> None:
    """kubernetes.kubelet_certificates on or off for the next switches. Off: the kept certificate
    goes too (the boot server read its config at start), so the node bootstraps as before."""
    from provisioner import kubelet_certs, node_files

    sim.config = sim.write_config(kubernetes={"kubelet_certificates": on})
    bench.site = config.load(sim.config)
    if not on:
        node_files.path(bench.site, kubelet_certs.FOLDER, "sn01", kubelet_certs.CERT).unlink(missing_ok=True)


def _start(sim) -> Bench:
    sim.start()
    sim.slurm.wait_node_state("sn01", lambda st: st == "IDLE", timeout=300)
    bench = Bench(sim, 1.0, REAL_MARKS)
    sim.fill_fixed()
    sim.kube.add_pod("fill-kn01", node="kn01", requests={"cpu": "1", "memory": "128Mi"})
    return bench


def _redfish_rounds(out: dict, workdir: Path, root: Path, rounds: int, interval: float, power: str) -> None:
    """The same switches by Redfish: sn01 is a libvirt domain, its BMC sushy-tools' emulator
    (libvirt driver); a world of its own (the VM is libvirt's, not the harness's qemu)."""
    if power not in ("redfish", "all"):
        return
    sim = _real_world(workdir, root, "site-redfish", redfish=("sn01",))
    try:
        bench = _start(sim)
        bench.pass_interval = interval
        out["redfish_to_k8s"], out["redfish_to_slurm"] = [], []
        for r in range(rounds):
            out["redfish_to_k8s"].append(_switch_to_k8s(bench, sim, f"bench-redfish-{r}"))
            out["redfish_to_slurm"].append(_switch_to_slurm(bench, sim, "bench-redfish"))
        out["violations"] += list(sim.violations)
    finally:
        sim.stop()


def _run_real(args) -> dict:
    """The real images: per round, a raw boot of the slurm image, the switch to k8s (a pod runs
    in containerd under the VM's kubelet), a raw boot of the k8s image, the switch back (a job
    runs on the VM's slurmd); with --vm-join both, a second pair of switches, the one to k8s by
    TLS bootstrap (kubernetes.kubelet_certificates: false). Then kexec and/or Redfish rounds."""
    from testbed.vm import accelerator
    from testbed.vm_site import build_images

    rounds = getattr(args, "vm_rounds", 3)
    interval = getattr(args, "vm_pass_interval", 1.0)
    power = getattr(args, "vm_power", "all")
    both_joins = getattr(args, "vm_join", "both") == "both"
    workdir = Path(tempfile.mkdtemp(prefix="bench-vm-real-"))
    root = build_images(workdir / "images")
    versions = {name: images.current(root, name) for name in ("slurm", "k8s")}
    sim = _real_world(workdir, root, "site")
    out: dict = {"images": "real", "rounds": rounds, "pass_interval_s": interval, "accel": accelerator(),
                 "image": versions, "raw_slurm": [], "raw_k8s": [], "to_slurm": [], "to_k8s": [],
                 "bootstrap_to_k8s": [], "workdir": str(workdir)}
    try:
        bench = _start(sim)
        bench.pass_interval = interval
        for r in range(rounds):
            out["raw_slurm"].append(bench.raw_boot())
            # A reboot slurmctld did not ask for leaves the node DOWN ("Node unexpectedly
            # rebooted"); an admin resumes it after a manual power cycle, and so does the bench.
            wait_for(lambda: "sn01" in sim.slurm.run("sinfo", "-h", "-R", "-o", "%N", check=False), 120,
                     "slurmctld to mark sn01's reboot")
            sim.slurm.run("scontrol", "update", "nodename=sn01", "state=resume", check=False)
            sim.slurm.wait_node_state("sn01", lambda st: st == "IDLE", timeout=300)
            out["to_k8s"].append(_switch_to_k8s(bench, sim, f"bench-{r}"))
            out["raw_k8s"].append(bench.raw_boot())
            wait_for(lambda: sim.kube.ready("sn01"), 300, "sn01's kubelet to report Ready again")
            out["to_slurm"].append(_switch_to_slurm(bench, sim, "bench"))
            if both_joins:
                _certificates(bench, sim, False)
                out["bootstrap_to_k8s"].append(_switch_to_k8s(bench, sim, f"bench-bootstrap-{r}"))
                _certificates(bench, sim, True)
                out["to_slurm"].append(_switch_to_slurm(bench, sim, "bench"))
        if power in ("both", "all"):
            # The same switches by kexec: provisioner SSHes into the node (its own host key,
            # known_hosts from `provisioner ssh known-hosts`) and kexecs it; no BMC, no firmware.
            sim.node_fields["sn01"] = {"power_method": "kexec+ipmi"}
            sim.config = sim.write_config(power={"ssh": {"user": "root", "key_file": str(sim.ssh_key),
                                                         "known_hosts": str(sim.known_hosts)}})
            bench.site = config.load(sim.config)
            out["kexec_to_k8s"], out["kexec_to_slurm"] = [], []
            for r in range(rounds):
                out["kexec_to_k8s"].append(_switch_to_k8s(bench, sim, f"bench-kexec-{r}"))
                out["kexec_to_slurm"].append(_switch_to_slurm(bench, sim, "bench-kexec"))
        out["pass_s_median"] = statistics.median(bench.pass_seconds)
        out["violations"] = list(sim.violations)
    finally:
        sim.stop()
    try:
        _redfish_rounds(out, workdir, root, getattr(args, "vm_redfish_rounds", None) or rounds, interval, power)
    except Exception as exc:  # noqa: BLE001 - the IPMI and kexec results stand; say why Redfish has none
        out["redfish_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if not getattr(args, "vm_keep", False):
            shutil.rmtree(workdir, ignore_errors=True)

    def boot_s(rows):  # power action -> boot callback
        return statistics.median(x["at"]["callback"] - x["at"]["power"] for x in rows)

    for other in ("kexec", "redfish"):
        if not out.get(f"{other}_to_k8s"):
            continue
        out[other] = {}
        for key in ("to_k8s", "to_slurm"):
            out[other][key] = {
                "ipmi_switch_s": statistics.median(x["seconds"] for x in out[key]),
                "other_switch_s": statistics.median(x["seconds"] for x in out[f"{other}_{key}"]),
                "ipmi_boot_s": boot_s(out[key]), "other_boot_s": boot_s(out[f"{other}_{key}"]),
                "methods": sorted({x["how"] for x in out[f"{other}_{key}"]})}
            k = out[other][key]
            k["ratio"] = k["other_switch_s"] / k["ipmi_switch_s"]
    if out.get("kexec"):
        out["kexec_met"] = all(k["ratio"] <= 0.5 for k in out["kexec"].values())
    if out.get("redfish"):
        out["redfish_met"] = all(abs(k["ratio"] - 1) <= 0.10 for k in out["redfish"].values())
    for key, raw_key in (("to_slurm", "raw_slurm"), ("to_k8s", "raw_k8s"), ("bootstrap_to_k8s", "raw_k8s")):
        if out[key]:
            out[f"{raw_key}_median_s"] = statistics.median(x["seconds"] for x in out[raw_key])
            out[f"{key}_median_s"] = statistics.median(x["seconds"] for x in out[key])
            out[f"{key}_overhead_s"] = out[f"{key}_median_s"] - out[f"{raw_key}_median_s"]
    out["raw"] = out["raw_slurm"] + out["raw_k8s"]
    out["met"] = all(out[f"{k}_overhead_s"] <= TARGET_OVERHEAD_S for k in ("to_slurm", "to_k8s"))
    return out


def run(args) -> dict:
    if getattr(args, "vm_images", "tiny") == "real":
        return _run_real(args)
    from testbed.vm_site import VmSite
    from testbed.tinyimage import CACHE, DEFINITIONS
    from testbed.vm import accelerator

    rounds = getattr(args, "vm_rounds", 3)
    interval = getattr(args, "vm_pass_interval", 1.0)
    workdir = Path(tempfile.mkdtemp(prefix="bench-vm-"))
    built = images.build(DEFINITIONS, workdir / "images", "tiny", cache=CACHE, actor="bench")
    sim = VmSite(workdir / "site", workdir / "images", shared="sn01", roles={"sn01": "k8s"},
                 policy={"demand_persist_s": 0, "cooldown_s": 0})
    out: dict = {"rounds": rounds, "pass_interval_s": interval, "accel": accelerator(), "image": built.version,
                 "raw": [], "to_slurm": [], "to_k8s": [], "workdir": str(workdir)}
    try:
        sim.start()
        bench = Bench(sim, interval)
        sim.fill_fixed()  # cn01 busy for the whole run: SLURM work needs a shared node
        sim.kube.add_pod("fill-kn01", node="kn01", requests={"cpu": "1", "memory": "128Mi"})
        for r in range(rounds):
            out["raw"].append(bench.raw_boot())
            job: dict = {}

            def submit_job():
                _keep_fixed_busy(sim)
                job["id"] = sim.slurm.sbatch("--job-name=bench")

            out["to_slurm"].append(bench.switch("slurm", submit_job,
                                                lambda: sim.slurm.job_state(job["id"]) == ("RUNNING", "sn01")))
            sim.slurm.run("scancel", job["id"])
            wait_for(lambda: not sim.slurm.job_state(job["id"])[0], 30, "the job to end")
            pod = f"bench-{r}"
            out["to_k8s"].append(bench.switch(
                "k8s", lambda: sim.kube.add_pod(pod, namespace="bench", requests={"cpu": "1", "memory": "128Mi"}),
                lambda: any(p["metadata"]["name"] == pod and p["spec"].get("nodeName") == "sn01"
                            for p in sim.kube.pods())))
            sim.kube.set_pod_phase("bench", pod, "Succeeded")
        out["pass_s_median"] = statistics.median(bench.pass_seconds)
        out["violations"] = list(sim.violations)
    finally:
        sim.stop()
        if not getattr(args, "vm_keep", False):
            shutil.rmtree(workdir, ignore_errors=True)
    raw = statistics.median(x["seconds"] for x in out["raw"])
    out["raw_median_s"] = raw
    for key in ("to_slurm", "to_k8s"):
        out[f"{key}_median_s"] = statistics.median(x["seconds"] for x in out[key])
        out[f"{key}_overhead_s"] = out[f"{key}_median_s"] - raw
    out["met"] = all(out[f"{k}_overhead_s"] <= TARGET_OVERHEAD_S for k in ("to_slurm", "to_k8s"))
    return out


def _stats(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def summary(result: dict) -> str:
    raw = [x["seconds"] for x in result["raw"]]
    lines = [f"{result['rounds']} rounds, qemu {result['accel'].upper()}, balancer passes back to back "
             f"({result['pass_interval_s']:g} s apart; one pass takes {result['pass_s_median']:.1f} s)", "",
             "| measured | median s (min-max) | overhead over the raw boot |", "| --- | ---: | ---: |",
             *([f"| raw boot: IPMI boot -> callback | {_stats(raw)} | |"] if "raw_slurm" not in result else
               [f"| raw boot of the {img} image: IPMI boot -> callback | "
                f"{_stats([x['seconds'] for x in result['raw_' + img]])} | |" for img in ("slurm", "k8s")])]
    if result.get("images") == "real":
        lines[0] = "Real images (Debian slurm and k8s: their own slurmd and kubelet); " + lines[0]
    for key, what in (("to_slurm", "switch k8s -> slurm: job submitted -> running on the VM"),
                      ("to_k8s", "switch slurm -> k8s: pod submitted -> running on the VM")):
        lines.append(f"| {what} | {_stats([x['seconds'] for x in result[key]])} | "
                     f"{result[f'{key}_overhead_s']:+.1f} s"
                     + (f" (over the {key[3:]} image's)" if "raw_slurm" in result else "") + " |")
    lines += ["", "Where the time goes (median s since the power action for the raw boot; since the work was "
                  "submitted for the switches):", "",
              "| phase | raw boot | to slurm | to k8s |", "| --- | ---: | ---: | ---: |"]

    def med(rows, path) -> str:
        vals = [r[path[0]].get(path[1]) for r in rows]
        vals = [v for v in vals if v is not None]
        return f"{statistics.median(vals):.1f}" if vals else "-"

    rows = [("balancer requested the switch", ("at", "requested")),
            ("BMC got the reset (cordon/drain + IPMI done)", ("at", "power"))]
    marks = REAL_MARKS if result.get("images") == "real" else TINY_MARKS
    rows += [(f"console: {name}", ("console", name)) for name, _ in marks]
    rows += [("callback recorded by the server", ("at", "callback")),
             ("slurmd started / kubelet Ready", ("at", "joined")),
             ("kubelet of the new boot Ready (polled every 0.25 s)", ("at", "ready")),
             ("balancer: switch done (resumed / uncordoned)", ("at", "switched")),
             ("the work runs on the VM", ("at", "running"))]
    for label, path in rows:
        raw_v = med(result["raw"], path) if path[0] == "console" else "-"
        lines.append(f"| {label} | {raw_v} | {med(result['to_slurm'], path)} | {med(result['to_k8s'], path)} |")
    lines.append("")
    # Less sensitive to the boot's own spread (other load on the machine): each switch's time
    # outside its own boot (submitted -> reset, callback -> running).
    outside = {k: [x["seconds"] - (x["at"]["callback"] - x["at"]["power"]) for x in result[k]]
               for k in ("to_slurm", "to_k8s")}
    lines.append(f"- each switch's time outside its own boot (submitted -> reset + callback -> running), "
                 f"median (min-max): to slurm {_stats(outside['to_slurm'])} s, to k8s {_stats(outside['to_k8s'])} s")
    lines.append(f"- target: switch overhead <= {TARGET_OVERHEAD_S:g} s over the raw boot: "
                 f"{'met' if result['met'] else 'MISSED'} (to slurm {result['to_slurm_overhead_s']:+.1f} s, "
                 f"to k8s {result['to_k8s_overhead_s']:+.1f} s)")
    for other, name, goal in (("kexec", "kexec", "<= 0.5 x"), ("redfish", "Redfish", "within 10 % of")):
        if not result.get(other):
            continue
        lines += ["", f"| switch (median s) | by IPMI | by {name} | {name} / IPMI | power -> callback: IPMI | "
                      f"{name} |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for key, what in (("to_k8s", "slurm -> k8s"), ("to_slurm", "k8s -> slurm")):
            k = result[other][key]
            lines.append(f"| {what} | {k['ipmi_switch_s']:.1f} | {k['other_switch_s']:.1f} | {k['ratio']:.2f} | "
                         f"{k['ipmi_boot_s']:.1f} | {k['other_boot_s']:.1f} |")
        lines.append(f"- target: a {name} switch takes {goal} an IPMI switch: "
                     f"{'met' if result[f'{other}_met'] else 'MISSED'} (power methods recorded: "
                     f"{', '.join(sorted({m for k in result[other].values() for m in k['methods']}))})")
    if result.get("bootstrap_to_k8s"):
        lines += ["", "The join, switch slurm -> k8s (median s (min-max)):", "",
                  "| join | switch: pod submitted -> running | overhead over the raw boot | callback -> kubelet Ready |"
                  " Ready -> pod Running | callback -> pod Running |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for key, what in (("bootstrap_to_k8s", "before: TLS bootstrap (bootstrap token)"),
                          ("to_k8s", "after: client certificate signed by provisioner before the reboot")):
            rows = [x for x in result[key] if x["at"].get("ready") is not None]
            lines.append(f"| {what} | {_stats([x['seconds'] for x in result[key]])} | "
                         f"{result[f'{key}_overhead_s']:+.1f} s | "
                         f"{_stats([x['at']['ready'] - x['at']['callback'] for x in rows])} | "
                         f"{_stats([x['at']['running'] - x['at']['ready'] for x in rows])} | "
                         f"{_stats([x['at']['running'] - x['at']['callback'] for x in rows])} |")
    units = [x.get("units") or {} for x in result.get("to_k8s", []) + result.get("bootstrap_to_k8s", [])]
    imports = [u for u in units if "ExecMainExit" in u.get("provisioner-import-images", {})
               and "ExecMainStart" in u.get("kubelet", {})]
    if imports:
        def span(u, a, b):
            return u[a[0]][a[1]] - u[b[0]][b[1]]
        imp = [span(u, ("provisioner-import-images", "ExecMainExit"), ("provisioner-import-images", "ExecMainStart"))
               for u in imports]
        wait = [span(u, ("kubelet", "ExecMainStart"), ("provisioner-import-images", "ExecMainExit")) for u in imports]
        kub = [u["kubelet"]["ExecMainStart"] for u in imports]
        lines.append(f"- the k8s image's import of its container images (provisioner-import-images) takes "
                     f"{_stats(imp)} s; kubelet starts {_stats(wait)} s after it ends, {_stats(kub)} s after the "
                     f"kernel (systemd's monotonic clock, {len(imports)} boots)")
    if result.get("redfish_error"):
        lines.append(f"- the Redfish rounds failed: {result['redfish_error']}")
    if result.get("violations"):
        lines.append(f"- WARNING: nodes rebooted while they ran work: {result['violations']}")
    return "\n".join(lines)
