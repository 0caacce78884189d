"""Simulated shared nodes: a real SLURM cluster, a real Kubernetes control plane (testbed/),
BMC simulators and the real boot endpoint, tied together by one site.yaml. No VM: a node is its BMC + its boot
+ its daemon.

When a simulated node's BMC gets a power on / reset / cycle, the node "boots" (in a worker
thread, never inside the BMC's handler), as a real diskless node would:

1. it asks the real boot server for its script (`GET /ipxe?mac=<its MAC>`) and reads
   `provisioner.role=`, `provisioner.version=`, `provisioner.callback=` and `provisioner.token=`
   from the kernel line (given the waiting script, it asks again a few times, as iPXE does);
2. it becomes that role: slurm -> its real slurmd starts; k8s -> its simulated kubelet starts:
   registers the Node when Kubernetes has none, posts Ready with a new bootID, renews its Lease;
3. it POSTs the boot callback (role, version, token) from its own loopback address (node.ip), so
   the boot server's source check is exercised too (after a 429, store busy, it calls again).
Power off (and the first moment of a reset): slurmd stops, the kubelet's heartbeats stop; the
real node-lifecycle controller marks the Node NotReady after its grace period, so for a few
seconds a rebooting node still looks Ready, as in production.

A reboot of a node that still runs a SLURM job or a pod would kill that work: the harness records
it in `violations`. The harness fails closed: an observation it cannot make (squeue or the API
server failing while it checks a power action for running work), a boot step that fails (no
script, a refused callback: the node then never joins), an exception in its BMC hook and an error
of the simulated kubelets are recorded in `errors`, and `check()` (every fixture's teardown)
fails the test on any of them. A test that causes one on purpose takes it with `take_errors()`
and asserts on it.

Outside pytest (the demo uses it):

    python -m testbed.simnodes --workdir /tmp/sim [--k8s 'sn[03-04]']

starts everything, prints the config path, and waits for Ctrl-C / SIGTERM; everything it started
is stopped by pid on the way out.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # python -m testbed.simnodes from anywhere
    sys.path.insert(0, str(ROOT))

from provisioner.nodeset import expand  # noqa: E402
from testbed.bmc_sim import BmcSim, BmcSpec  # noqa: E402
from testbed.boot_server import BootServer  # noqa: E402
from testbed.site import mac, write_site  # noqa: E402
from testbed.slurm_cluster import SlurmCluster
from testbed.wait import wait_for  # noqa: E402
from testbed.kube_cluster import KubeCluster  # noqa: E402
from testbed.process import free_port  # noqa: E402

BMC_PASSWORD = "s3cret-bmc-pw"  # the password file write_site() writes
PAPER_REASON = "k8s_connect"
NODE_CPU, NODE_MEMORY = "1", "500Mi"  # as slurm.conf says: CPUs=1 RealMemory=500

# Test-sized policy: no waiting unless a test asks for it.
FAST_POLICY = {"demand_persist_s": 0, "cooldown_s": 0, "phase_timeout_s": 20, "max_retries": 1,
               "max_in_flight": 2, "min_nodes": {"slurm": 0, "k8s": 0}, "reclaim_grace_s": {"slurm": 5, "k8s": 5}}
# pyghmi against the simulator answers in 0.1-1 s, sometimes more (a lost-packet retransmit),
# and much more on a 2-core machine busy with other VMs: the default timeout, one retry.
FAST_POWER = {"timeout_s": 5.0, "retries": 1, "fanout": 8}


def provisioner_cmd() -> list[str]:
    """The installed console script, as cron runs it."""
    exe = Path(sys.executable).parent / "provisioner"
    if not exe.exists():
        exe = ROOT / ".venv" / "bin" / "provisioner"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "provisioner"]


def kernel_args(script: str) -> dict[str, str]:
    """`key=value` words of the iPXE script's kernel line ({} when it has none: unknown node)."""
    for line in script.splitlines():
        words = line.split()
        if words[:1] == ["kernel"]:
            return dict(w.split("=", 1) for w in words[1:] if "=" in w)
    return {}


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


class BootFailed(Exception):
    """A simulated boot stopped where a real node's would (no script, a refused callback)."""


class SimNode:
    def __init__(self, name: str, mac_addr: str, ip: str, role: str):
        self.name, self.mac, self.ip = name, mac_addr, ip
        self.role = role  # the image it runs now (None: off, or booting)
        self.generation = 0  # bumped by each power event: a newer one supersedes a boot in progress
        self.lock = threading.Lock()


class SimSite:
    """Everything a balancer pass talks to, on loopback, under `workdir`.

    fixed: SLURM-only nodes (slurmd always running). shared: nodes in the shared pool; `roles`
    says which side each starts on (default slurm). fixed_k8s: Kubernetes-only nodes (a Ready Node
    labelled sched=k8s, no BMC). boot_delay: seconds between the power event and the boot script
    request (a real node spends them in firmware). join_delay: seconds between the boot callback
    (posted early by the image's init) and its daemon joining the cluster (slurmd registering,
    the kubelet going Ready).
    store: site keys for the state store (e.g. {"store": "postgresql://...", "store_password_file":
    ..., "state_dir": ...}); default the SQLite file of testbed/site.py.
    """

    # The harness plays the shared nodes' daemons (a slurmd here, a simulated kubelet) when they
    # boot. False: the nodes run their own (VMs booting the real slurm and k8s images).
    host_daemons = True
    # A node given the waiting script (e.g. the boot server could not read the store) asks again,
    # as its iPXE would, and its init calls back again after a 429 (store busy): WAIT_TRIES more
    # times, WAIT_RETRY_S apart (iPXE waits the script's 30 s, the init 2 s; one figure, short
    # enough that a test's boots end within wait_idle()'s 20 s).
    WAIT_TRIES, WAIT_RETRY_S = 3, 3.0

    def __init__(self, workdir: str | os.PathLike, fixed: str = "cn[01-02]", shared: str = "sn[01-04]",
                 fixed_k8s: str = "kn01", roles: dict[str, str] | None = None, boot_delay: float = 0.2,
                 join_delay: float = 0.0, policy: dict | None = None, power: dict | None = None,
                 kube: KubeCluster | None = None, slurm_conf: str = "", slurm_settings: dict | None = None,
                 store: dict | None = None):
        self.workdir = Path(workdir).resolve()
        self.fixed = expand(fixed) if fixed else []
        self.shared = expand(shared)
        self.fixed_k8s = expand(fixed_k8s) if fixed_k8s else []
        self.initial_roles = {n: (roles or {}).get(n, "slurm") for n in self.shared}
        self.boot_delay = self.default_boot_delay = boot_delay
        self.join_delay = self.default_join_delay = join_delay
        self.policy = {**FAST_POLICY, **(policy or {})}
        self.power = {**FAST_POWER, **(power or {})}
        self.slurm_conf_extra = slurm_conf  # more slurm.conf lines (e.g. power saving)
        self.slurm_settings = dict(slurm_settings or {})  # more keys of the site's slurm: section
        self.store_settings = dict(store or {})  # site.store & co. (default: SQLite in the site folder)
        self.nodes = {n: SimNode(n, mac(i, 3), f"127.0.0.{10 + i}", self.initial_roles[n])
                      for i, n in enumerate(self.shared, start=1)}
        self.slurm: SlurmCluster | None = None
        self.kube: KubeCluster | None = kube  # given: shared (e.g. the test session's), not stopped here
        self._own_kube = kube is None
        self.bmc: BmcSim | None = None
        self.boot: BootServer | None = None
        self.config: Path | None = None
        self.port = 0
        self.boots: list[dict] = []  # one record per simulated boot (role, ok, error, ...)
        self.violations: list[str] = []  # reboots of nodes that still ran work
        self.errors: list[str] = []  # what the harness could not observe or do (see check())
        self.hang: set[str] = set()  # nodes whose image hangs before its boot callback (a fault; reset clears)
        self.pools: dict[str, str] = {}  # shared nodes the site.yaml puts in another pool (a fault; reset clears)
        self.homes: dict[str, str] = {}  # shared nodes' home sides, where not their initial role (reset sets)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._store = None
        self._boot_env: dict | None = None
        self.first_event = 0  # events before this id belong to earlier tests

    # ----------------------------------------------------------------------- life cycle

    def start(self) -> "SimSite":
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            # The main scheduling loop every 2 s (default 60): a pending job starts on a node that
            # just joined within seconds, as the paper's loop expects, instead of a minute later.
            in_slurm = [n for n, r in self.initial_roles.items() if r == "slurm" and self.host_daemons]
            self.slurm = SlurmCluster(self.workdir / "slurm", nodes=[*self.fixed, *self.shared],
                                      started=[*self.fixed, *in_slurm],
                                      extra_conf="SchedulerParameters=batch_sched_delay=0,sched_interval=2\n"
                                      + self.slurm_conf_extra,
                                      # with power saving, slurmctld wants a node it powers up to have booted
                                      fresh_boot=self.shared if self.slurm_settings.get("power_saving") else ())
            self.slurm.start()
            if self._own_kube:
                self.kube = KubeCluster(self.workdir / "kube").start()
            else:
                self.kube.claim(str(self.workdir), [*self.shared, *self.fixed_k8s])
            self.bmc = BmcSim.start([BmcSpec(n, free_port(socket.SOCK_DGRAM), "admin", BMC_PASSWORD)
                                     for n in self.shared], self.workdir / "bmc", on_power=self._on_power)
            self.port = free_port()
            self.config = self.write_config()
            self.boot = BootServer(self.config, self.port, self.workdir / "serve.log").start()
            self.reset()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything started here (by pid); safe to call twice and after a failed start."""
        self.reap_passes()
        for t in list(self._threads):
            t.join(timeout=15)
        if self.boot:
            self.boot.stop()
        if self.bmc:
            self.bmc.stop()
        if self.kube and self._own_kube:
            self.kube.stop()
        elif self.kube:
            self.kube.release(str(self.workdir))
        if self.slurm:
            self.slurm.stop()
        if self._store is not None:
            self._store.close()

    def restart_boot_server(self, env: dict | None = None) -> None:
        """The boot server again, on the same port (env: its environment, e.g. a clock that is
        behind: testbed.boot_server.clock_offset_env). reset() brings the plain one back."""
        self.boot.stop()
        self._boot_env = env  # set first: a server that fails to start is replaced at the next reset
        self.boot = BootServer(self.config, self.port, self.workdir / "serve.log", env=env).start()

    def __enter__(self) -> "SimSite":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def write_config(self, policy: dict | None = None, power: dict | None = None,
                     kubernetes: dict | None = None, store: dict | None = None, folder: Path | None = None,
                     run: dict | None = None) -> Path:
        """(Re)write site.yaml. Each `provisioner` run reads it afresh: tests change the policy
        knobs between passes; the boot server only needs the nodes and images, which stay.
        store: site.store keys over the constructor's; folder: write the config there instead
        (another "host" of the same site; its secret stays the first host's); run: the run:
        section of `provisioner run` (default: none, its defaults)."""
        # Fixed nodes are never power-cycled here; their BMC entry only satisfies the defaults.
        bmc = {"address": "127.0.0.1"}
        nodes = [{"name": n, "pool": "slurm", "macs": [mac(i, 1)], "bmc": bmc} for i, n in enumerate(self.fixed, 1)]
        nodes += [{"name": n, "pool": "k8s", "macs": [mac(i, 2)], "bmc": bmc} for i, n in enumerate(self.fixed_k8s, 1)]
        nodes += [{"name": n.name, "pool": self.pools.get(n.name, "shared"), "macs": [n.mac], "ip": n.ip,
                   "bmc": {"address": "127.0.0.1", "port": self.bmc.port(n.name)},
                   **({} if n.name in self.pools else {"default_role": self.initial_roles[n.name]}),
                   **({"home": self.homes[n.name]} if n.name in self.homes and n.name not in self.pools else {})}
                  for n in self.nodes.values()]
        url = f"http://127.0.0.1:{self.port}"
        return write_site(
            folder or self.workdir / "site", nodes=nodes,
            site={"boot_url": url, "listen": f"127.0.0.1:{self.port}", "name": "sim",
                  "secret_file": str(self.workdir / "site" / "secret"), **self.store_settings, **(store or {})},
            slurm=self.slurm.site_section(**self.slurm_settings),
            kubernetes={"kubeconfig": str(self.kube.provisioner_kubeconfig), "timeout_s": 5, **(kubernetes or {})},
            policy={**self.policy, **(policy or {})},
            power={**self.power, **(power or {})},
            **({"run": run} if run else {}),
        )

    @property
    def store(self):
        from provisioner import config
        from provisioner.store import open_store

        if self._store is None:
            self._store = open_store(config.load(self.config))
        return self._store

    # ----------------------------------------------------------------------- reset

    def reset(self, roles: dict[str, str] | None = None, policy: dict | None = None,
              power: dict | None = None, kubernetes: dict | None = None, boot_delay: float | None = None,
              join_delay: float | None = None, homes: dict[str, str] | None = None) -> None:
        """Between tests: no jobs, no pods, every shared node steady on its side (default: its
        initial role), powered on, unpinned, no fault, empty BMC history, store rows fresh.
        policy/power/kubernetes: overrides for this test; the delays: the constructor's unless given;
        homes: shared nodes' home sides for this test (default: their initial role)."""
        from provisioner.states import STEADY

        start = time.monotonic()
        self.wait_idle()
        left = self.take_errors()
        if left:  # every fixture checks at teardown: these came after it, from an earlier test's leftovers
            raise AssertionError("harness errors nobody checked (an earlier test's leftovers?):\n" + "\n".join(left))
        roles = {**self.initial_roles, **(roles or {})}
        self.hang.clear()
        self.pools.clear()
        self.homes = dict(homes or {})
        self.config = self.write_config(policy, power, kubernetes)
        if self._boot_env is not None or not self.boot.running():
            self.restart_boot_server()
        self.boot_delay = self.default_boot_delay if boot_delay is None else boot_delay
        self.join_delay = self.default_join_delay if join_delay is None else join_delay
        self.bmc.reset()
        self.bmc.set_power(self.shared, "on")
        self.slurm.scancel_all()
        self.kube.reset()
        for name in self.fixed_k8s:
            self.kube.add_node(name, labels={"sched": "k8s"}, cpu=NODE_CPU, memory=NODE_MEMORY)
        # SLURM: only the nodes not already as wanted are touched (a resume costs a few seconds:
        # slurmctld pings the node before it counts as responding).
        up = [*self.fixed, *[n for n, r in roles.items() if r == "slurm" and self.host_daemons]]
        for name in up:
            self.slurm.start_slurmd(name, wait=False)
        for name in up:
            if self.slurm.node_state(name) != "IDLE":
                self.slurm.run("scontrol", "update", f"nodename={name}", "state=resume", check=False)
        for name in up:
            self.slurm.wait_node_state(name, lambda s: s == "IDLE")
        for name, role in roles.items():
            node = self.nodes[name]
            if role == "k8s":
                view = self.slurm_view(name)
                if not (view.down and not view.drain and view.reason == PAPER_REASON):
                    self.slurm.run("scontrol", "update", f"nodename={name}", "state=resume", check=False)
                    self.slurm.run("scontrol", "update", f"nodename={name}", "state=down", f"reason={PAPER_REASON}")
                self.slurm.stop_slurmd(name)
                if self.host_daemons:
                    self.kube.add_node(name, labels={"sched": "k8s"}, cpu=NODE_CPU, memory=NODE_MEMORY, ip=node.ip)
            node.role = role
            self.store.update(name, actor="test", kind="test-reset", message=f"test reset: steady in {role}",
                              desired_role=role, booted_role=role, booted_version="1", booted_at=time.time(),
                              pinned=0, pin_reason=None, phase=STEADY, target_role=None, phase_since=None,
                              attempts=0, failed_reason=None, last_switch_at=None, switch_reason=None,
                              switch_actor=None, k8s_boot_id=None, reclaim_deadline=None, reclaim_work=None,
                              evict_refused_at=None, evict_refused=None)
        self.store.set_demand({"slurm": 0, "k8s": 0}, time.time())
        self.boots.clear()
        self.violations.clear()
        self.bmc.events.clear()
        last = self.store.events(limit=1)
        self.first_event = last[-1].id + 1 if last else 0
        self._trace(start, roles, "reset: ")

    def wait_idle(self, timeout: float = 20) -> None:
        """Wait for the boots in progress to finish (so a test starts from a still world); fail
        when one is still going after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            alive = [t.name for t in self._threads]
        if alive:
            raise AssertionError(f"simulated boots still going after {timeout:.0f}s: {alive}")

    # ----------------------------------------------------------------------- failing closed

    def error(self, what: str) -> None:
        """Record something the harness could not observe or do: it fails the test (check())."""
        with self._lock:
            self.errors.append(f"{time.strftime('%H:%M:%S')} {what}")

    def take_errors(self) -> list[str]:
        """Every harness error recorded so far (this site's, its BMC hook's, the simulated
        kubelets'), cleared: what a test that causes them on purpose asserts on."""
        with self._lock:
            out, self.errors = self.errors, []
        hooks = [e for e in list(self.bmc.events) if e.get("event") == "hook-error"] if self.bmc else []
        for e in hooks:
            self.bmc.events.remove(e)
            out.append(f"BMC hook for {e.get('bmc')}: {e.get('error')}")
        if self.kube is not None and self.kube.kubelets is not None:
            out += [f"simulated kubelets: {e}" for e in self.kube.kubelets.take_errors()]
        return out

    def reap_passes(self) -> list[int]:
        """SIGKILL the balance passes of this world still running: the detached ones slurmctld's
        programs start (`provisioner slurm resume` wakes a pass) outlive the test that caused
        them, and must not act in the next one. Returns their pids."""
        mine = str(self.workdir)
        killed = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            words = [w.decode(errors="replace") for w in argv]
            if "balance" in words and any(w.startswith(mine) for w in words):
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.append(int(entry.name))
                except ProcessLookupError:
                    pass
        for pid in killed:  # gone before the test ends (they are not our children: poll /proc)
            wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in _proc_state(pid), 10, f"pass {pid} to end")
        return killed

    def check(self, timeout: float = 20) -> None:
        """The teardown of every test: detached passes reaped, the boots in progress end, no node
        was rebooted while it ran work, and the harness made every observation and step it had
        to (take_errors())."""
        self.reap_passes()
        self.wait_idle(timeout)
        problems = [f"rebooted while it ran work: {v}" for v in self.violations] + self.take_errors()
        self.violations.clear()
        if problems:
            raise AssertionError("the test world saw:\n" + "\n".join(problems))

    # ----------------------------------------------------------------------- the simulated nodes

    def _on_power(self, event: dict) -> None:
        """BmcSim's reader thread: hand the work to a thread of its own (a BMC answers at once)."""
        node = self.nodes.get(event.get("bmc"))
        if node is None:
            return
        with node.lock:
            node.generation += 1
            gen = node.generation
        try:
            self._check_no_work(node.name, event["action"])
        except Exception as exc:  # the check could not be made: that fails the test, never reads as "no work"
            self.error(f"{node.name}: could not check for running work before power {event['action']}: "
                       f"{type(exc).__name__}: {exc}")
        target = self._boot if event.get("boot") else self._power_off
        t = threading.Thread(target=self._guarded, args=(target, node, gen, event), name=f"sim-{node.name}-{gen}",
                             daemon=True)
        with self._lock:  # started before it is listed: wait_idle() may join any listed thread
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _guarded(self, target: Callable, node: SimNode, gen: int, event: dict) -> None:
        try:
            target(node, gen, event)
        except Exception as exc:  # a thread's exception would only be printed
            self.error(f"{node.name}: power {event['action']}: {type(exc).__name__}: {exc}")

    def _check_no_work(self, name: str, action: str) -> None:
        if action not in ("off", "soft", "reset", "cycle"):
            return
        # Running work only: a job waiting for this node to power up (CONFIGURING) runs nowhere yet.
        jobs = self.slurm.run("squeue", "-h", "-w", name, "-t", "R,CG,S", "-o", "%i").split()
        pods = [p["metadata"]["name"] for p in self.kube.pods(name)
                if p["status"].get("phase") not in ("Succeeded", "Failed")
                and not any(o.get("kind") == "DaemonSet" for o in p["metadata"].get("ownerReferences") or [])]
        if jobs or pods:
            self.violations.append(f"{name}: power {action} while it ran jobs {jobs} / pods {pods}")

    def _current(self, node: SimNode, gen: int) -> bool:
        return node.generation == gen

    def _leave(self, node: SimNode) -> None:
        """The node's OS is gone (power off, reset): its daemons stop answering at once."""
        with node.lock:
            node.role = None
        self.slurm.stop_slurmd(node.name)
        self.kube.power_off(node.name)

    def _join(self, node: SimNode, role: str) -> None:
        """What the booted image's daemons do: slurmd registers, or the kubelet starts (registers
        the Node when Kubernetes has none, reports Ready with this boot's bootID)."""
        if not self.host_daemons:
            pass  # the image's own slurmd registers, or its kubelet joins
        elif role == "slurm":
            self.slurm.start_slurmd(node.name, wait=False)
        else:
            self.kube.boot(node.name, cpu=NODE_CPU, memory=NODE_MEMORY, ip=node.ip)
        with node.lock:
            node.role = role

    def _power_off(self, node: SimNode, gen: int, event: dict) -> None:
        self._leave(node)

    def _boot(self, node: SimNode, gen: int, event: dict) -> None:
        record: dict[str, Any] = {"node": node.name, "how": event["action"], "bootdev": event["boot"].get("bootdev"),
                                  "started": time.time(), "ok": False}
        self.boots.append(record)
        self._leave(node)
        try:
            time.sleep(self.boot_delay)
            if not self._current(node, gen):
                record["superseded"] = True
                return
            for tries_left in range(self.WAIT_TRIES, -1, -1):
                with urllib.request.urlopen(f"{self.boot.url}/ipxe?mac={urllib.parse.quote(node.mac)}",
                                            timeout=10) as r:
                    script = r.read().decode()
                args = kernel_args(script)
                # The waiting script (no kernel; "sleep", then "chain" again): iPXE asks again.
                if args or "\nchain " not in script or not tries_left:
                    break
                record.setdefault("waited", []).append(" ".join(script.splitlines()[4:5]))
                if not self._pause(node, gen, record):
                    return
            role = args.get("provisioner.role")
            if role not in ("slurm", "k8s"):
                raise BootFailed(f"no bootable script: {script.splitlines()[1:3]}")
            record["role"] = role
            if not self._current(node, gen):
                record["superseded"] = True
                return
            if node.name in self.hang:  # the fault a test asked for: the image never gets to its callback
                record["hung"] = True
                return
            # The image's init calls back early; its cluster daemon joins later (join_delay).
            for tries_left in range(self.WAIT_TRIES, -1, -1):
                record["callback"] = self._callback(node, args)
                if record["callback"] != 429 or not tries_left:  # 429: the store is busy; the init retries
                    break
                if not self._pause(node, gen, record):
                    return
            if record["callback"] != 200:  # the image's init stops there: the node never joins
                raise BootFailed(f"boot callback refused (HTTP {record['callback']})")
            record["ok"] = True
            time.sleep(self.join_delay)
            if not self._current(node, gen):
                return
            self._join(node, role)
            record["joined"] = time.time()
        except Exception as exc:  # a boot that fails leaves the node down, and fails the test (check())
            record["error"] = str(exc) if isinstance(exc, BootFailed) else f"{type(exc).__name__}: {exc}"
            self.error(f"{node.name}: boot ({event['action']}): {record['error']}")

    def _pause(self, node: SimNode, gen: int, record: dict) -> bool:
        """Wait before asking again; False when a newer power event superseded this boot."""
        time.sleep(self.WAIT_RETRY_S)
        if self._current(node, gen):
            return True
        record["superseded"] = True
        return False

    def _callback(self, node: SimNode, args: dict[str, str]) -> int:
        url = urllib.parse.urlsplit(args["provisioner.callback"])
        body = json.dumps({"role": args["provisioner.role"], "version": args.get("provisioner.version"),
                           "token": args["provisioner.token"]})
        # From the node's own address: the boot server checks the callback's source.
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10, source_address=(node.ip, 0))
        try:
            conn.request("POST", url.path, body, {"Content-Type": "application/json"})
            return conn.getresponse().status
        finally:
            conn.close()

    # ----------------------------------------------------------------------- driving passes

    def cli(self, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """`provisioner --config SITE ARGS...`, as an admin (or cron) runs it."""
        return subprocess.run([*provisioner_cmd(), "--config", str(self.config), *args], capture_output=True,
                              text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout)

    def balance(self, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict | None]:
        """One `provisioner balance --json` pass: (process, its report or None)."""
        start = time.monotonic()
        proc = self.cli("balance", "--json", *args, env=env)
        try:
            report = json.loads(proc.stdout) if proc.stdout.strip() else None
        except ValueError:
            report = None
        self._trace(start, [(s["node"], s["action"]) for s in report["steps"]] if report else proc.returncode, "pass ")
        return proc, report

    def pass_in_process(self, kube=None) -> dict:
        """One pass through the same code as `provisioner balance`, in this process: it skips
        the console script's start-up (the Kubernetes client alone takes 1-2 s to import), for
        tests that drive many passes after the CLI has been exercised. kube: the pass's
        Kubernetes adapter (a test may wrap one to act at a precise moment of the pass)."""
        from provisioner import config
        from provisioner.reconcile import Reconciler, pass_lock

        start = time.monotonic()
        site = config.load(self.config)
        rec = Reconciler(site, self.store, kube=kube)
        try:
            # A pass started elsewhere (slurmctld's programs, `provisioner run`) may hold the lock.
            with pass_lock(site, wait_s=60):
                report = rec.run_pass().as_dict()
        finally:
            if rec._kube is not None and kube is None:
                rec._kube.close()
        self._trace(start, [(s["node"], s["action"]) for s in report["steps"]], "in-process pass ")
        return report

    def passes_until(self, done: Callable[[], Any], timeout: float = 60, what: str = "the goal",
                     cli: bool = True) -> list[dict]:
        """Run balance passes (the CLI's, or with cli=False the same code in this process) until
        done() is truthy (the Kubernetes scheduler runs on its own meanwhile); fail after
        `timeout` s with the last reports. Returns the reports."""
        reports: list[dict] = []
        deadline = time.monotonic() + timeout
        while True:
            if cli:
                proc, report = self.balance()
                if report is None:
                    raise AssertionError(f"balance printed no report (exit {proc.returncode}): {proc.stderr[-2000:]}")
            else:
                report = self.pass_in_process()
            reports.append(report)
            if done():
                return reports
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last reports:\n"
                                     + json.dumps(reports[-3:], indent=1)[-4000:] + f"\nstore: {self.states()}"
                                     + f"\nboots: {self.boots[-4:]}")
            time.sleep(0.2)

    @staticmethod
    def _trace(start: float, what: Any, how: str = "") -> None:
        if os.environ.get("SIMNODES_TRACE"):  # a time line of the passes, for slow or failing tests
            print(f"{time.strftime('%H:%M:%S')} {how}({time.monotonic() - start:.1f} s): {what}", file=sys.stderr)

    # ----------------------------------------------------------------------- looking

    def events(self, nodes: Iterable[str] | None = None, kinds: Iterable[str] | None = None) -> list:
        """Store events since the last reset (oldest first)."""
        return [e for e in self.store.events(nodes, kinds=kinds, include_site=nodes is None)
                if e.id >= self.first_event]

    def state(self, name: str):
        return self.store.get(name)

    def states(self) -> dict[str, tuple]:
        return {n: (s.phase, s.desired_role, s.target_role, s.failed_reason)
                for n, s in self.store.nodes(self.shared).items()}

    def ipxe(self, name: str) -> str:
        with urllib.request.urlopen(f"{self.boot.url}/ipxe?mac={urllib.parse.quote(self.nodes[name].mac)}",
                                    timeout=10) as r:
            return r.read().decode()

    def slurm_view(self, name: str):
        from provisioner.clusters.slurm import SlurmAdapter
        from provisioner.model import SlurmSettings

        return SlurmAdapter(SlurmSettings(**{k: v for k, v in self.slurm.site_section().items()})).nodes([name])[name]

    def in_slurm(self, name: str) -> bool:
        """Serving SLURM: slurmd registered, the node IDLE/ALLOCATED/MIXED with no drain or down."""
        return self.slurm_view(name).available and self.slurm.running(f"slurmd:{name}")

    def in_k8s(self, name: str, label: bool = True) -> bool:
        """Serving Kubernetes: Ready, schedulable, and (label=True) labelled sched=k8s."""
        node = self.kube.node(name)
        if node is None:
            return False
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
        labelled = (node["metadata"].get("labels") or {}).get("sched") == "k8s"
        return ready and not node["spec"].get("unschedulable") and (labelled or not label)

    def serving(self, name: str) -> set[str]:
        """The sides a node serves now (a healthy node serves exactly one)."""
        return {side for side, ok in (("slurm", self.in_slurm(name)), ("k8s", self.in_k8s(name))) if ok}

    def bmc_actions(self, name: str) -> list[str]:
        return [e["action"] for e in list(self.bmc.events) if e.get("bmc") == name and e.get("event") == "power"]

    def submit_pending(self, *args: str, reason: str = "Resources", **kw) -> str:
        """sbatch a job and wait until SLURM has looked at it: Pending with `reason`."""
        job = self.slurm.sbatch(*args, **kw)
        wait_for(lambda: self.slurm.job_state(job) == ("PENDING", f"({reason})"), 20, f"job {job} Pending ({reason})")
        return job

    def reboots(self, name: str) -> tuple[int, int]:
        """(times the node's BMC booted it, IPMI attempts of the successful power actions the
        store recorded for it). They match unless IPMI retried an attempt that timed out after
        the reset was sent (the power module retries the whole sequence), which boots it again."""
        boots = sum(1 for a in self.bmc_actions(name) if a in ("on", "reset", "cycle"))
        attempts = 0
        for e in self.events([name], kinds=["power"]):
            if (e.data or {}).get("ok"):
                m = re.match(r"(\d+) attempts", (e.data or {}).get("note") or "")
                attempts += int(m.group(1)) if m else 1
        return boots, attempts

    def booted_once(self, name: str) -> bool:
        """The balancer powered the node exactly once, and its BMC booted it that once (or once
        more per IPMI retry of that action)."""
        boots, attempts = self.reboots(name)
        return len(self.events([name], kinds=["power"])) == 1 and 1 <= boots <= attempts

    def fill_fixed(self) -> list[str]:
        """A job on each fixed SLURM node, running; returns their ids."""
        jobs = [self.slurm.sbatch(nodelist=n) for n in self.fixed]
        for job in jobs:
            self.slurm.wait_job_running(job)
        return jobs


# --------------------------------------------------------------------------- standalone


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.simnodes", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="folder for everything (site.yaml, logs, state)")
    p.add_argument("--fixed", default="cn[01-02]", help="fixed SLURM nodes (hostlist)")
    p.add_argument("--shared", default="sn[01-04]", help="shared nodes (hostlist)")
    p.add_argument("--fixed-k8s", default="kn01", help="fixed Kubernetes nodes (hostlist)")
    p.add_argument("--k8s", default="", help="shared nodes that start in Kubernetes (default: all in SLURM)")
    p.add_argument("--boot-delay", type=float, default=2.0, help="seconds a simulated node takes to boot")
    p.add_argument("--policy", default="{}", help='policy overrides as JSON, e.g. {"demand_persist_s": 10}')
    args = p.parse_args(argv)
    roles = {n: "k8s" for n in (expand(args.k8s) if args.k8s else [])}
    sim = SimSite(args.workdir, fixed=args.fixed, shared=args.shared, fixed_k8s=args.fixed_k8s, roles=roles,
                  boot_delay=args.boot_delay, policy=json.loads(args.policy))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sim.start()
    try:
        print(f"config: {sim.config}", flush=True)
        print(f"  SLURM_CONF={sim.slurm.slurm_conf}", flush=True)
        print(f"  KUBECONFIG={sim.kube.kubeconfig}", flush=True)
        print(f"  boot server {sim.boot.url}; try: provisioner --config {sim.config} balance --dry-run", flush=True)
        stop.wait()
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
