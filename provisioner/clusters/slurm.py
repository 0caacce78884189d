"""SLURM adapter: read node states and pending jobs, drain / down / resume nodes. I/O only.

It runs the SLURM client commands (scontrol, squeue) locally or on the controller over SSH
(`slurm.mode` in the site config) and parses the text they print on 22.05 (Debian 12) and
later: `--json` is no help there (squeue/sinfo ignore their filters with it, scontrol has none).

Node states come from `scontrol show node -o`, not from sinfo: sinfo's compact state is lossy
(a DOWN+DRAIN node prints as "drained"), scontrol names every flag.

It never decides. Its only refusals protect what is not ours: it will not overwrite or clear a
drain/down reason that provisioner did not set, will not take down a node that runs jobs (SLURM
would kill them), and will not resume a node whose slurmd has not registered. Every action is
checked afterwards by reading the node states again.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from provisioner.errors import OperationError
from provisioner.model import SlurmSettings
from provisioner.nodeset import expand, fold

# The paper's down reason (its Table 1). It counts as ours, so nodes the paper's scripts took
# down can be taken over.
PAPER_REASON = "k8s_connect"

# Times as epoch seconds: no time-zone guessing, also when the controller is another host.
CLIENT_ENV = {"SLURM_TIME_FORMAT": "%s"}

SHOW_NODES = ("scontrol", "show", "node", "-o")
# One line per pending job (and per pending array task: -r). The name goes last: it may hold '|'.
SQUEUE_FORMAT = "%i|%T|%r|%P|%D|%C|%u|%V|%Q|%b|%n|%j"
SQUEUE_PENDING = ("squeue", "-h", "-r", "-t", "PENDING", "-o", SQUEUE_FORMAT)
# Jobs that hold nodes now (a suspended job still lives in the node's memory): id|nodes.
SQUEUE_RUNNING = ("squeue", "-h", "-r", "-t", "RUNNING,COMPLETING,SUSPENDED", "-o", "%i|%N")

HOLDING_STATES = "RUNNING,CONFIGURING,COMPLETING,SUSPENDED"  # a job in these holds its nodes

VERIFY_TIMEOUT_S = 5.0  # scontrol update is synchronous; this only covers a busy slurmctld

# sinfo's one-character state suffixes -> the flag names scontrol prints.
SUFFIX_FLAGS = {
    "*": "not_responding",
    "~": "powered_down",
    "#": "powering_up",
    "%": "powering_down",
    "!": "power_down",
    "$": "maint",
    "@": "reboot_requested",
    "^": "reboot_issued",
    "-": "planned",
}
# sinfo's compact words that fold a flag into the state.
_COMPACT = {"drained": ("idle", {"drain"}), "draining": ("allocated", {"drain"}),
            "alloc": ("allocated", set()), "comp": ("idle", {"completing"}),
            "completing": ("idle", {"completing"}), "drng": ("allocated", {"drain"}),
            "drain": ("idle", {"drain"}), "maint": ("idle", {"maint"}), "fail": ("down", {"fail"}),
            "failing": ("allocated", {"fail"})}


# --------------------------------------------------------------------------- plain data


@dataclass(frozen=True)
class SlurmNode:
    """One node as slurmctld sees it. `state` is the base state in lower case (idle, allocated,
    mixed, down, unknown, future, error); `flags` are SLURM's flags in lower case (drain,
    completing, not_responding, powered_down, powering_up, powering_down, power_down, cloud, ...)."""

    name: str
    state: str
    flags: frozenset[str] = frozenset()
    reason: str | None = None
    reason_user: str | None = None
    reason_time: float | None = None
    reason_is_ours: bool = False
    cpus: int = 0
    alloc_cpus: int = 0
    memory_mb: int = 0
    gpus: int = 0
    partitions: tuple[str, ...] = ()
    slurmd_start_time: float | None = None  # when the slurmd that last registered started
    boot_time: float | None = None

    @property
    def drain(self) -> bool:
        return "drain" in self.flags

    @property
    def busy(self) -> bool:
        """Runs (or is still cleaning up) jobs."""
        return self.alloc_cpus > 0 or self.state in ("allocated", "mixed") or "completing" in self.flags

    @property
    def runs_jobs(self) -> bool:
        """Jobs run there now. A job allocated to a node that is powered down or powering up
        (SLURM power saving) waits for the node: it does not run yet, and a reboot kills nothing."""
        return self.busy and not self.flags & {"powered_down", "powering_down", "powering_up"}

    @property
    def draining(self) -> bool:
        return self.drain and self.busy

    @property
    def drained(self) -> bool:
        return self.drain and not self.busy

    @property
    def down(self) -> bool:
        return self.state == "down"

    @property
    def responding(self) -> bool:
        return "not_responding" not in self.flags

    @property
    def powered_down(self) -> bool:
        return bool(self.flags & {"powered_down", "powering_down"})

    @property
    def held_by_other(self) -> bool:
        """Out of service (drain/down/fail) with a reason provisioner did not set: hands off."""
        return (self.drain or self.down or "fail" in self.flags) and not self.reason_is_ours

    @property
    def available(self) -> bool:
        """Can take jobs now: up, responding, powered, not drained/down/failed by anyone."""
        return (self.state in ("idle", "allocated", "mixed") and self.responding and not self.drain
                and not self.powered_down and not self.flags & {"fail", "power_down", "powering_up", "maint", "reboot_requested"})


@dataclass(frozen=True)
class PendingJob:
    job_id: str  # "123", or "123_4" for an array task
    reason: str  # Resources, Priority, ReqNodeNotAvail, ... (squeue %r)
    partitions: tuple[str, ...]
    num_nodes: int
    num_cpus: int  # in total
    user: str = ""
    submit_time: float | None = None
    priority: int = 0
    gpus_per_node: int = 0
    req_nodes: tuple[str, ...] = ()  # --nodelist
    name: str = ""

    @property
    def partition(self) -> str:
        return self.partitions[0] if self.partitions else ""

    @property
    def cpus_per_node(self) -> int:
        return max(1, math.ceil(self.num_cpus / max(1, self.num_nodes)))


@dataclass(frozen=True)
class RunningJob:
    """A job that holds a node (`scontrol show job -o`)."""

    job_id: str
    state: str  # RUNNING, CONFIGURING, COMPLETING, SUSPENDED
    nodes: tuple[str, ...]
    requeue: bool  # Requeue=1: slurm.conf's JobRequeue (default 1) unless sbatch --no-requeue
    batch: bool  # BatchFlag=1: only batch jobs can be requeued (not srun/salloc)
    end_time: float | None = None  # when it reaches its time limit (None: no limit)
    start_time: float | None = None  # when it started (None: not yet, or unknown)

    @property
    def requeueable(self) -> bool:
        return self.requeue and self.batch

    @property
    def why_not_requeueable(self) -> str | None:
        if not self.batch:
            return "an interactive job (srun/salloc) cannot be requeued"
        if not self.requeue:
            return "submitted with --no-requeue (or JobRequeue=0)"
        return None


@dataclass(frozen=True)
class RequeueResult:
    node: str
    requeued: tuple[str, ...]  # job ids SLURM accepted to requeue in this call
    kept: tuple[tuple[str, str], ...]  # (job id, why): cannot be requeued; runs to its end or time limit
    remaining: tuple[str, ...]  # jobs still holding the node after this call (kept, or still ending)

    @property
    def free(self) -> bool:
        return not self.remaining


@dataclass(frozen=True)
class SlurmSnapshot:
    nodes: dict[str, SlurmNode]
    pending: tuple[PendingJob, ...]
    taken_at: float = field(default_factory=time.time)


# --------------------------------------------------------------------------- parsing


def is_ours(reason: str | None, prefix: str) -> bool:
    if not reason:
        return False
    reason = reason.strip()
    return reason.startswith(prefix) or reason == PAPER_REASON


def parse_state(text: str) -> tuple[str, frozenset[str]]:
    """scontrol's `IDLE+DRAIN+NOT_RESPONDING`, or sinfo's compact `drained*`, `idle~`, `mixed#`
    -> (base state, flags), both lower case."""
    parts = text.strip().lower().split("+")
    base, flags = parts[0], {p for p in parts[1:] if p}
    while base and base[-1] in SUFFIX_FLAGS:
        flags.add(SUFFIX_FLAGS[base[-1]])
        base = base[:-1]
    if base in _COMPACT:
        base, extra = _COMPACT[base]
        flags |= extra
    return base, frozenset(flags)


_REASON_BRACKET = re.compile(
    r"(?:^| )Reason=(?P<reason>.*?) \[(?P<user>[^@\]\s]*)@(?P<time>[^\]\s]*)\](?= [A-Z][A-Za-z]*=| *$)"
)
_REASON_PLAIN = re.compile(r"(?:^| )Reason=(?P<reason>.*?)(?= [A-Z][A-Za-z]*=| *$)")
_KEY = re.compile(r"^[A-Z][A-Za-z0-9_:]*$")
_GPU = re.compile(r"(?:^|[,:/])gpu(?::[A-Za-z0-9_.-]+)?:(\d+)")


def _epoch(value: str | None) -> float | None:
    return float(value) if value and value.isdigit() and value != "0" else None


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _gpus(text: str | None) -> int:
    """GPU count from a Gres (`gpu:a100:4(S:0-1)`) or TRES (`gres:gpu:2`) string."""
    return sum(int(m.group(1)) for m in _GPU.finditer(text or ""))


def node_fields(line: str) -> dict[str, str]:
    """One `scontrol show node -o` line -> {Key: value}. Values may hold spaces (OS=, Reason=,
    Comment=); Reason= is cut out first because it is free text that may even hold `Key=`."""
    line = line.rstrip("\n")
    fields: dict[str, str] = {}
    m = _REASON_BRACKET.search(line) or _REASON_PLAIN.search(line)
    if m:
        fields["Reason"] = m.group("reason")
        if "user" in m.groupdict():
            fields["ReasonUser"], fields["ReasonTime"] = m.group("user"), m.group("time")
        line = line[: m.start()] + " " + line[m.end():]
    key = None
    for token in line.split():
        name, eq, value = token.partition("=")
        if eq and _KEY.match(name):
            key = name
            fields[key] = value
        elif key:
            fields[key] += " " + token
    return fields


def parse_nodes(text: str, prefix: str) -> dict[str, SlurmNode]:
    """`scontrol show node -o` output -> {name: SlurmNode}, in SLURM's order."""
    nodes: dict[str, SlurmNode] = {}
    for line in text.splitlines():
        if not line.startswith("NodeName="):
            continue
        f = node_fields(line)
        state, flags = parse_state(f.get("State", "unknown"))
        reason = f.get("Reason") or None
        partitions = f.get("Partitions", "").strip()
        nodes[f["NodeName"]] = SlurmNode(
            name=f["NodeName"],
            state=state,
            flags=flags,
            reason=reason,
            reason_user=f.get("ReasonUser"),
            reason_time=_epoch(f.get("ReasonTime")),
            reason_is_ours=is_ours(reason, prefix),
            cpus=_int(f.get("CPUTot")),
            alloc_cpus=_int(f.get("CPUAlloc")),
            memory_mb=_int(f.get("RealMemory")),
            gpus=_gpus(f.get("Gres")),
            partitions=tuple(p for p in partitions.split(",") if p) if partitions != "(null)" else (),
            slurmd_start_time=_epoch(f.get("SlurmdStartTime")),
            boot_time=_epoch(f.get("BootTime")),
        )
    return nodes


def parse_pending(text: str) -> list[PendingJob]:
    """`squeue -h -o SQUEUE_FORMAT` output -> jobs (only the PENDING lines)."""
    jobs = []
    n_fields = SQUEUE_FORMAT.count("|") + 1
    for line in text.splitlines():
        parts = line.split("|", n_fields - 1)
        if len(parts) != n_fields or parts[1].strip() != "PENDING":
            continue
        job_id, _state, reason, partitions, num_nodes, num_cpus, user, submit, prio, tres, req, name = parts
        req = req.strip()
        jobs.append(PendingJob(
            job_id=job_id.strip(),
            reason=reason.strip(),
            partitions=tuple(p for p in partitions.strip().split(",") if p),
            num_nodes=_int(num_nodes.strip()) or 1,
            num_cpus=_int(num_cpus.strip()) or 1,
            user=user.strip(),
            submit_time=_epoch(submit.strip()),
            priority=_int(prio.strip()),
            gpus_per_node=_gpus(tres.strip()),
            req_nodes=tuple(expand(req)) if req and req != "(null)" else (),
            name=name,
        ))
    return jobs


def parse_jobs(text: str) -> list[RunningJob]:
    """`scontrol show job -o` output -> jobs (every state; the caller filters)."""
    jobs = []
    for line in text.splitlines():
        if not line.startswith("JobId="):
            continue
        f = node_fields(line)
        nodes = f.get("NodeList", "").strip()
        jobs.append(RunningJob(
            job_id=f["JobId"].strip(),
            state=f.get("JobState", "").strip(),
            nodes=tuple(expand(nodes)) if nodes and nodes != "(null)" else (),
            requeue=f.get("Requeue", "0").strip() == "1",
            batch=f.get("BatchFlag", "0").strip() == "1",
            end_time=_epoch(f.get("EndTime", "").strip()),
            start_time=_epoch(f.get("StartTime", "").strip()),
        ))
    return jobs


# --------------------------------------------------------------------------- runners


class Result(Protocol):
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    def run(self, argv: Sequence[str], timeout: float) -> Result: ...

    def where(self) -> str: ...


class LocalRunner:
    """Runs the client commands here: SLURM_CONF from slurm.slurm_conf, else the environment."""

    def __init__(self, settings: SlurmSettings):
        self.settings = settings

    def run(self, argv: Sequence[str], timeout: float) -> Result:
        env = {**os.environ, **CLIENT_ENV}
        if self.settings.slurm_conf:
            env["SLURM_CONF"] = self.settings.slurm_conf
        exe = os.path.join(self.settings.bin_dir, argv[0]) if self.settings.bin_dir else argv[0]
        try:
            return subprocess.run([exe, *argv[1:]], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=timeout)
        except FileNotFoundError:
            raise OperationError(f"{exe} not found; install the SLURM client (slurm-client) or set "
                                 f"slurm.bin_dir") from None
        except PermissionError:
            raise OperationError(f"{exe} is not executable; check slurm.bin_dir") from None
        except subprocess.TimeoutExpired:
            raise OperationError(f"`{' '.join(argv)}` gave no answer within {timeout:g}s; check that slurmctld "
                                 f"is running and reachable from here, or raise slurm.timeout_s") from None

    def where(self) -> str:
        conf = self.settings.slurm_conf or os.environ.get("SLURM_CONF") or "the default slurm.conf"
        return f"here (SLURM_CONF={conf})"


class SshRunner:
    """Runs the client commands on the controller host over SSH (provisioner.remote)."""

    def __init__(self, settings: SlurmSettings):
        if settings.controller is None:
            raise OperationError("slurm.mode is ssh but slurm.controller is not set; add it to the site config")
        self.settings = settings

    def run(self, argv: Sequence[str], timeout: float) -> Result:
        from provisioner import remote  # paramiko is only loaded when SSH is used

        env = dict(CLIENT_ENV)
        if self.settings.slurm_conf:
            env["SLURM_CONF"] = self.settings.slurm_conf
        exe = f"{self.settings.bin_dir.rstrip('/')}/{argv[0]}" if self.settings.bin_dir else argv[0]
        return remote.run(self.settings.controller, [exe, *argv[1:]], timeout, env=env)

    def where(self) -> str:
        c = self.settings.controller
        return f"on {c.user}@{c.host}:{c.port}"


def runner_for(settings: SlurmSettings) -> Runner:
    return SshRunner(settings) if settings.mode == "ssh" else LocalRunner(settings)


# --------------------------------------------------------------------------- the adapter


def _names(nodes: str | Iterable[str]) -> list[str]:
    names = expand(nodes) if isinstance(nodes, str) else [n for item in nodes for n in expand(item)]
    return list(dict.fromkeys(names))


def _first_line(result: Result) -> str:
    for text in (result.stderr, result.stdout):
        for line in (text or "").splitlines():
            if line.strip():
                return line.strip()
    return f"exit status {result.returncode}"


def describe(node: SlurmNode) -> str:
    state = "+".join([node.state.upper(), *sorted(f.upper() for f in node.flags)])
    return f"{node.name} {state}" + (f" ({node.reason})" if node.reason else "")


class SlurmAdapter:
    """What provisioner reads from and does to SLURM.

    Observe: nodes(names=None) -> {name: SlurmNode}; pending_jobs() -> [PendingJob];
    observe() -> SlurmSnapshot (both). Act, for a hostlist or names, all or nothing, each checked
    afterwards and returning the nodes' new states: drain(nodes, reason), down(nodes, reason),
    resume(nodes). Every failure is an OperationError with one line that says what to do.
    `runner` defaults to the one slurm.mode asks for (LocalRunner or SshRunner).
    """

    def __init__(self, settings: SlurmSettings, runner: Runner | None = None):
        self.settings = settings
        self.prefix = settings.reason_prefix
        self.runner = runner or runner_for(settings)

    # -- observe ------------------------------------------------------------------------

    def nodes(self, names: str | Iterable[str] | None = None) -> dict[str, SlurmNode]:
        """Every node slurmctld knows, or only `names` (a hostlist or names; unknown ones raise)."""
        out = self._run(SHOW_NODES, "read the node states")
        nodes = parse_nodes(out, self.prefix)
        if names is None:
            return nodes
        wanted = _names(names)
        unknown = [n for n in wanted if n not in nodes]
        if unknown:
            raise OperationError(f"SLURM does not know node(s) {fold(unknown)}; check NodeName= in slurm.conf "
                                 f"against the site config")
        return {n: nodes[n] for n in wanted}

    def pending_jobs(self) -> list[PendingJob]:
        return parse_pending(self._run(SQUEUE_PENDING, "read the pending jobs"))

    def running_jobs(self, names: str | Iterable[str]) -> dict[str, list[str]]:
        """{node: [job id, ...]} for the jobs running (or completing, or suspended) on `names`;
        a node without any is left out."""
        wanted = set(_names(names))
        out: dict[str, list[str]] = {}
        for line in self._run(SQUEUE_RUNNING, "read the running jobs").splitlines():
            job, _, nodelist = line.strip().partition("|")
            if job and nodelist and nodelist not in ("(null)", "n/a"):
                for node in expand(nodelist):
                    if node in wanted:
                        out.setdefault(node, []).append(job)
        return out

    def observe(self) -> SlurmSnapshot:
        nodes = self.nodes()
        return SlurmSnapshot(nodes=nodes, pending=tuple(self.pending_jobs()))

    # -- act ----------------------------------------------------------------------------

    def our_reason(self, reason: str) -> str:
        """The reason as we set it: carries our prefix (the paper's k8s_connect stays as is)."""
        reason = " ".join(str(reason).split())
        if not reason:
            raise OperationError("a reason is required to drain or down a node; SLURM refuses it without one")
        return reason if is_ours(reason, self.prefix) else f"{self.prefix} {reason}"

    def drain(self, nodes: str | Iterable[str], reason: str) -> dict[str, SlurmNode]:
        """Drain: running jobs finish, no new ones start. Nodes already drained or down by us are
        left as they are; a node held by someone else is refused (we would take over their hold).
        Returns the nodes' verified states (draining or drained)."""
        reason = self.our_reason(reason)
        current = self.nodes(nodes)
        self._refuse_foreign(current, "drain")
        todo = [n for n, node in current.items() if not ((node.drain or node.down) and node.reason_is_ours)]
        if todo:
            self._update(todo, "state=drain", f"reason={reason}")
        return self._verify(current, lambda n: (n.drain or n.down) and n.reason_is_ours, "draining or drained")

    def down(self, nodes: str | Iterable[str], reason: str = PAPER_REASON) -> dict[str, SlurmNode]:
        """Take down (the paper's `state=down reason=k8s_connect`). Refused for nodes that run
        jobs (SLURM would kill and requeue them: drain first) and for nodes held by someone else."""
        reason = self.our_reason(reason)
        current = self.nodes(nodes)
        self._refuse_foreign(current, "take down")
        busy = [n for n, node in current.items() if node.runs_jobs]
        if busy:
            raise OperationError(f"not taking down {fold(busy)}: jobs run there and SLURM would kill them; "
                                 f"drain first and wait until drained")
        todo = [n for n, node in current.items() if not (node.down and node.reason_is_ours)]
        if todo:
            self._update(todo, "state=down", f"reason={reason}")
        return self._verify(current, lambda n: n.down and n.reason_is_ours, "down")

    def resume(self, nodes: str | Iterable[str]) -> dict[str, SlurmNode]:
        """Return drained/down nodes to service. Refused for a node whose reason is not ours (an
        admin's drain, SLURM's own "Not responding") and for a node whose slurmd has not registered."""
        current = self.nodes(nodes)
        out_of_service = {n: node for n, node in current.items() if node.drain or node.down or node.reason}
        foreign = [describe(node) for node in out_of_service.values() if not node.reason_is_ours]
        if foreign:
            raise OperationError(f"not resuming {'; '.join(foreign)}: provisioner did not set that reason; "
                                 f"the admin who did must resume it")
        silent = [n for n, node in out_of_service.items() if not node.responding and not node.powered_down]
        if silent:
            raise OperationError(f"not resuming {fold(silent)}: slurmd there is not responding; boot the node "
                                 f"into the SLURM image and wait for slurmd to register")
        if out_of_service:
            self._update(list(out_of_service), "state=resume")
        return self._verify(current, lambda n: not (n.drain or n.down), "back in service")

    # -- reclaim: requeue the jobs on a node its home side takes back ----------------------

    def jobs_on(self, node: str) -> list[RunningJob]:
        """The jobs holding the node (running, configuring, completing, suspended)."""
        ids = self._run(["squeue", "-h", "-w", node, "-t", HOLDING_STATES, "-o", "%A"],
                        f"list the jobs on {node}").split()
        if not ids:
            return []
        out = self._run(["scontrol", "show", "job", "-o", ",".join(ids)], f"read the jobs on {node}")
        return [j for j in parse_jobs(out) if node in j.nodes and j.state in HOLDING_STATES.split(",")]

    def requeue_jobs_on(self, node: str) -> RequeueResult:
        """Requeue (`scontrol requeue`) every job on the node that can be requeued; the others are
        reported in `kept` and run to their end. The node must be drained by provisioner first
        (else a requeued job could start on it again). A requeued job goes back to the queue with
        its priority and starts elsewhere; its work since it started is lost."""
        current = self.nodes(node)[node]
        if not ((current.drain or current.down) and current.reason_is_ours):
            raise OperationError(f"node {node} is not drained by provisioner: drain it before requeueing its jobs")
        jobs = [j for j in self.jobs_on(node) if j.state != "COMPLETING"]
        todo = [j.job_id for j in jobs if j.requeueable]
        kept = tuple((j.job_id, j.why_not_requeueable) for j in jobs if not j.requeueable)
        if todo:
            result = self.runner.run(["scontrol", "requeue", ",".join(todo)], float(self.settings.timeout_s))
            if result.returncode != 0:
                raise OperationError(f"SLURM refused `scontrol requeue {','.join(todo)}`: {_first_line(result)}; "
                                     f"see slurmctld's log {self.runner.where()}")
        remaining = tuple(j.job_id for j in self.jobs_on(node))
        return RequeueResult(node, tuple(todo), kept, remaining)

    # -- power saving (slurm.power_saving: shared nodes in Kubernetes are "powered down") ----

    def power_down(self, nodes: str | Iterable[str]) -> dict[str, SlurmNode]:
        """Mark nodes powered down in SLURM (`state=power_down_force`): slurmctld runs its
        SuspendProgram for them (ours answers that they are already leaving) and, once they are
        POWERED_DOWN, may give them to a job again by running its ResumeProgram. Refused for nodes
        that run jobs and nodes held by someone else; nodes already powered down are left alone."""
        current = self.nodes(nodes)
        self._refuse_foreign(current, "power down")
        busy = [n for n, node in current.items() if node.runs_jobs]
        if busy:
            raise OperationError(f"not powering down {fold(busy)} in SLURM: jobs run there; drain first and wait")
        todo = [n for n, node in current.items()
                if not (node.powered_down or "power_down" in node.flags) or "powering_up" in node.flags]
        if todo:
            self._update(todo, "state=power_down_force")
        return self._verify(current, lambda n: (n.powered_down or "power_down" in n.flags)
                            and "powering_up" not in n.flags, "powering down")

    def power_up(self, nodes: str | Iterable[str]) -> dict[str, SlurmNode]:
        """Tell slurmctld that powered-down nodes are coming up (`state=power_up`): it runs its
        ResumeProgram (ours answers that they are already switching) and waits ResumeTimeout for
        their slurmd. Nodes not powered down, or already powering up, are left alone."""
        current = self.nodes(nodes)
        todo = [n for n, node in current.items() if node.powered_down and "powering_up" not in node.flags]
        if todo:
            self._update(todo, "state=power_up")
        return self._verify(current, lambda n: not n.powered_down or "powering_up" in n.flags, "powering up")

    def resume_timeout(self) -> int | None:
        """slurm.conf's ResumeTimeout in seconds (None when slurmctld does not say)."""
        out = self._run(["scontrol", "show", "config"], "read slurmctld's configuration")
        m = re.search(r"^ResumeTimeout\s*=\s*(\d+)", out, re.M)
        return int(m.group(1)) if m else None

    # -- internals ----------------------------------------------------------------------

    def _run(self, argv: Sequence[str], what: str) -> str:
        result = self.runner.run(list(argv), float(self.settings.timeout_s))
        if result.returncode != 0:
            raise OperationError(f"cannot {what}: `{' '.join(argv[:3])}` failed {self.runner.where()}: "
                                 f"{_first_line(result)}; check that slurmctld is running and reachable")
        return result.stdout

    def _update(self, names: list[str], *settings: str) -> None:
        argv = ["scontrol", "update", f"nodename={fold(names)}", *settings]
        result = self.runner.run(argv, float(self.settings.timeout_s))
        if result.returncode != 0:
            shown = " ".join(a if " " not in a else repr(a) for a in argv)
            raise OperationError(f"SLURM refused `{shown}`: {_first_line(result)}; "
                                 f"see slurmctld's log {self.runner.where()}")

    def _refuse_foreign(self, current: dict[str, SlurmNode], action: str) -> None:
        foreign = [describe(node) for node in current.values() if node.held_by_other]
        if foreign:
            raise OperationError(f"not going to {action} {'; '.join(foreign)}: someone else set that reason; "
                                 f"leave it to them or ask them to resume it first")

    def _verify(self, current: dict[str, SlurmNode], ok, expected: str) -> dict[str, SlurmNode]:
        deadline = time.monotonic() + VERIFY_TIMEOUT_S
        while True:
            now = self.nodes(list(current))
            wrong = [node for node in now.values() if not ok(node)]
            if not wrong:
                return now
            if time.monotonic() > deadline:
                raise OperationError(f"expected {expected}, but SLURM reports {'; '.join(map(describe, wrong))}; "
                                     f"see slurmctld's log {self.runner.where()}")
            time.sleep(0.1)
