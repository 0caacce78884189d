"""The soak: the real daemons, a seeded random workload and seeded random faults for N seconds,
then the counters that must be 0.

The world is testbed/simnodes.py's SimSite (real slurmctld/slurmd, the real Kubernetes control
plane with simulated kubelets, BMC simulators, the real boot server) with its store on a real
PostgreSQL (testbed/postgres.py), and two "hosts": two site configs over that one store, each
with its own `provisioner run` daemon and its own `provisioner serve`. The nodes boot from host
A's boot server (a node has one boot URL); host B's serves too and is faulted alike.

Workload (seeded): SLURM jobs and pods that each want a whole shared node for a while (the fixed
nodes are kept full), and now and then slurmctld's ResumeProgram ask (`provisioner slurm resume`,
the command slurmctld runs) for a node on the Kubernetes side.
Faults (seeded, one at a time): kill -9 of a `provisioner run` daemon (restarted), of a boot
server (restarted), of PostgreSQL (restarted through crash recovery); a BMC that stops answering
for a while; the API server stopped and started; slurmctld stopped and started.

Counters (from the store's event log and asks, the harness's violation records, the BMC
simulators' power logs): switches done, faults injected, and what must be 0: nodes stranded
(not steady serving the side the store says, after the faults stopped and a settle time), jobs or
pods killed by a switch (a reboot of a node that ran work), double power actions (a BMC boot no
power intent accounts for), asks unanswered, and harness errors outside a fault's window.

    soak = Soak(sim, pg, seed=7, duration_s=180, log=print)   # sim: started SimSite on pg
    result = soak.run()                                        # daemons stopped on the way out
    print(result.summary()); assert result.ok

The seed is printed first: the same seed replays the same workload and fault schedule (the
daemons' timing still varies).
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from testbed.boot_server import BootServer
from testbed.postgres import PostgresServer
from testbed.process import free_port, stop_group
from testbed.simnodes import NODE_CPU, ROOT, SimSite, provisioner_cmd

# Soak-sized policy: faults shorter than a phase's timeout, a retry or two for a boot a fault spoiled.
POLICY = {"demand_persist_s": 0, "cooldown_s": 5, "phase_timeout_s": 30, "max_retries": 2, "max_in_flight": 2}
RUN = {"interval_s": 5, "busy_interval_s": 1, "ask_poll_s": 0.5}
BOOT_ACTIONS = ("boot", "on", "reset", "cycle")  # power actions that boot a node
FAULTS = ("kill-run", "kill-boot-server", "kill-postgres", "bmc-silent", "restart-apiserver", "restart-slurmctld")
FAULT_GAP_S = (5.0, 15.0)  # seconds between one fault's end and the next one
GRACE_S = 20.0  # harness errors this long after a fault ended are that fault's (a boot it spoiled)
WORK_S = (15, 45)  # how long a job or a pod runs
TICK_S = (2.0, 6.0)  # seconds between two workload steps
MAX_WAITING = 2  # pending jobs / unschedulable pods the generator keeps at most


@dataclass
class SoakResult:
    seed: int
    duration_s: float
    switches_done: int = 0
    faults_injected: dict[str, int] = field(default_factory=dict)
    jobs_submitted: int = 0
    pods_created: int = 0
    asks_made: int = 0
    nodes_stranded: list[str] = field(default_factory=list)
    work_killed: list[str] = field(default_factory=list)
    double_power: list[str] = field(default_factory=list)
    asks_unanswered: list[str] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)  # outside every fault's window
    expected_errors: list[str] = field(default_factory=list)  # inside one (a boot that met a stopped boot server...)
    # Power actions the harness could not check for running work (squeue or the API server down
    # at that moment): not counted as killed work, listed so a reader sees how many.
    unverified_power: list[str] = field(default_factory=list)
    # IPMI requests a client sent again (no answer in time) that the BMCs answered without running
    # them again: how loaded the machine was, not a fault.
    retransmissions: int = 0
    settle_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.switches_done > 0 and sum(self.faults_injected.values()) > 0 and not self.nodes_stranded
                and not self.work_killed and not self.double_power and not self.asks_unanswered
                and not self.harness_errors)

    def summary(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults_injected.items())) or "none"
        lines = [
            f"soak: seed {self.seed}, {self.duration_s:.0f} s, settled in {self.settle_s:.0f} s",
            f"  switches done:          {self.switches_done}",
            f"  faults injected:        {sum(self.faults_injected.values())} ({faults})",
            f"  workload:               {self.jobs_submitted} jobs, {self.pods_created} pods, {self.asks_made} asks",
            f"  nodes stranded:         {len(self.nodes_stranded)} (must be 0)",
            f"  jobs or pods killed:    {len(self.work_killed)} (must be 0)",
            f"  double power actions:   {len(self.double_power)} (must be 0)",
            f"  asks unanswered:        {len(self.asks_unanswered)} (must be 0)",
            f"  harness errors:         {len(self.harness_errors)} (must be 0; {len(self.expected_errors)} in fault windows)",
            f"  power actions the harness could not check for work (a cluster down): {len(self.unverified_power)}",
            f"  IPMI retransmissions (answered again, not run again): {self.retransmissions}",
        ]
        for label, items in (("stranded", self.nodes_stranded), ("killed", self.work_killed),
                             ("double power", self.double_power), ("unanswered", self.asks_unanswered),
                             ("harness error", self.harness_errors)):
            lines += [f"  {label}: {item}" for item in items[:10]]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {**asdict(self), "faults_total": sum(self.faults_injected.values()), "ok": self.ok}


class Host:
    """One host of the site: its config, its `provisioner serve` and its `provisioner run`."""

    def __init__(self, name: str, config: Path, port: int, workdir: Path, boot: BootServer | None = None):
        self.name, self.config, self.port, self.workdir = name, config, port, workdir
        self.boot = boot or BootServer(config, port, workdir / f"serve-{name}.log")
        self.run_log = workdir / f"run-{name}.log"
        self.proc: subprocess.Popen | None = None

    def start_run(self) -> None:
        with open(self.run_log, "a") as fh:
            self.proc = subprocess.Popen([*provisioner_cmd(), "--config", str(self.config), "run"], stdout=fh,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                         start_new_session=True)

    def kill_run(self) -> None:
        stop_group(self.proc, signal.SIGKILL, 10)

    def stop_run(self) -> None:
        stop_group(self.proc, signal.SIGTERM, 60)

    def kill_boot_server(self) -> None:
        stop_group(self.boot.proc, signal.SIGKILL, 10)

    def start_boot_server(self) -> None:
        self.boot.start()


class Soak:
    def __init__(self, sim: SimSite, pg: PostgresServer, *, seed: int | None = None, duration_s: float = 180,
                 settle_s: float | None = None, log: Callable[[str], None] = print):
        self.sim, self.pg = sim, pg
        self.seed = seed if seed is not None else random.SystemRandom().randrange(1, 2**31)
        self.duration_s = duration_s
        pol = {**sim.policy, **POLICY}
        # Once faults stop, every switch ends within phase_timeout_s x (max_retries + 2).
        self.settle_s = settle_s if settle_s is not None else pol["phase_timeout_s"] * (pol["max_retries"] + 2)
        self.log = log
        self.rng = random.Random(self.seed)
        self.result = SoakResult(self.seed, duration_s)
        self.windows: list[tuple[float, float]] = []  # (start, end) of each fault, time.time()
        self.faulting_since: float | None = None
        self.hosts: list[Host] = []
        self.work: list[tuple[float, str, str]] = []  # (ends at, "pod", name) of the pods to delete
        self.n = Counter()
        self.deck: list[str] = []
        self.current: tuple[str, Host, str] | None = None  # the fault on now: kind, host, node

    # -- set-up --------------------------------------------------------------------------

    def _setup(self) -> None:
        sim = self.sim
        # Half the shared nodes start on each side: the workload moves them both ways.
        sim.reset(roles={n: "k8s" for n in sim.shared[len(sim.shared) // 2:]}, policy=POLICY)
        sim.config = sim.write_config(POLICY, run=RUN)  # host A: the config the nodes' boot server reads
        work = sim.workdir
        port_b = free_port()
        host_b = sim.write_config(POLICY, run=RUN, folder=work / "host-b-site",
                                  store={"state_dir": str(work / "host-b"), "listen": f"127.0.0.1:{port_b}",
                                         "boot_url": f"http://127.0.0.1:{port_b}"})
        self.hosts = [Host("a", sim.config, sim.port, work, boot=sim.boot), Host("b", host_b, port_b, work)]
        self.hosts[1].start_boot_server()
        # The fixed nodes stay full for the whole soak: the workload needs the shared ones.
        for name in sim.fixed:
            sim.slurm.sbatch(nodelist=name, wrap="sleep 86400")
        for name in sim.fixed_k8s:
            sim.kube.add_pod(f"soak-fixed-{name}", node=name, requests={"cpu": NODE_CPU, "memory": "128Mi"})
        for host in self.hosts:
            host.start_run()

    def _teardown(self) -> None:
        self._end_fault()
        for host in self.hosts:
            host.stop_run()
        if len(self.hosts) > 1:
            self.hosts[1].boot.stop()
        self.sim.reap_passes()  # detached passes `provisioner slurm resume` may have started

    # -- the run -------------------------------------------------------------------------

    def run(self) -> SoakResult:
        self.log(f"soak: seed {self.seed} (replay: --seed {self.seed}), {self.duration_s:.0f} s, "
                 f"workdir {self.sim.workdir}")
        t0 = time.time()
        self._setup()
        first_event = self.sim.first_event
        try:
            end = time.monotonic() + self.duration_s
            next_work = time.monotonic()
            next_fault = time.monotonic() + self.rng.uniform(*FAULT_GAP_S)
            fault_end: float | None = None
            while time.monotonic() < end:
                now = time.monotonic()
                if fault_end is not None and now >= fault_end:
                    self._end_fault()
                    fault_end = None
                    next_fault = now + self.rng.uniform(*FAULT_GAP_S)
                elif fault_end is None and now >= next_fault and end - now > 30:
                    fault_end = now + self._start_fault()
                if now >= next_work:
                    self._guard(self._workload_step, "workload")
                    next_work = now + self.rng.uniform(*TICK_S)
                self._collect_errors()
                time.sleep(0.5)
            self._end_fault()
            self.log(f"soak: {time.time() - t0:.0f} s; faults stopped, settling (at most {self.settle_s:.0f} s)")
            self._settle()
            self._count(first_event)
        finally:
            self._teardown()
        self._collect_errors()
        self.result.work_killed = list(self.sim.violations)
        self.sim.violations.clear()
        return self.result

    def _guard(self, step: Callable[[], None], what: str) -> None:
        """A step of the generator that meets a fault (slurmctld down...) is skipped, not fatal."""
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - the next tick tries again
            if not self._in_window():
                self.result.harness_errors.append(f"{time.strftime('%H:%M:%S')} {what}: {type(exc).__name__}: {exc}")

    # -- workload ------------------------------------------------------------------------

    def _workload_step(self) -> None:
        sim, now = self.sim, time.monotonic()
        for item in [w for w in self.work if w[0] <= now]:
            sim.kube.delete_pod(item[2], "soak")
            self.work.remove(item)
        pick = self.rng.random()
        life = self.rng.randint(*WORK_S)
        if pick < 0.45:
            pending = sim.slurm.run("squeue", "-h", "-t", "PD", "-o", "%i").split()
            if len(pending) < MAX_WAITING:
                sim.slurm.sbatch("--job-name=soak", wrap=f"sleep {life}")
                self.result.jobs_submitted += 1
        elif pick < 0.9:
            unbound = [p for p in sim.kube.pods(namespace="soak") if not p["spec"].get("nodeName")]
            if len(unbound) < MAX_WAITING:
                self.n["pod"] += 1
                name = f"soak-{self.n['pod']}"
                sim.kube.add_pod(name, namespace="soak", requests={"cpu": NODE_CPU, "memory": "128Mi"})
                self.work.append((now + life, "pod", name))
                self.result.pods_created += 1
        else:  # slurmctld's ResumeProgram, as slurmctld runs it, for a node on the Kubernetes side
            k8s_side = [n for n, s in sim.store.nodes(sim.shared).items() if s.desired_role == "k8s"]
            if k8s_side:
                node = self.rng.choice(sorted(k8s_side))
                proc = sim.cli("slurm", "resume", node, timeout=60)
                if proc.returncode == 0:
                    self.result.asks_made += 1

    # -- faults --------------------------------------------------------------------------

    def _start_fault(self) -> float:
        """Inject one fault; returns how long it lasts (its end undoes it)."""
        if not self.deck:  # every kind once per round, in a seeded order: a short soak meets them all
            self.deck = self.rng.sample(FAULTS, len(FAULTS))
        kind = self.deck.pop()
        self.current = kind, self.rng.choice(self.hosts), self.rng.choice(self.sim.shared)
        self.faulting_since = time.time()
        self.result.faults_injected[kind] = self.result.faults_injected.get(kind, 0) + 1
        _, host, node = self.current
        self.log(f"soak: {time.strftime('%H:%M:%S')} fault: {kind}"
                 + (f" (host {host.name})" if kind in ("kill-run", "kill-boot-server") else "")
                 + (f" ({node})" if kind == "bmc-silent" else ""))
        if kind == "kill-run":
            host.kill_run()
            return self.rng.uniform(1, 6)
        if kind == "kill-boot-server":
            host.kill_boot_server()
            return self.rng.uniform(1, 4)
        if kind == "kill-postgres":
            self.pg.crash()
            return self.rng.uniform(1, 5)
        if kind == "bmc-silent":
            self.sim.bmc.set_fault(node, "silent")
            return self.rng.uniform(5, 15)
        if kind == "restart-apiserver":
            self.sim.kube.plane.stop_apiserver()
            return self.rng.uniform(2, 8)
        self.sim.slurm.stop_slurmctld()
        return self.rng.uniform(2, 8)

    def _end_fault(self) -> None:
        if self.faulting_since is None:
            return
        kind, host, node = self.current
        if kind == "kill-run":
            host.start_run()
        elif kind == "kill-boot-server":
            host.start_boot_server()
        elif kind == "kill-postgres":
            self.pg.resume()
            # The harness's own connection is dead too; its next read would fail once (it is a
            # client like any other: the daemons' and boot servers' connections are left as they are).
            self.sim.store.close()
        elif kind == "bmc-silent":
            self.sim.bmc.set_fault(node, None)
        elif kind == "restart-apiserver":
            self.sim.kube.plane.start_apiserver()
        else:
            self.sim.slurm.start_slurmctld()
        self.windows.append((self.faulting_since, time.time()))
        self.faulting_since = None

    def _in_window(self) -> bool:
        """A fault is on, or ended less than GRACE_S ago."""
        now = time.time()
        return self.faulting_since is not None or any(end + GRACE_S >= now for _, end in self.windows)

    def _collect_errors(self) -> None:
        """The harness's errors, sorted: inside a fault's window (or its grace after) they are the
        fault's; outside, they fail the soak."""
        in_window = self._in_window()
        for err in self.sim.take_errors():
            if "could not check for running work" in err:
                self.result.unverified_power.append(err)
            elif in_window:
                self.result.expected_errors.append(err)
            else:
                self.result.harness_errors.append(err)

    # -- the end -------------------------------------------------------------------------

    def _settled(self) -> list[str]:
        sim = self.sim
        states = sim.store.nodes(sim.shared)
        return [f"{n}: {s.phase} (desired {s.desired_role}, serving {sorted(sim.serving(n))}"
                + (f", {s.failed_reason}" if s.failed_reason else "") + ")"
                for n, s in states.items() if s.phase != "steady" or sim.serving(n) != {s.desired_role}]

    def _settle(self) -> None:
        start = time.monotonic()
        deadline = start + self.settle_s
        stranded: list[str] = ["not looked at yet"]
        while time.monotonic() < deadline:
            self._collect_errors()
            try:
                stranded = self._settled()
                if not stranded and not self._open_asks():
                    break
            except Exception as exc:  # noqa: BLE001 - a store or cluster still coming back
                stranded = [f"cannot look: {type(exc).__name__}: {exc}"]
            time.sleep(1)
        self.result.settle_s = time.monotonic() - start
        self.result.nodes_stranded = stranded

    def _open_asks(self) -> list[str]:
        shared = set(self.sim.shared)
        return [f"{a.node}: {a.kind} from {a.source} (ask {a.id})" for a in self.sim.store.open_asks()
                if a.node in shared]

    def _count(self, first_event: int) -> None:
        sim, r = self.sim, self.result
        events = [e for e in sim.store.events(sim.shared, include_site=False) if e.id >= first_event]
        r.switches_done = sum(1 for e in events if e.kind == "switched")
        r.asks_unanswered = self._open_asks()
        r.retransmissions = sum(1 for e in list(sim.bmc.events) if e.get("event") == "duplicate")
        for name in sim.shared:
            boots = [e for e in list(sim.bmc.events) if e.get("bmc") == name and e.get("event") == "power"
                     and e.get("action") in ("on", "reset", "cycle") and e.get("boot")]
            mine = [e for e in events if e.node == name]
            # A boot's written intent: a switch's power-intent, or the boot window a pass opens
            # before it powers a node on for slurmctld's resume (its pass may die before the record).
            intents = [e for e in mine if e.kind in ("power-intent", "boot-granted")]
            ok = [e for e in mine if e.kind == "power" and (e.data or {}).get("ok")
                  and (e.data or {}).get("action") in BOOT_ACTIONS]
            attempts = 0
            for e in ok:  # the power module's retry of an attempt that timed out after the reset was sent boots again
                m = re.match(r"(\d+) attempts", (e.data or {}).get("note") or "")
                attempts += int(m.group(1)) if m else 1
            # An intent whose action was never recorded (its pass killed) may have booted once.
            allowed = attempts + max(0, len(intents) - len(ok))
            if len(boots) > allowed:
                # What the next reader needs to tell a second power action from a miscount.
                when = ", ".join(time.strftime("%H:%M:%S", time.localtime(b["boot"]["ts"])) for b in boots)
                told = "; ".join(f"{time.strftime('%H:%M:%S', time.localtime(e.ts))} {e.actor} {e.kind}: "
                                 f"{e.message[:80]}" for e in mine if e.kind in ("power-intent", "boot-granted", "power"))
                r.double_power.append(f"{name}: {len(boots)} BMC boots for {len(intents)} power intents "
                                      f"({len(ok)} recorded, {attempts} attempts); boots at {when}; events: {told}")
