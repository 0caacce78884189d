"""A real SLURM cluster on loopback, built from Debian's packages (slurmctld, slurmd, munge).

`SlurmCluster` is a plain class (usable outside pytest, e.g. by a demo script): munged on a private
socket, one slurmctld and one slurmd per node, each on its own free port, everything under one
work folder. Nodes are 1-CPU `NodeName=` entries that all live on this host (`slurmd -N name`).
A node whose slurmd is stopped looks to slurmctld like a node that is powered off or booted into
another image: that is how the balancer and the end-to-end tests simulate "the node boots the
SLURM image" (`start_slurmd`) and "the node left SLURM" (`stop_slurmd`).

Every process it starts carries a marker in its environment (`PROVISIONER_TEST_SLURM=<workdir>`),
and so do the jobs (sbatch exports it), the slurmstepd processes (they inherit slurmd's
environment) and the job's own processes: `stop()` kills exactly those, by pid, even when slurmd
is already gone (slurmstepd outlives slurmd).

The `slurm_cluster` pytest fixture (tests/fixtures/slurm_cluster.py) starts one cluster per test
session with the nodes of the default test site (cn[01-02] in pool slurm, sn[01-04] in pool
shared; partition `batch` holds all of them). Tests that change node states call
`reset_nodes()` first. Methods may be called from any thread (e.g. a boot callback handler
starting a node's slurmd).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from provisioner.nodeset import expand
from testbed.process import free_port
from testbed.wait import wait_for

MARKER = "PROVISIONER_TEST_SLURM"
# The same names as the default test site (testbed/site.py): cn[01-02] fixed, sn[01-04] shared.
DEFAULT_NODES = ("cn[01-02]", "sn[01-04]")


def _binary(name: str) -> str:
    for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    raise FileNotFoundError(f"{name} is not installed; run scripts/install-system-deps.sh")


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, under `workdir`.

    nodes: hostlist expressions or names (`cpus` CPUs each). partitions: {name: hostlist} (the first
    one is the default); default: one partition `batch` with every node. started: the nodes
    whose slurmd `start()` launches (default: all). extra_conf: more slurm.conf lines.
    """

    BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "scontrol", "sinfo", "squeue", "sbatch", "scancel")

    def __init__(
        self,
        workdir: str | os.PathLike,
        nodes: Iterable[str] = DEFAULT_NODES,
        partitions: dict[str, str] | None = None,
        started: Iterable[str] | None = None,
        slurmd_timeout: int = 10,
        message_timeout: int = 5,
        extra_conf: str = "",
        cpus: int = 1,
        node_options: dict[str, str] | None = None,
        fresh_boot: Iterable[str] = (),
    ):
        self.workdir = Path(workdir).resolve()
        self.nodes: list[str] = [n for expr in nodes for n in expand(expr)]
        self.partitions = partitions or {"batch": ",".join(self.nodes)}
        self.initially_started = list(self.nodes if started is None else [n for e in started for n in expand(e)])
        self.slurmd_timeout = slurmd_timeout
        self.message_timeout = message_timeout
        self.extra_conf = extra_conf
        self.cpus = cpus
        # {hostlist: "Gres=gpu:2 ..."}: extra NodeName= options for some nodes
        self.node_options = {n: opts for expr, opts in (node_options or {}).items() for n in expand(expr)}
        # Nodes whose slurmd starts as if the machine had just booted (its own time namespace,
        # uptime ~1 s): slurmctld accepts a node it powers up (SLURM power saving) only when the
        # node reports a boot after the resume; the host's uptime would say "booted long ago".
        self.fresh_boot = {n for e in fresh_boot for n in expand(e)}
        self.slurm_conf = self.workdir / "slurm.conf"
        # in run/ (0755), not next to the key: clients running as another user must reach it
        self.munge_socket = self.workdir / "run" / "munge.socket.2"
        self.ctld_port = 0
        self.node_ports: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}  # "munged", "slurmctld", "slurmd:<node>"
        self._spawned_at: dict[str, float] = {}
        self._lock = threading.RLock()
        self.env = {**os.environ, "SLURM_CONF": str(self.slurm_conf), MARKER: str(self.workdir),
                    "SLURM_TIME_FORMAT": "standard"}

    # ----------------------------------------------------------------------- life cycle

    def start(self) -> "SlurmCluster":
        for name in self.BINARIES:
            _binary(name)
        atexit.register(self.stop)  # also when the caller forgets, or a test run is interrupted
        try:
            self._prepare()
            self._start_munged()
            self.start_slurmctld(clean=True)
            for node in self.initially_started:
                self.start_slurmd(node, wait=False)
            for node in self.initially_started:
                self.wait_node_state(node, lambda s: s.startswith("IDLE") and "NOT_RESPONDING" not in s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything started here, by pid; safe to call twice and after a failed start."""
        with self._lock:
            if self.running("slurmctld"):
                try:
                    self.scancel_all(timeout=15)
                except Exception:  # noqa: BLE001 - cleanup goes on; leftover jobs are killed below
                    pass
            for key in [k for k in self._procs if k.startswith("slurmd:")] + ["slurmctld"]:
                self._terminate(key)
            self._kill_marked()  # slurmstepd and job processes outlive slurmd
            self._terminate("munged")
        atexit.unregister(self.stop)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def running(self, key: str) -> bool:
        p = self._procs.get(key)
        return p is not None and p.poll() is None

    def start_slurmctld(self, clean: bool = False) -> None:
        """clean=True starts from an empty state (-c); otherwise it recovers the saved state."""
        argv = [_binary("slurmctld"), "-D", "-f", str(self.slurm_conf)] + (["-c"] if clean else [])
        self._spawn("slurmctld", argv)
        wait_for(lambda: self._ctld_up() or self._check_alive("slurmctld"), 20, "slurmctld to answer")

    def stop_slurmctld(self) -> None:
        self._terminate("slurmctld")

    def start_slurmd(self, node: str, wait: bool = True) -> None:
        """Start node's slurmd (the node "booted the SLURM image"). wait: until it registered."""
        if node not in self.node_ports:
            raise KeyError(f"{node} is not a node of this cluster ({', '.join(self.nodes)})")
        key = f"slurmd:{node}"
        with self._lock:
            if self.running(key):
                return
            argv = [_binary("slurmd"), "-D", "-N", node, "-f", str(self.slurm_conf)]
            if node in self.fresh_boot:
                with open("/proc/uptime") as f:
                    up = int(float(f.read().split()[0]))  # its uptime starts below 1 s
                argv = ["unshare", "--time", "--fork", "--kill-child=SIGTERM", f"--boottime=-{up}", *argv]
            self._spawn(key, argv)
        if wait:
            # Registered = slurmctld saw this slurmd start (not only "no longer NOT_RESPONDING").
            wait_for(lambda: self._check_alive(key) or self._registered(node), 20, f"slurmd {node} to register")

    def stop_slurmd(self, node: str) -> None:
        """Stop node's slurmd (the node powered off / left SLURM). Its jobs' steps keep running."""
        self._terminate(f"slurmd:{node}")

    # ----------------------------------------------------------------------- client helpers

    def site_section(self, **overrides) -> dict:
        """The `slurm:` section of a site config that points provisioner at this cluster."""
        return {"mode": "local", "slurm_conf": str(self.slurm_conf), "timeout_s": 20, **overrides}

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> str:
        r = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout,
                           cwd=self.workdir)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def sbatch(self, *args: str, wrap: str = "sleep 600", partition: str | None = None,
               nodelist: str | None = None, cpus: int = 1, nodes: int = 1) -> str:
        """Submit a batch job; returns its job id."""
        argv = ["sbatch", "--parsable", f"--output={self.workdir / 'jobs' / '%j.out'}",
                f"--ntasks={cpus}", f"--nodes={nodes}", *args, f"--wrap={wrap}"]
        if partition:
            argv.insert(2, f"--partition={partition}")
        if nodelist:
            argv.insert(2, f"--nodelist={nodelist}")
        return self.run(*argv).strip().split(";")[0]

    def job_state(self, job_id: str) -> tuple[str, str]:
        """(STATE, nodelist-or-reason) of a job that squeue still lists, else ("", "")."""
        out = self.run("squeue", "-h", "-j", job_id, "-o", "%T|%R", check=False).strip()
        state, _, where = out.partition("|")
        return state, where

    def wait_job_running(self, job_id: str, timeout: float = 30) -> str:
        """Waits until the job runs; returns its node list."""
        def running():
            state, where = self.job_state(job_id)
            return where if state == "RUNNING" else None
        return wait_for(running, timeout, f"job {job_id} to run")

    def scancel_all(self, timeout: float = 30) -> None:
        """Cancel every job and wait until squeue lists none, except jobs stuck on nodes whose
        slurmd is stopped (they cannot end until it returns; stop() kills their processes)."""
        ids = self.run("squeue", "-h", "-o", "%A").split()
        if ids:
            self.run("scancel", *ids, check=False)

        def settled():
            lines = [l for l in self.run("squeue", "-h", "-o", "%N").splitlines() if l.strip()]
            return all(not self.running(f"slurmd:{n}") for line in lines for n in expand(line.strip()))
        wait_for(settled, timeout, "all jobs to end")

    def node_state(self, node: str) -> str:
        """slurmctld's full state string of a node, e.g. IDLE+DRAIN."""
        out = self.run("scontrol", "show", "node", "-o", node)
        for field in out.split():
            if field.startswith("State="):
                return field[len("State="):]
        raise RuntimeError(f"no State= in {out!r}")

    def wait_node_state(self, node: str, accept: Callable[[str], bool], timeout: float = 20) -> str:
        seen = []

        def check():
            seen.append(self.node_state(node))
            return seen[-1] if accept(seen[-1]) else None
        try:
            return wait_for(check, timeout, f"{node} to reach the expected state")
        except TimeoutError as exc:
            reason = self.run("sinfo", "-h", "-n", node, "-o", "%E", check=False).strip()
            raise TimeoutError(f"{exc}; it is {seen[-1] if seen else '?'} (reason: {reason}); "
                               f"see {self.workdir}/log") from None

    def reset_nodes(self) -> None:
        """Between tests: every slurmd running, no jobs, every node IDLE with no reason."""
        for node in self.nodes:
            self.start_slurmd(node)  # no-op when it runs
        self.scancel_all()
        for node in self.nodes:
            if self.node_state(node) != "IDLE":
                self.run("scontrol", "update", f"nodename={node}", "state=resume", check=False)
            self.wait_node_state(node, lambda s: s == "IDLE")

    def log(self, key: str) -> str:
        """Tail of a daemon's log (slurmctld, munged, or a node name), for failure messages."""
        name = {"slurmctld": "slurmctld.log", "munged": "munged.log"}.get(key, f"slurmd-{key}.log")
        path = self.workdir / "log" / name
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    # ----------------------------------------------------------------------- internals

    def _prepare(self) -> None:
        for sub in ("munge", "log", "run", "state", "spool", "jobs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses keys and sockets in group/world-writable folders
        os.chmod(self.workdir, 0o755)
        os.chmod(self.workdir / "munge", 0o700)
        key = self.workdir / "munge" / "munge.key"
        if not key.exists():
            subprocess.run([_binary("mungekey"), "-c", "-b", "1024", "-k", str(key)], check=True,
                           capture_output=True)
        ports: list[int] = []
        while len(ports) < len(self.nodes) + 1:  # distinct, also if the OS hands one out twice
            port = free_port()
            ports += [] if port in ports else [port]
        self.ctld_port, *rest = ports
        self.node_ports = dict(zip(self.nodes, rest))
        self.slurm_conf.write_text(self._conf())

    def guest_conf(self, host: str = "10.0.2.2") -> str:
        """slurm.conf for a slurmd inside a VM (the slurm image): the same cluster, but the
        controller is the host as the guest sees it, munged and the slurmd files are the image's
        own. The slurmd listens on its node's Port, which the VM forwards from 127.0.0.1."""
        own = {"SlurmctldHost": f"localhost({host})", "SlurmdSpoolDir": "/var/spool/slurmd",
               "SlurmdPidFile": "/run/slurmd.pid", "SlurmdLogFile": "/var/log/slurm/slurmd.log"}
        out = []
        for line in self._conf().splitlines():
            key = line.split("=", 1)[0]
            if key == "AuthInfo":
                continue  # the image's munged, on its default socket
            out.append(f"{key}={own[key]}" if key in own else line)
        return "\n".join(out) + "\n"

    def _conf(self) -> str:
        w = self.workdir
        lines = [
            f"ClusterName=provtest{self.ctld_port}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={w}/state",
            f"SlurmctldPidFile={w}/run/slurmctld.pid",
            f"SlurmctldLogFile={w}/log/slurmctld.log",
            f"SlurmdSpoolDir={w}/spool/slurmd-%n",
            f"SlurmdPidFile={w}/run/slurmd-%n.pid",
            f"SlurmdLogFile={w}/log/slurmd-%n.log",
            "SlurmdParameters=config_overrides",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            # 2 would undo an admin DOWN as soon as the slurmd answers (see docs/probes.md)
            "ReturnToService=1",
            f"SlurmdTimeout={self.slurmd_timeout}",
            f"MessageTimeout={self.message_timeout}",
            "SlurmctldTimeout=10",
            "InactiveLimit=0",
            "KillWait=2",
            "MinJobAge=10",
            # start jobs at once instead of batching submissions for 3 s (keeps the tests short)
            "SchedulerParameters=batch_sched_delay=0",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        lines += [line for line in self.extra_conf.splitlines() if line.strip()]
        for node in self.nodes:
            lines.append(f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 "
                         f"Port={self.node_ports[node]} CPUs={self.cpus} RealMemory=500 State=UNKNOWN "
                         + self.node_options.get(node, ""))
        for i, (name, members) in enumerate(self.partitions.items()):
            lines.append(f"PartitionName={name} Nodes={members} Default={'YES' if i == 0 else 'NO'} "
                         "MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _start_munged(self) -> None:
        m = self.workdir / "munge"
        self._spawn("munged", [
            _binary("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={m / 'munge.key'}", f"--log-file={self.workdir / 'log' / 'munged.log'}",
            f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}",
        ])
        wait_for(lambda: self.munge_socket.exists() or self._check_alive("munged"), 10, "munged's socket")

    def _spawn(self, key: str, argv: list[str]) -> None:
        with self._lock, open(self.workdir / "log" / f"{key.replace(':', '-')}.stderr", "ab") as log:
            self._spawned_at[key] = time.time()
            # own session: a Ctrl-C in the terminal reaches the test run, not the daemons
            self._procs[key] = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=log, cwd=self.workdir, start_new_session=True)

    def _check_alive(self, key: str) -> bool:
        """For wait_for loops: raise at once (with the log) when the daemon died."""
        if not self.running(key):
            name = key.split(":", 1)[-1]
            stderr = self.workdir / "log" / f"{key.replace(':', '-')}.stderr"
            detail = (stderr.read_text(errors="replace") if stderr.exists() else "") + self.log(name)
            raise RuntimeError(f"{key} exited: {detail[-2000:]}")
        return False

    def _terminate(self, key: str, timeout: float = 10) -> None:
        with self._lock:
            p = self._procs.pop(key, None)
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def _ctld_up(self) -> bool:
        r = subprocess.run(["scontrol", "ping"], env=self.env, capture_output=True, text=True, timeout=30)
        return "is UP" in r.stdout

    def _registered(self, node: str) -> bool:
        # A SlurmdStartTime no older than our spawn proves this very slurmd registered (a stopped
        # slurmd is noticed only at slurmctld's next ping, so NOT_RESPONDING alone is not enough).
        fields = dict(f.split("=", 1) for f in self.run("scontrol", "show", "node", "-o", node).split() if "=" in f)
        if "NOT_RESPONDING" in fields.get("State", "") or fields.get("SlurmdStartTime", "None") == "None":
            return False
        started = time.mktime(time.strptime(fields["SlurmdStartTime"], "%Y-%m-%dT%H:%M:%S"))
        return started >= int(self._spawned_at[f"slurmd:{node}"])

    def marked_pids(self) -> list[int]:
        """Live processes (other than this one) that carry this cluster's marker: its daemons,
        their slurmstepd, the jobs' processes, clients run with `env`."""
        needle = f"{MARKER}={self.workdir}".encode() + b"\0"
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read() + b"\0":
                        found.append(int(entry))
            except OSError:  # gone meanwhile, or a kernel thread
                continue
        return found

    def _kill_marked(self) -> None:
        """SIGKILL what is left of this cluster's jobs (slurmstepd, job processes), by pid."""
        for _ in range(20):
            with self._lock:
                known = {p.pid for p in self._procs.values()}  # munged: stopped after this
            left = [pid for pid in self.marked_pids() if pid not in known]
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
