"""One balancing pass: observe -> decide -> act -> record.

Level-triggered, like a Kubernetes controller: every pass reads the world, advances each
switching node by at most the steps whose preconditions hold now, starts the moves the policy
asks for, and exits. Nothing waits minutes inside a pass; the next pass (cron, every minute)
picks up where this one stopped, also after a crash, because every node's switch is a state
machine persisted in the store and every step is idempotent.

A node's switch is the state machine of provisioner/states.py (its phases, and the transitions
declared there; a phase change not in that table is refused). Each switching phase has a handler
here, `_on_<phase>`, that checks the preconditions of the next step against both clusters and
takes it:

  to k8s:   requested -> draining (SLURM drain, our reason) -> [DRAINED: down k8s_connect,
            desired role := k8s] -> rebooting -> booting (wait for the boot callback)
            -> joining (kubelet Ready with a bootID other than before the reboot: label
            sched=k8s, uncordon if ours) -> steady
  to slurm: requested -> cordoning (k8s cordon, evict if an admin forced it, wait for no pods)
            -> [desired role := slurm] -> rebooting -> booting -> joining (a slurmd started since
            the reboot has registered: resume, label sched=slurm; steady once SLURM shows it
            available) -> steady

booting and joining share one clock: their phase_since is the moment of the power action, so
"the node must be back within phase_timeout_s of its reboot", and a callback or a slurmd
registration older than that reboot never counts. The power action is written ahead
(power_at): a pass that dies between the action and its record does not power the node twice.

Safety rules kept here:
- right before any power action, both clusters are asked again whether the node runs a job or
  a pod; if it does, no power action, and the node goes back to the step before;
- drains and cordons that provisioner did not set are never lifted (the adapters refuse too);
- a balancer move that cannot get its node free within policy.phase_timeout_s is rolled back
  (resume / uncordon); an admin-forced one waits for running jobs to end however long they
  take (a note in each pass after the timeout), and fails visibly when pods cannot be evicted
  within the timeout (a PodDisruptionBudget);
- a node that does not come back after a reboot is rebooted again, at most policy.max_retries
  times, then marked `failed` with the reason and left out of further moves.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provisioner import policy as pol
from provisioner.clusters.interfaces import KubeClient, PowerFn, SlurmClient
from provisioner.clusters.slurm import describe as describe_slurm
from provisioner.errors import OperationError, UsageError
from provisioner.model import Node, Site
from provisioner.nodeset import fold
from provisioner.states import (BOOTING, CORDONING, DRAINING, FAILED, JOINING, K8S, REBOOTING, REQUESTED, SLURM,
                                STEADY, SWITCHING, other, transition)
from provisioner.store import NodeState, Store, default_actor

if TYPE_CHECKING:
    from provisioner.power.dispatch import PowerResult

ACTOR = "balancer"

# slurmd reports its start time from the node's clock, which a freshly booted diskless node may
# not have synced yet: a slurmd that started up to this long before the reboot still counts as
# this boot's. One that ran before the previous switch is older (a cron pass is a minute apart).
CLOCK_SLACK_S = 60

ROLE_NOW_WAIT_S = 60.0  # `role --now` waits this long for a running balance pass to finish

# Test-only fault injection: PROVISIONER_CRASH_AT=<point> makes the pass SIGKILL itself there,
# to prove that a pass killed at any step leaves a state the next pass can finish or roll back.
CRASH_ENV = "PROVISIONER_CRASH_AT"


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- locking


class PassLocked(Exception):
    """Another pass holds the lock."""


@contextmanager
def pass_lock(site: Site, wait_s: float = 0.0):
    """One pass at a time per site (cron may start a pass while the last one still runs).

    flock on a file next to the store: released by the kernel when the holder dies, so a
    killed pass never leaves a stale lock. cron's passes do not wait (wait_s=0); an admin's
    `role --now` waits a little for a running pass to finish.

    With a PostgreSQL store (site.store_url) the balancers of every host share the lock: a
    session-level advisory lock (pg_try_advisory_lock on a key derived from site.name) on a
    connection of its own, held for the pass; PostgreSQL releases it when that connection ends,
    also when the pass is SIGKILLed. The same wait_s."""
    if site.store_url:
        from provisioner.store_pg import LockBusy, balance_lock

        with ExitStack() as held:
            try:
                held.enter_context(balance_lock(site.store_url, site.store_password_file, site.name, wait_s=wait_s))
            except LockBusy as exc:
                raise PassLocked(f"another balance pass is running ({exc})") from None
            yield
        return
    path = Path(str(site.store) + ".balance.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PassLocked(f"another balance pass is running (lock {path})") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- power, recorded


def power_nodes(site: Site, nodes: Sequence[Node], action: str, *, netboot: bool = False, store: Store | None = None,
                actor: str | None = None, roles: dict[str, str] | None = None) -> list[PowerResult]:
    """provisioner.power.run_action plus what power control leaves to its caller: the boot plan
    a kexec boots into (roles: node name -> role; default the desired role in the store, else
    the default role; the node's image version pin applies, as when it network-boots), and an
    event (kind "power") in `store` for every action but status. The reconciler's power action
    and `provisioner power`."""
    from provisioner.power import REBOOTS, run_action

    boot = None
    kexec = [n for n in nodes if n.power_method.startswith("kexec")]
    if kexec and action in REBOOTS:
        from provisioner.boot.plan import BootPlanner
        from provisioner.tokens import load_or_create_secret

        planner = BootPlanner(site, load_or_create_secret(site.secret_file), store)
        # Files are not checked here (as before): the node fetches them from the boot endpoint,
        # and a missing one fails the kexec on the node with the fetch's error.
        boot = {n.name: planner.plan(n, (roles or {}).get(n.name), check_files=False) for n in kexec}
    actor = actor or default_actor()
    done = None if store is None or action == "status" else (lambda res: record_power(store, actor, res))
    return run_action(site, nodes, action, netboot=netboot, boot=boot, done=done)


def record_power(store: Store, actor: str, res: PowerResult) -> None:
    """One power action as an event. Best effort: the action happened; a store hiccup must not
    turn it into a failure."""
    how = f"power {res.action}" + (" --netboot" if res.netboot else "") + (f" via {res.method}" if res.method else "")
    outcome = ("ok" + (f", now {res.state}" if res.state else "")) if res.ok else f"FAILED: {res.error}"
    data = {k: v for k, v in res.as_dict().items() if k != "node" and v is not None}
    try:
        store.add_event(res.node, actor, "power", f"{how}: {outcome}", data)
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------- report


@dataclass
class Step:
    node: str
    action: str
    message: str
    ok: bool = True

    def as_dict(self) -> dict:
        return {"node": self.node, "action": self.action, "message": self.message, "ok": self.ok}


@dataclass
class PassReport:
    dry_run: bool
    moves: list[pol.Move] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    demand: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(s.ok for s in self.steps)

    def as_dict(self) -> dict:
        return {
            "dry_run": self.dry_run,
            "demand": self.demand,
            "moves": [{"node": m.node, "to": m.to_role, "reason": m.reason} for m in self.moves],
            "steps": [s.as_dict() for s in self.steps],
            "notes": self.notes,
            "errors": self.errors,
            "ok": self.ok,
        }


@dataclass
class RoleChange:
    """What an admin's role change did (`provisioner role`)."""

    role: str
    reason: str
    requested: list[str]  # switches started, pinned to the role
    pinned: list[str]  # already in (or switching to) the role: pinned there
    now: bool  # carried out at once as far as it could go, rather than by the next pass
    report: PassReport | None = None  # now: the pass that took the switches' steps
    locked: str | None = None  # now: another pass held the lock; it carries the switches on

    @property
    def ok(self) -> bool:
        return self.report is None or self.report.ok


# --------------------------------------------------------------------------- the world as seen


@dataclass(frozen=True)
class World:
    """What one pass observed. Adapter objects are kept as they came (plain dataclasses)."""

    slurm_nodes: dict[str, Any]  # name -> clusters.slurm.SlurmNode
    pending_jobs: tuple
    kube_nodes: dict[str, Any]  # name -> clusters.kubernetes.KubeNode (missing: no Node object)
    pending_pods: tuple
    states: dict[str, NodeState]
    asks: tuple = ()  # store.Ask: open asks of schedulers (slurmctld's Resume/Suspend/ResumeFailProgram)
    requests: tuple = ()  # clusters.provisioning_requests.Seen: ProvisioningRequests of provisioner's class


class Reconciler:
    def __init__(self, site: Site, store: Store, slurm: SlurmClient | None = None, kube: KubeClient | None = None,
                 power: PowerFn | None = None, clock: Callable[[], float] = time.time, actor: str = ACTOR):
        self.site = site
        self.store = store
        self._slurm = slurm
        self._kube = kube
        self.power = power or power_nodes
        self.clock = clock
        self.actor = actor
        self.policy = site.policy
        self.shared = [n.name for n in site.nodes.values() if n.shared]
        self.label_key = site.kubernetes.label_key

    # Adapters are made on first use: recording an admin's request needs neither cluster.
    @property
    def slurm(self) -> SlurmClient:
        if self._slurm is None:
            from provisioner.clusters.slurm import SlurmAdapter

            self._slurm = SlurmAdapter(self.site.slurm)
        return self._slurm

    @property
    def kube(self) -> KubeClient:
        if self._kube is None:
            from provisioner.clusters.kubernetes import KubernetesAdapter

            self._kube = KubernetesAdapter(self.site.kubernetes)
        return self._kube

    @property
    def provider(self):
        """The ProvisioningRequest provider (kubernetes.provisioning_requests), or None."""
        if not self.site.kubernetes.provisioning_requests:
            return None
        if getattr(self, "_provider", None) is None:
            from provisioner.clusters.provisioning_requests import ProvisioningRequests
            from provisioner.provisioning import Provider

            self._provider = Provider(ProvisioningRequests(self.kube), self.store, self.actor)
        return self._provider

    # -- the pass ------------------------------------------------------------------------

    def run_pass(self, dry_run: bool = False, only: Iterable[str] | None = None,
                 balance: bool = True) -> PassReport:
        """One pass. `only`: advance just these nodes (the CLI's `role --now`); `balance=False`
        skips the policy (no new moves)."""
        report = PassReport(dry_run=dry_run)
        self.store.seed((n.name, n.default_role) for n in self.site.nodes.values())
        try:
            world = self.observe()
        except OperationError as exc:
            report.errors.append(f"observe failed, no action taken: {exc}")
            return report

        nodes = self.shared if only is None else [n for n in self.shared if n in set(only)]
        if not dry_run and only is None:
            self._given_up(world, report)
        if not dry_run:
            for name in nodes:
                st = world.states[name]
                if st.phase in SWITCHING:
                    self._advance(name, report)
            if only is not None or not balance:
                return report
            if report.steps:
                # The switches just taken changed both clusters (a node resumed in SLURM, one
                # drained): deciding on the start-of-pass view would move a second node for
                # demand the first one already covers.
                try:
                    world = self.observe()
                except OperationError as exc:
                    report.errors.append(f"observe failed after advancing switches, no new moves: {exc}")
                    return report
            else:
                world = self._refresh_states(world)

        if balance:
            decision = pol.decide(self.snapshot(world, record_demand=not dry_run))
            report.demand = dict(decision.demand)
            report.notes.extend(decision.notes)
            report.moves.extend(decision.moves)
            if self.provider is not None:
                report.errors.extend(self.provider.serve(world.requests, decision.gangs, report.notes, dry_run))
            if not dry_run:
                for move in decision.moves:
                    if self._start(move.node, move.to_role, move.reason, actor=self.actor, forced=False, report=report):
                        self._advance(move.node, report)
                self._answer(decision, world, report)
                if self.site.slurm.power_saving:
                    self._sync_slurm_view(decision.slurm_hold, world, report)
        return report

    def observe(self) -> World:
        snap = self.slurm.observe()
        missing = [n for n in self.shared if n not in snap.nodes]
        if missing:
            raise OperationError(f"SLURM does not know shared node(s) {', '.join(missing)}; "
                                 "add them to slurm.conf or fix the site config")
        pods = tuple(self.kube.pending_pods())
        kube_nodes = self.kube.nodes(self.shared)
        return World(
            slurm_nodes=snap.nodes,
            pending_jobs=tuple(snap.pending),
            kube_nodes=kube_nodes,
            pending_pods=pods,
            states=self.store.nodes(self.shared),
            asks=tuple(self.store.open_asks()),
            requests=self.provider.read() if self.provider is not None else (),
        )

    def _refresh_states(self, world: World) -> World:
        return World(world.slurm_nodes, world.pending_jobs, world.kube_nodes, world.pending_pods,
                     self.store.nodes(self.shared), tuple(self.store.open_asks()), world.requests)

    # -- the snapshot for the policy -------------------------------------------------

    def snapshot(self, world: World, record_demand: bool) -> pol.Snapshot:
        now = self.clock()
        nodes = tuple(self._shared_node(name, world) for name in self.shared)
        jobs = tuple(
            pol.PendingJob(j.job_id, j.reason, j.partitions, j.num_nodes, j.cpus_per_node, j.gpus_per_node)
            for j in world.pending_jobs if not j.req_nodes or set(j.req_nodes) & set(self.shared)
        )
        pods = tuple(
            pol.PendingPod(p.namespace, p.name, p.cpu_m, p.memory, p.gpus, p.node_selector)
            for p in world.pending_pods
        )
        if self.site.slurm.power_saving:
            # SLURM gives jobs to "powered down" shared nodes itself and asks for them through
            # its ResumeProgram: polling its queue too would move a second node for the same job.
            jobs = ()
        asks = tuple(pol.Ask(a.id, a.node, a.kind, a.source, a.reason) for a in world.asks
                     if a.kind in (pol.RESUME, pol.SUSPEND))
        snap = pol.Snapshot(now=now, policy=self.policy, nodes=nodes, jobs=jobs, pods=pods)
        # Demand persistence: first-seen times live in the store, so they survive between passes.
        amounts = pol.demand(snap)
        since = self.store.set_demand(amounts, now) if record_demand else self.store.demand_since()
        from provisioner.provisioning import gang_asks

        return pol.Snapshot(now=now, policy=self.policy, nodes=nodes, jobs=jobs, pods=pods, demand_since=since,
                            asks=asks, gangs=gang_asks(world.requests, self.site.kubernetes.booking_s))

    def _shared_node(self, name: str, world: World) -> pol.SharedNode:
        st = world.states[name]
        s = world.slurm_nodes[name]
        k = world.kube_nodes.get(name)
        role = st.target_role if st.phase in SWITCHING and st.target_role else st.desired_role
        if role == SLURM:
            busy = s.runs_jobs if self.site.slurm.power_saving else s.busy
            # Powered down for SLURM (power saving): idle, and SLURM may give it to a job again.
            available = s.available or (self.site.slurm.power_saving and s.powered_down and not s.busy
                                        and not s.held_by_other)
            held = None if available else (f"held in SLURM by someone else ({s.reason})" if s.held_by_other
                                            else f"not available in SLURM ({s.state}{', ' + s.reason if s.reason else ''})")
        else:
            busy = bool(k and k.busy)
            available = bool(k and k.ready and not k.unschedulable)
            held = None if available else ("no Node object in Kubernetes" if k is None else
                                            "cordoned by someone else" if k.cordoned_by_other else
                                            "not Ready in Kubernetes" if not k.ready else "cordoned")
        labels = dict(k.labels) if k else {}
        labels[self.label_key] = K8S
        return pol.SharedNode(
            name=name, role=role, phase=st.phase, pinned=st.pinned, busy=busy, available=available,
            last_switch_at=st.last_switch_at, cpus=s.cpus or (k.cpu_m // 1000 if k else 1),
            memory=(s.memory_mb << 20) if s.memory_mb else (k.memory if k else 0),
            gpus=s.gpus or (k.gpus if k else 0), partitions=s.partitions,
            k8s_labels=tuple(sorted(labels.items())), held_by=held,
        )

    # -- starting a switch --------------------------------------------------------------

    def change_role(self, names: list[str], role: str, *, actor: str, reason: str, now: bool = False,
                    wait_s: float = ROLE_NOW_WAIT_S) -> RoleChange:
        """An admin forces shared nodes to a role (pinned): the switches are requested, and with
        `now` carried as far as they can go at once (one pass over just these nodes, after
        waiting up to wait_s for a running pass; if that one still runs, it carries them on)."""
        fixed = [n for n in names if n not in self.shared]
        if fixed:
            raise UsageError(f"{fold(fixed)} not in the shared pool: only shared nodes change role "
                             f"(change pool in {self.site.path} first)")
        steps = self.request(names, role, actor=actor, reason=reason)
        change = RoleChange(role, reason, requested=[s.node for s in steps if s.action == "requested"],
                            pinned=[s.node for s in steps if s.action == "pin"], now=now)
        if not (change.requested and now):
            return change
        try:
            with pass_lock(self.site, wait_s=wait_s):
                change.report = self.run_pass(only=change.requested)
        except PassLocked as exc:
            change.locked = str(exc)
        return change

    def request(self, names: list[str], role: str, *, actor: str, reason: str) -> list[Step]:
        """An admin forces nodes to a role (pinned). Starts the switch where one is needed."""
        steps = []
        for name in names:
            st = self.store.get(name)
            if st.phase in SWITCHING and st.target_role != role:
                raise OperationError(f"{name} is switching to {st.target_role} (phase {st.phase}); wait for it to "
                                     f"finish (`provisioner nodes {name}`), then run role again")
            if (st.phase == STEADY and st.desired_role == role) or (st.phase in SWITCHING and st.target_role == role):
                if not st.pinned:
                    self.store.update(name, actor=actor, kind="pin", message=f"pinned to {role}: {reason}",
                                      pinned=1, pin_reason=reason)
                steps.append(Step(name, "pin", f"already {role}" + ("" if st.phase == STEADY else " (switching)")))
                continue
            report = PassReport(dry_run=False)
            self._start(name, role, reason, actor=actor, forced=True, report=report)
            steps.extend(report.steps)
        return steps

    def _start(self, name: str, role: str, reason: str, *, actor: str, forced: bool, report: PassReport) -> bool:
        st = self.store.get(name)
        if st.phase not in (STEADY, FAILED):
            return False
        transition(st.phase, REQUESTED, role)
        fields: dict[str, Any] = dict(phase=REQUESTED, target_role=role, phase_since=self.clock(), attempts=0,
                                      failed_reason=None, switch_reason=reason, switch_actor=actor)
        if forced:
            fields.update(pinned=1, pin_reason=reason)
        ok = self.store.update(name, actor=actor, kind="switch",
                               message=f"switch to {role} requested{' (pinned)' if forced else ''}: {reason}",
                               expect={"phase": st.phase}, data={"to": role, "reason": reason, "forced": forced},
                               **fields)
        if ok:
            report.steps.append(Step(name, "requested", f"switch to {role}: {reason}"))
        return ok

    # -- advancing a switch -------------------------------------------------------------

    def _advance(self, name: str, report: PassReport) -> None:
        """Take as many steps as hold now (each one a compare-and-set on the phase)."""
        for _ in range(len(SWITCHING) + 1):
            st = self.store.get(name)
            if st.phase not in SWITCHING:
                return
            try:
                moved = self._step(st, report)
            except OperationError as exc:
                report.steps.append(Step(name, st.phase, str(exc), ok=False))
                self.store.add_event(name, self.actor, "step-failed", f"{st.phase}: {exc}", {"phase": st.phase})
                return
            if not moved:
                return

    def _step(self, st: NodeState, report: PassReport) -> bool:
        """One step from st.phase, by the phase's handler. True when the phase changed (so try
        the next one)."""
        return self._HANDLERS[st.phase](self, st, report)

    def _forced(self, st: NodeState) -> bool:
        return bool(st.pinned and st.switch_actor != self.actor)

    def _age(self, st: NodeState) -> float:
        now = self.clock()
        return now - (st.phase_since or now)

    def _on_requested(self, st: NodeState, report: PassReport) -> bool:
        name = st.name
        if st.target_role == K8S:
            self.slurm.drain([name], f"switching to k8s: {st.switch_reason or ''}".strip())
            return self._goto(st, DRAINING, f"draining in SLURM ({st.switch_reason})", report)
        cordon_ours = self.kube.cordon(name) if self.kube.node(name) else True
        _crash_point("after-cordon")
        note = "" if cordon_ours else " (already cordoned by someone else: that cordon stays theirs)"
        return self._goto(st, CORDONING, f"cordoned in Kubernetes{note}", report)

    def _on_draining(self, st: NodeState, report: PassReport) -> bool:
        name, age, forced = st.name, self._age(st), self._forced(st)
        s = self.slurm.nodes([name])[name]
        if s.held_by_other:
            return self._rollback(st, f"someone else changed the node in SLURM ({s.reason}): hands off", report)
        if not (s.drain or s.down):
            return self._rollback(st, "the drain was lifted by someone else", report, resume=False)
        if s.busy:
            if not forced and age > self.policy.phase_timeout_s:
                return self._rollback(st, f"jobs still running after {int(age)} s", report)
            if forced and age > self.policy.phase_timeout_s:
                report.notes.append(f"{name}: still draining after {int(age)} s (forced by {st.switch_actor})")
            return False
        if self.site.slurm.power_saving:
            # Powered down for SLURM, still drained (ours) until it is settled in Kubernetes.
            self.slurm.power_down([name])
            done = "drained and powered down in SLURM"
        else:
            self.slurm.down([name])
            done = "drained and down in SLURM (k8s_connect)"
        _crash_point("after-down")
        k = self.kube.node(name)
        return self._goto(st, REBOOTING, f"{done}; will boot the k8s image",
                          report, desired_role=K8S, k8s_boot_id=k.boot_id if k is not None else None)

    def _on_cordoning(self, st: NodeState, report: PassReport) -> bool:
        name, age = st.name, self._age(st)
        k = self.kube.node(name)
        if k is not None and k.busy:
            if not self._forced(st):
                return self._rollback(st, f"pods appeared on the node ({', '.join(p.key for p in k.pods)})", report)
            res = self.kube.evict_pods(name)
            if not res.free:
                blocked = "; ".join(f"{p} ({why})" for p, why in res.blocked) or ", ".join(res.remaining)
                if age > self.policy.phase_timeout_s:
                    return self._fail(st, f"pods could not be evicted in {int(age)} s: {blocked}", report)
                report.notes.append(f"{name}: waiting for pods to leave: {blocked}")
                return False
        if self.site.slurm.power_saving:
            # SLURM must expect the node: our hold lifted, and "powering up" (when slurmctld asked
            # for it, it is already), so its slurmd's registration counts within ResumeTimeout.
            s = self.slurm.nodes([name])[name]
            if (s.drain or s.down) and s.reason_is_ours:
                self.slurm.resume([name])
            self.slurm.power_up([name])
        return self._goto(st, REBOOTING, "no pods left; will boot the slurm image", report, desired_role=SLURM,
                          k8s_boot_id=k.boot_id if k is not None else None)

    def _on_rebooting(self, st: NodeState, report: PassReport) -> bool:
        return self._reboot(st, report)

    def _on_booting(self, st: NodeState, report: PassReport) -> bool:
        to = st.target_role
        if st.booted_role == to and st.booted_at and st.booted_at >= (st.phase_since or 0):
            return self._goto(st, JOINING, f"booted the {to} image (version {st.booted_version})", report,
                              phase_since=st.phase_since)
        return self._timed_out(st, self._age(st), f"no boot callback from the {to} image", report)

    def _on_joining(self, st: NodeState, report: PassReport) -> bool:
        return self._joined_slurm(st, report) if st.target_role == SLURM else self._joined_k8s(st, report)

    def _joined_slurm(self, st: NodeState, report: PassReport) -> bool:
        name, age = st.name, self._age(st)
        s = self.slurm.nodes([name])[name]
        # SLURM notices a slurmd that went away only after SlurmdTimeout (300 s by default):
        # until then the old one still "responds". Only a slurmd started since the reboot
        # proves that the new image joined.
        since_boot = s.slurmd_start_time is not None and \
            s.slurmd_start_time >= int(st.phase_since or 0) - CLOCK_SLACK_S
        if not (s.responding and since_boot):
            return self._timed_out(st, age, "slurmd has not registered", report)
        if s.held_by_other:
            return self._fail(st, f"joined SLURM but someone else holds it ({s.reason})", report)
        if s.drain or s.down:
            s = self.slurm.resume([name])[name]
            report.steps.append(Step(name, "resumed", "slurmd registered; resumed in SLURM"))
        if not s.available:
            # Right after a resume slurmctld pings the node (NOT_RESPONDING for a moment):
            # done only once SLURM would give it a job, on this pass or the next.
            return self._timed_out(st, age, f"SLURM does not show it available ({s.state}"
                                   f"{'+' + '+'.join(sorted(s.flags)) if s.flags else ''})", report)
        if self.kube.node(name):
            self.kube.label(name, SLURM)
        return self._finish(st, "available in SLURM, labelled sched=slurm", report)

    def _joined_k8s(self, st: NodeState, report: PassReport) -> bool:
        name, age = st.name, self._age(st)
        k = self.kube.node(name)
        if k is None or not k.ready:
            return self._timed_out(st, age, "kubelet is not Ready", report)
        if st.k8s_boot_id and k.boot_id == st.k8s_boot_id:
            # Ready, but from the boot before the reboot: the control plane notices a silent
            # kubelet only after its grace period (40 s by default).
            return self._timed_out(st, age, "the Node still shows the boot from before the reboot "
                                   f"(bootID {st.k8s_boot_id[:8]}...); its kubelet has not re-registered", report)
        self.kube.label(name, K8S)
        note = "labelled sched=k8s"
        if k.cordoned_by_us:
            self.kube.uncordon(name)
            note += ", uncordoned"
        elif k.cordoned_by_other:
            note += "; left cordoned: that cordon is someone else's"
        return self._finish(st, f"Ready in Kubernetes, {note}", report)

    def _reboot(self, st: NodeState, report: PassReport) -> bool:
        name, to = st.name, st.target_role
        if st.power_at and st.power_at >= (st.phase_since or 0):
            # A power action was on its way when the pass that sent it stopped, before recording
            # it. Powering the node again would interrupt its boot (or its new kubelet's first
            # pods): wait for this boot instead; if it never comes, BOOTING's timeout retries.
            return self._goto(st, BOOTING, f"a power action was sent at {time.strftime('%H:%M:%S', time.localtime(st.power_at))} "
                              "by a pass that stopped before recording it; waiting for that boot", report,
                              phase_since=st.power_at)
        # Re-check both clusters right before the power action: a job or a pod that arrived
        # since the last look (an admin resume, a pod bound by nodeName) stops the reboot.
        s = self.slurm.nodes([name])[name]
        k = self.kube.node(name)
        holders = []
        if s.runs_jobs:
            holders.append(f"SLURM shows jobs on it ({s.state})")
        if k is not None and k.busy:
            holders.append(f"Kubernetes shows pods on it ({', '.join(p.key for p in k.pods)})")
        if holders:
            back = DRAINING if to == K8S else CORDONING
            transition(REBOOTING, back, to)
            self.store.update(name, actor=self.actor, kind="reboot-refused",
                              message=f"not rebooting: {'; '.join(holders)}", expect={"phase": REBOOTING},
                              phase=back, desired_role=other(to), phase_since=self.clock())
            report.steps.append(Step(name, "reboot-refused", "; ".join(holders), ok=True))
            return False
        _crash_point("before-power")
        node = self.site.nodes[name]
        # Taken before the action: a fast node may call back before this pass records BOOTING.
        # Written before it too: a pass that dies between the action and its record must not
        # make the next one power the node again (see the top of this method).
        powered_at = self.clock()
        if not self.store.update(name, actor=self.actor, kind="power-intent", message=f"powering {name} to boot "
                                 f"the {to} image", expect={"phase": REBOOTING}, power_at=powered_at):
            return False
        result = self.power(self.site, [node], "boot", netboot=True, store=self.store, actor=self.actor,
                            roles={name: to})[0]
        _crash_point("after-power")
        if not result.ok:
            attempts = st.attempts + 1
            if attempts > self.policy.max_retries:
                return self._fail(st, f"power action failed {attempts} times: {result.error}", report)
            # The action is known to have failed: clear its intent, or the next pass would wait
            # for a boot that was never started instead of trying the power action again.
            self.store.update(name, actor=self.actor, kind="retry", message=f"power failed ({result.error}); "
                              f"attempt {attempts} of {self.policy.max_retries + 1}", expect={"phase": REBOOTING},
                              attempts=attempts, power_at=None)
            report.steps.append(Step(name, "power", f"failed: {result.error}", ok=False))
            return False
        return self._goto(st, BOOTING, f"power {result.method} boot with one-time network boot", report,
                          phase_since=powered_at, k8s_boot_id=k.boot_id if k is not None else None)

    # -- phase changes -----------------------------------------------------------------

    def _goto(self, st: NodeState, phase: str, message: str, report: PassReport, **fields: Any) -> bool:
        transition(st.phase, phase, st.target_role)  # refuses a change the table does not declare
        fields.setdefault("phase_since", self.clock())
        ok = self.store.update(st.name, actor=self.actor, kind="phase", message=f"{st.phase} -> {phase}: {message}",
                               expect={"phase": st.phase}, data={"from": st.phase, "to": phase, "target": st.target_role},
                               phase=phase, **fields)
        if ok:
            report.steps.append(Step(st.name, phase, message))
        return ok

    def _timed_out(self, st: NodeState, age: float, what: str, report: PassReport) -> bool:
        if age <= self.policy.phase_timeout_s:
            return False
        attempts = st.attempts + 1
        if attempts > self.policy.max_retries:
            return self._fail(st, f"{what} after {attempts} boot(s) ({int(age)} s in {st.phase})", report)
        transition(st.phase, REBOOTING, st.target_role)
        ok = self.store.update(st.name, actor=self.actor, kind="retry",
                               message=f"{what} within {self.policy.phase_timeout_s} s; rebooting again "
                                       f"(attempt {attempts + 1} of {self.policy.max_retries + 1})",
                               expect={"phase": st.phase}, phase=REBOOTING, phase_since=self.clock(), attempts=attempts)
        if ok:
            report.steps.append(Step(st.name, "retry", what, ok=False))
        return ok

    def _fail(self, st: NodeState, reason: str, report: PassReport) -> bool:
        transition(st.phase, FAILED, st.target_role)
        self.store.update(st.name, actor=self.actor, kind="failed", message=f"switch to {st.target_role} FAILED: {reason}",
                          expect={"phase": st.phase}, phase=FAILED, failed_reason=reason, phase_since=self.clock())
        report.steps.append(Step(st.name, FAILED, reason, ok=False))
        if st.target_role == SLURM and self.site.slurm.power_saving:
            self._slurm_down(st.name, f"switch to slurm failed: {reason}", report)
        return False

    def _slurm_down(self, name: str, reason: str, report: PassReport) -> None:
        """Fail the way slurmctld's ResumeTimeout does (DOWN, the job waiting for it requeued),
        at once rather than when the timeout runs out. A reason slurmctld set stays."""
        try:
            self.slurm.down([name], reason)
        except OperationError as exc:
            report.notes.append(f"{name}: left as SLURM shows it: {exc}")

    # -- asks (slurmctld's programs), SLURM power saving --------------------------------

    def _given_up(self, world: World, report: PassReport) -> None:
        """slurmctld's ResumeFailProgram: a node it powered up did not register in ResumeTimeout.
        SLURM has marked it DOWN and requeued the job; the node is `failed` here too, with why."""
        for ask in world.asks:
            if ask.kind != "resume-fail":
                continue
            st = self.store.get(ask.node)
            why = f"slurmctld gave up waiting for it ({ask.reason})"
            if st is None or ask.node not in self.shared:
                self.store.close_ask(ask, "refused", "not a shared node", actor=self.actor)
                continue
            if st.phase in SWITCHING and st.target_role == SLURM:
                self._fail(st, f"{why} in phase {st.phase}", report)
                outcome = f"failed in phase {st.phase}"
            elif st.phase == STEADY and st.desired_role == SLURM:
                transition(STEADY, FAILED, SLURM)
                self.store.update(st.name, actor=self.actor, kind="failed", message=f"FAILED: {why}",
                                  expect={"phase": STEADY}, phase=FAILED, failed_reason=why, phase_since=self.clock())
                report.steps.append(Step(st.name, FAILED, why, ok=False))
                outcome = "failed: it was powered on for SLURM and did not come back"
            else:
                outcome = f"not waited for in SLURM ({st.phase}, {st.desired_role}): nothing to do"
            self.store.close_ask(ask, "done", outcome, actor=self.actor)

    def _answer(self, decision: pol.Decision, world: World, report: PassReport) -> None:
        """Close the asks the policy answered; carry out boots and power-offs it decided."""
        open_asks = {a.id: a for a in world.asks}
        for ans in decision.answers:
            ask = open_asks.get(ans.ask)
            if ask is None:
                continue
            if ans.outcome == "deferred":
                report.notes.append(f"{ans.node}: {ask.source}'s ask waits: {ans.message}")
                continue
            if ans.outcome == "refused" and ask.kind == pol.RESUME and ans.node in self.shared:
                # slurmctld gave a job to this node: hold it (ours) and power it down again, so
                # the job is requeued now rather than after ResumeTimeout, and not sent back here.
                try:
                    self.slurm.drain([ans.node], f"resume refused: {ans.message}")
                    self.slurm.power_down([ans.node])
                except OperationError as exc:
                    report.notes.append(f"{ans.node}: refused {ask.source}'s ask, and SLURM did not take it: {exc}")
            self.store.close_ask(ask, ans.outcome, ans.message, actor=self.actor)
            report.steps.append(Step(ans.node, f"ask-{ans.outcome}", f"{ask.source} {ask.kind}: {ans.message}",
                                     ok=ans.outcome != "refused"))
        for move in decision.boots:
            self._power_for_slurm(move.node, "boot", move.reason, report)
        for move in decision.power_off:
            self._power_for_slurm(move.node, "off", move.reason, report)

    def _power_for_slurm(self, name: str, action: str, reason: str, report: PassReport) -> None:
        """Power a node that stays in SLURM: on (SLURM gave it a job) or off (SLURM suspended it).
        Re-checked right before: never while jobs run there."""
        s = self.slurm.nodes([name])[name]
        expects_boot = s.powered_down or "powering_up" in s.flags  # SLURM waits for it to boot
        if s.runs_jobs or (action == "off" and not s.powered_down) or (action == "boot" and not expects_boot):
            report.notes.append(f"{name}: not powering {action}: SLURM shows it {describe_slurm(s)}")
            return
        result = self.power(self.site, [self.site.nodes[name]], action, netboot=action == "boot", store=self.store,
                            actor=self.actor, roles={name: SLURM})[0]
        report.steps.append(Step(name, f"power-{action}", f"{reason}: " + ("ok" if result.ok else result.error),
                                 ok=result.ok))

    def _sync_slurm_view(self, hold: dict[str, str | None], world: World, report: PassReport) -> None:
        """Keep SLURM's view of the shared nodes in Kubernetes: powered down, and free for SLURM
        to ask for unless the policy would refuse (then drained, ours, with the policy's reason).
        Only our own drains are lifted; a node someone else holds is left alone."""
        for name, why in hold.items():
            s = world.slurm_nodes[name]
            if s.held_by_other:
                continue
            try:
                if why is not None and not (s.drain or s.down):
                    s = self.slurm.drain([name], f"in Kubernetes: {why}")[name]
                # Powering up with no switch of ours behind it (a resume refused or failed, SLURM
                # still waiting for ResumeTimeout): powered down again, its job requeued now.
                if not (s.powered_down or "power_down" in s.flags):
                    if not s.down and (s.state == "unknown" or not s.responding):
                        # A node whose slurmd never registered takes no power_down: down it first.
                        self.slurm.down([name], "in Kubernetes")
                    s = self.slurm.power_down([name])[name]
                if why is None and (s.drain or s.down) and s.reason_is_ours and s.powered_down:
                    self.slurm.resume([name])
                    report.steps.append(Step(name, "slurm-free", "powered down in SLURM, free for it to ask"))
            except OperationError as exc:
                report.notes.append(f"{name}: SLURM view not updated: {exc}")

    def _rollback(self, st: NodeState, why: str, report: PassReport, resume: bool = True) -> bool:
        """Undo a switch that has not reached the reboot: the node stays where it was."""
        transition(st.phase, STEADY, st.target_role)
        name = st.name
        if st.target_role == K8S and resume:
            s = self.slurm.nodes([name])[name]
            if (s.drain or s.down) and s.reason_is_ours:
                self.slurm.resume([name])
        elif st.target_role == SLURM:
            k = self.kube.node(name)
            if k is not None and k.cordoned_by_us:
                self.kube.uncordon(name)
        self.store.update(name, actor=self.actor, kind="rollback", message=f"switch to {st.target_role} rolled back: {why}",
                          expect={"phase": st.phase}, phase=STEADY, target_role=None, phase_since=self.clock(),
                          attempts=0)
        report.steps.append(Step(name, "rollback", why))
        return False

    def _finish(self, st: NodeState, message: str, report: PassReport) -> bool:
        transition(st.phase, STEADY, st.target_role)
        now = self.clock()
        ok = self.store.update(st.name, actor=self.actor, kind="switched",
                               message=f"now in {st.target_role}: {message}", expect={"phase": st.phase},
                               data={"to": st.target_role}, phase=STEADY, target_role=None,
                               phase_since=now, attempts=0, last_switch_at=now, failed_reason=None)
        if ok:
            report.steps.append(Step(st.name, "done", message))
        return False

    # The handler of each switching phase (states.SWITCHING); each returns True when it moved on.
    _HANDLERS = {
        REQUESTED: _on_requested,
        DRAINING: _on_draining,
        CORDONING: _on_cordoning,
        REBOOTING: _on_rebooting,
        BOOTING: _on_booting,
        JOINING: _on_joining,
    }
