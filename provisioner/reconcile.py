"""One balancing pass: observe -> decide -> act -> record.

Level-triggered, like a Kubernetes controller: every pass reads the world, advances each
switching node by at most the steps whose preconditions hold now, starts the moves the policy
asks for, answers the schedulers' asks, and exits. Nothing waits minutes inside a pass; the next
pass (cron, every minute, or `provisioner run`) picks up where this one stopped, also after a
crash, because every node's switch is a state machine persisted in the store and every step is
idempotent.

A node's switch is the machine of provisioner/switch/: the table of provisioner/states.py, the
phase handlers (switch/handlers.py) and the one writer (switch/machine.py). This module is the
pass around it: what the pass observed (World), the snapshot the policy decides on, the admin's
requests (`provisioner role`, its --cancel), and slurmctld's asks, answered on facts: a resume
is granted only once its node's power action succeeded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from provisioner import policy as pol
from provisioner.clusters.interfaces import KubeClient, PowerFn, SlurmClient
from provisioner.clusters.slurm import describe as describe_slurm
from provisioner.errors import OperationError, UsageError
from provisioner.model import Site
from provisioner.nodeset import fold
from provisioner.powering import power_nodes  # noqa: F401  (its home: provisioner/powering.py)
from provisioner.states import (BOOTING, CANCELLABLE, CORDONING, DRAINING, FAILED, JOINING, K8S, REBOOTING, SLURM, STEADY,
                                SWITCHING)
from provisioner.store import HELD, Hold, NodeState, Store
from provisioner.switch import machine
from provisioner.switch.locks import LockLost, PassLocked, check_held, pass_lock  # noqa: F401  (home: switch/locks.py)
from provisioner.switch.handlers import set_by_a_switch
from provisioner.switch.machine import CRASH_ENV, Go  # noqa: F401

ACTOR = "balancer"

ROLE_NOW_WAIT_S = 60.0  # `role --now` waits this long for a running balance pass to finish


# --------------------------------------------------------------------------- report


# How often an admin's request is decided again after losing a compare-and-set to a racing writer.
REQUEST_TRIES = 5


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
    held: dict[str, str] = field(default_factory=dict)  # policy.Decision.held: reclaims held, and why

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
            "held": self.held,
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


@dataclass
class CancelResult:
    """What an admin's cancel did (`provisioner role NODESET --cancel`)."""

    reason: str
    cancelled: list[str] = field(default_factory=list)  # back to steady in their old role, unpinned
    refused: dict[str, str] = field(default_factory=dict)  # past their power action: what happens instead
    idle: list[str] = field(default_factory=list)  # not switching: nothing to cancel
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused


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
    holds: dict[str, Hold] = field(default_factory=dict)  # shared nodes an admin holds for maintenance


def powered(st: NodeState) -> bool:
    """The switch has powered its node (or sent the power action): too late to cancel or roll back."""
    return st.phase not in CANCELLABLE or (st.phase == REBOOTING and st.power_at is not None
                                           and st.power_at >= (st.phase_since or 0))


class Reconciler:
    def __init__(self, site: Site, store: Store, slurm: SlurmClient | None = None, kube: KubeClient | None = None,
                 power: PowerFn | None = None, clock: Callable[[], float] = time.time, actor: str = ACTOR):
        """clock: the balancer's; the switch's own times (phase_since, power_at) are all taken on
        it. Times stamped by other hosts are compared with a stated slack (switch/handlers.py)."""
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
            self._refuse_held(world, report)
        left = self._left_pool(report) if only is None else []
        if not dry_run:
            for name in nodes:
                if world.states[name].phase in SWITCHING:
                    self._advance(name, report)
            for st in left:
                self._leave_pool(st, report)
            if only is None:
                self._lift_stale_holds(world, report)
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
            report.held = dict(decision.held)
            report.notes.extend(decision.notes)
            for name, hold in world.holds.items():
                report.notes.append(f"{name}: {hold.describe()}; the balancer leaves it alone")
                if name in decision.slurm_hold:  # SLURM shows why it may not ask for it
                    decision.slurm_hold[name] = f"{HELD}: {hold.reason}"
            report.moves.extend(decision.moves)
            if self.provider is not None:
                report.errors.extend(self.provider.serve(world.requests, decision.gangs, report.notes, dry_run))
            if not dry_run:
                self._release_reclaims(decision.release, report)
                for move in decision.moves:
                    try:
                        started = self._start(move.node, move.to_role, move.reason, actor=self.actor, forced=False,
                                              report=report, move=move)
                    except LockLost:
                        raise
                    except Exception as exc:  # noqa: BLE001 - one node's error never ends the pass
                        report.errors.append(f"{move.node}: switch to {move.to_role} not started: {exc}")
                        continue
                    if started:
                        self._advance(move.node, report)
                self._answer(decision, world, report)
                self._show_holds(world, report)
                if self.site.slurm.power_saving:
                    self._sync_slurm_view(decision.slurm_hold, world, report)
        return report

    def _lift_stale_holds(self, world: World, report: PassReport) -> None:
        """A steady node serves its role, so a switch's drain or cordon on that side belongs to a
        switch that ended without lifting it (its pass was killed between the rollback's write and
        the release): lift it. Our other drains, and anyone else's, are never touched."""
        for name in self.shared:
            st = world.states[name]
            if st.phase != STEADY:
                continue
            if st.desired_role == SLURM:
                s = world.slurm_nodes[name]
                stale = (s.drain or s.down) and s.reason_is_ours and set_by_a_switch(s.reason,
                                                                                    self.site.slurm.reason_prefix)
            else:
                k = world.kube_nodes.get(name)
                stale = k is not None and k.cordoned_by_us
            if not stale:
                continue
            now = self.store.get(name)  # an admin's `role` may have started a switch since observe
            if now.phase == STEADY and now.desired_role == st.desired_role and machine.lift_own_hold(
                    self, name, st.desired_role, report, "a hold left by an ended switch stays"):
                report.steps.append(Step(name, "hold-lifted", f"steady in {st.desired_role}: lifted the "
                                         "drain or cordon an ended switch had left"))

    def _release_reclaims(self, release: dict[str, str], report: PassReport) -> None:
        """Roll back the reclaims the policy released, if still in their grace (their work untouched)."""
        for name, why in release.items():
            try:
                st = self.store.get(name)
                if st.phase in (DRAINING, CORDONING) and st.reclaim_deadline and st.reclaim_deadline > self.clock():
                    machine.fire(self, st, Go("rollback", why), report)
            except LockLost:
                raise
            except Exception as exc:  # noqa: BLE001 - one node's error never ends the pass
                report.errors.append(f"{name}: reclaim not released: {exc}")

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
            holds=self.store.holds(self.shared),
        )

    def _refresh_states(self, world: World) -> World:
        """The clusters as observed, the store's side read again."""
        return replace(world, states=self.store.nodes(self.shared), asks=tuple(self.store.open_asks()),
                       holds=self.store.holds(self.shared))

    # -- the snapshot for the policy -------------------------------------------------

    def snapshot(self, world: World, record_demand: bool) -> pol.Snapshot:
        now = self.clock()
        nodes = tuple(self._shared_node(name, world, now) for name in self.shared)
        jobs = tuple(
            pol.PendingJob(j.job_id, j.reason, j.partitions, j.num_nodes, j.cpus_per_node, j.gpus_per_node)
            for j in world.pending_jobs if not j.req_nodes or set(j.req_nodes) & set(self.shared)
        )
        pods = tuple(
            pol.PendingPod(p.namespace, p.name, p.cpu_m, p.memory, p.gpus, p.node_selector, p.tolerations)
            for p in world.pending_pods
        )
        if self.site.slurm.power_saving:
            # SLURM gives jobs to "powered down" shared nodes itself and asks for them through
            # its ResumeProgram: polling its queue too would move a second node for the same job.
            jobs = ()
        # A held node's asks are answered before the policy (_refuse_held): the policy never sees them.
        asks = tuple(pol.Ask(a.id, a.node, a.kind, a.source, a.reason) for a in world.asks
                     if a.kind in (pol.RESUME, pol.SUSPEND) and a.node not in world.holds)
        snap = pol.Snapshot(now=now, policy=self.policy, nodes=nodes, jobs=jobs, pods=pods)
        # Demand persistence: first-seen times live in the store, so they survive between passes.
        amounts = pol.demand(snap)
        since = self.store.set_demand(amounts, now) if record_demand else self.store.demand_since()
        from provisioner.provisioning import gang_asks

        return pol.Snapshot(now=now, policy=self.policy, nodes=nodes, jobs=jobs, pods=pods, demand_since=since,
                            asks=asks, gangs=gang_asks(world.requests, self.site.kubernetes.booking_s))

    def _shared_node(self, name: str, world: World, now: float) -> pol.SharedNode:
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
        home = self.site.nodes[name].home_side
        room = k.room if (k is not None and role == K8S) else (0, 0, 0)
        work = self._work(name, now) if role == SLURM and busy and home == K8S and st.phase == STEADY else {}
        # A held node is kept out of every move as a pinned one is (where it is, for everyone);
        # the pass's own notes and SLURM's reason say it is held.
        return pol.SharedNode(
            name=name, role=role, phase=st.phase, pinned=st.pinned or name in world.holds, busy=busy,
            available=available,
            last_switch_at=st.last_switch_at, cpus=s.cpus or (k.cpu_m // 1000 if k else 1),
            memory=(s.memory_mb << 20) if s.memory_mb else (k.memory if k else 0),
            gpus=s.gpus or (k.gpus if k else 0), partitions=s.partitions,
            k8s_labels=tuple(sorted(labels.items())), k8s_taints=k.taints if k else (), held_by=held, home=home,
            room_cpu_m=room[0], room_memory=room[1], room_gpus=room[2],
            evict_refused_at=st.evict_refused_at, evict_refused=st.evict_refused,
            reclaim_deadline=st.reclaim_deadline if st.phase in SWITCHING else None, **work,
        )

    def _work(self, name: str, now: float) -> dict[str, Any]:
        """What reclaiming a busy SLURM-side node would cost (SharedNode.movable, work_cost,
        work_ends_at, work_ids), read only for nodes Kubernetes could reclaim. Unknown (SLURM did not
        answer): nothing, and the policy's defaults stand."""
        try:
            jobs = self.slurm.jobs_on(name)
        except OperationError:
            return {}
        ends = [j.end_time for j in jobs]
        return {"movable": all(j.requeueable for j in jobs),
                "work_cost": sum((now - j.start_time) * len(j.nodes) for j in jobs if j.start_time is not None),
                "work_ends_at": max(ends) if ends and None not in ends else None,
                "work_ids": tuple(j.job_id for j in jobs)}

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
        held = sorted(self.store.holds(names))
        if held:
            raise UsageError(f"{fold(held)} held for maintenance: `provisioner unhold {fold(held)}` first "
                             f"(`provisioner nodes {fold(held)}` says why)")
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

    def hold(self, names: list[str], *, actor: str, reason: str) -> list[str]:
        """An admin holds shared nodes for maintenance: from the next pass on, no move, no ask
        and no power saving touches them (nothing is drained or cordoned for it). A node in the
        middle of a switch is refused: the switch would go on. Returns the nodes changed."""
        fixed = [n for n in names if n not in self.shared]
        if fixed:
            raise UsageError(f"{fold(fixed)} not in the shared pool: provisioner never moves them, "
                             f"there is nothing to hold")
        states = self.store.nodes(names)
        moving = [n for n in names if n in states and states[n].phase in SWITCHING]
        if moving:
            raise UsageError(f"{fold(moving)} in the middle of a switch: `provisioner role {fold(moving)} --cancel` "
                             f"or let it end (`provisioner nodes {fold(moving)}`), then hold")
        return self.store.hold(names, actor=actor, reason=reason)

    def request(self, names: list[str], role: str, *, actor: str, reason: str) -> list[Step]:
        """An admin forces nodes to a role (pinned). Starts the switch where one is needed.

        Each node's answer is decided on what the store holds when the write is made: a write
        that loses its compare-and-set (another admin, a pass) is decided again on the new row,
        so two racing commands get the answers they would have got one after the other."""
        steps = []
        for name in names:
            for _ in range(REQUEST_TRIES):
                st = self.store.get(name)
                if st.phase in SWITCHING and st.target_role != role:
                    raise OperationError(f"{name} is switching to {st.target_role} (phase {st.phase}); wait for it "
                                         f"to finish (`provisioner nodes {name}`), or end it with `provisioner role "
                                         f"{name} --cancel`, then run role again")
                if (st.phase == STEADY and st.desired_role == role) or (st.phase in SWITCHING and st.target_role == role):
                    if not st.pinned and not self.store.update(
                            name, actor=actor, kind="pin", message=f"pinned to {role}: {reason}",
                            expect={"phase": st.phase, "desired_role": st.desired_role,
                                    "target_role": st.target_role, "pinned": st.pinned},
                            pinned=1, pin_reason=reason):
                        continue  # the node moved meanwhile: decide again
                    steps.append(Step(name, "pin", f"already {role}" + ("" if st.phase == STEADY else " (switching)")))
                    break
                report = PassReport(dry_run=False)
                if self._start(name, role, reason, actor=actor, forced=True, report=report):
                    steps.extend(report.steps)
                    break
            else:
                raise OperationError(f"{name} kept changing while this command ran (another admin or a pass); "
                                     f"look at `provisioner nodes {name}`, then run role again")
        return steps

    def _start(self, name: str, role: str, reason: str, *, actor: str, forced: bool, report: PassReport,
               move: pol.Move | None = None) -> bool:
        """Start a switch; a reclaim's facts (its grace deadline, what happens to the work) are
        written with it, so every later pass carries it out the same way."""
        st = self.store.get(name)
        if st.phase not in (STEADY, FAILED):
            return False
        reclaim = move is not None and move.reclaim
        hold = None if forced else self.store.holds([name]).get(name)
        if hold is not None:  # held since this pass observed: re-checked right before the switch
            report.notes.append(f"{name}: not moved: {hold.describe()}")
            return False
        fields: dict[str, Any] = dict(target_role=role, attempts=0, failed_reason=None, switch_reason=reason,
                                      switch_actor=actor, power_at=None,
                                      reclaim_deadline=move.deadline if reclaim else None,
                                      reclaim_work=move.work if reclaim else None)
        if forced:
            fields.update(pinned=1, pin_reason=reason)
        return machine.fire(self, st, Go("start", f"switch to {role} requested{' (pinned)' if forced else ''}: {reason}",
                                         fields, direction=role, actor=actor,
                                         data={"reason": reason, "forced": forced,
                                               **({"reclaim": {"deadline": move.deadline, "grace_s": move.grace_s,
                                                               "work": move.work, "from": move.from_role}}
                                                  if reclaim else {})}), report)

    # -- cancelling a switch ------------------------------------------------------------

    def cancel(self, names: list[str], *, actor: str, reason: str) -> CancelResult:
        """An admin ends switches that have not powered their node yet (`provisioner role
        NODESET --cancel`): back to steady in the role the node had, unpinned, with only the
        switch's own drain or cordon lifted. A switch past its power action is not undone (the
        node may be half-way through its boot): the result says what it will do instead."""
        result = CancelResult(reason)
        report = PassReport(dry_run=False)
        for name in names:
            st = self.store.get(name)
            if st is None or st.phase not in SWITCHING:
                result.idle.append(name)
                continue
            if powered(st):
                result.refused[name] = self._after_power(st)
                continue
            go = Go("cancel", f"by {actor}: {reason}", {"pinned": 0, "pin_reason": None}, actor=actor)
            if machine.fire(self, st, go, report):
                result.cancelled.append(name)
            else:  # a pass moved it on meanwhile (maybe past its power action): say what now holds
                now = self.store.get(name)
                result.refused[name] = self._after_power(now) if now.phase in SWITCHING else f"now {now.phase}"
        result.notes = report.notes
        return result

    def _after_power(self, st: NodeState) -> str:
        when = machine.stamp(st.power_at) if st.power_at else "?"
        limit = self.policy.phase_timeout_s
        back = "k8s" if st.target_role == SLURM else "slurm"
        return (f"powered at {when} to boot the {st.target_role} image ({st.phase}): not cancelled; it joins "
                f"{st.target_role}, or after {limit} s without it is rebooted again (at most "
                f"{self.policy.max_retries} more time(s)) and then marked failed; to undo it, run "
                f"`provisioner role {st.name} {back}` once it is steady")

    # -- advancing a switch -------------------------------------------------------------

    def _advance(self, name: str, report: PassReport) -> None:
        """Take as many steps as hold now (each one a compare-and-set on the phase). Whatever
        goes wrong stays with this node: the pass goes on with the others (but stops at once
        when it lost its lock)."""
        try:
            for _ in range(len(SWITCHING) + 1):
                st = self.store.get(name)
                if st.phase not in SWITCHING or not self._step(st, report):
                    return
        except LockLost:
            raise
        except Exception as exc:  # noqa: BLE001 - a store hiccup in this node's write: the next pass retries
            report.errors.append(f"{name}: {exc.__class__.__name__}: {exc}")

    def _left_pool(self, report: PassReport) -> list[NodeState]:
        """Nodes an admin took out of the shared pool (site.yaml) while they were switching: the
        passes still see their switches through, or they would stay cordoned or drained forever."""
        fixed = [n for n in self.site.nodes if n not in self.shared]
        left = [st for st in self.store.nodes(fixed).values() if st.phase in SWITCHING]
        for st in left:
            pool = self.site.nodes[st.name].pool
            what = "finishing it" if st.target_role == pool else "rolling it back, or finishing it if already powered"
            report.notes.append(f"WARNING: {st.name} left the shared pool (now pool {pool}) while switching to "
                                f"{st.target_role} ({st.phase}): {what}")
        return left

    def _leave_pool(self, st: NodeState, report: PassReport) -> None:
        """A switch toward a role the node's new pool forbids is rolled back while it has not
        powered the node; past its power action (or toward the allowed role) it is finished."""
        if st.target_role != self.site.nodes[st.name].pool and not powered(st):
            event = "cancel" if st.phase == REBOOTING else "rollback"
            try:
                machine.fire(self, st, Go(event, f"{st.name} left the shared pool"), report)
            except LockLost:
                raise
            except Exception as exc:  # noqa: BLE001 - one node's error never ends the pass
                report.errors.append(f"{st.name}: {exc.__class__.__name__}: {exc}")
            return
        self._advance(st.name, report)

    def _step(self, st: NodeState, report: PassReport) -> bool:
        """One step from st.phase, by the machine. True when the phase changed."""
        return machine.step(self, st, report)

    def forced(self, st: NodeState) -> bool:
        """An admin's switch (pinned by someone other than the balancer)."""
        return bool(st.pinned and st.switch_actor != self.actor)

    # -- asks (slurmctld's programs), SLURM power saving --------------------------------

    def _given_up(self, world: World, report: PassReport) -> None:
        """slurmctld's ResumeFailProgram: a node it powered up did not register in ResumeTimeout.
        SLURM has marked it DOWN and requeued the job; the node is `failed` here too, with why,
        and its open resume asks are answered (failed). Each ask on its own: one that cannot be
        carried out is still answered, and never stops the pass."""
        for ask in world.asks:
            if ask.kind != "resume-fail":
                continue
            try:
                outcome = self._give_up(ask, report)
            except LockLost:
                raise
            except Exception as exc:  # noqa: BLE001 - answered anyway: slurmctld has given up already
                outcome = f"could not be recorded ({exc.__class__.__name__}: {exc})"
                report.errors.append(f"{ask.node}: {outcome}")
            self.store.close_ask(ask, "done", outcome, actor=self.actor)
            for other_ask in world.asks:
                if other_ask.node == ask.node and other_ask.kind == pol.RESUME:
                    self.store.close_ask(other_ask, "failed", f"slurmctld gave up waiting for it ({ask.reason})",
                                         actor=self.actor)

    def _show_holds(self, world: World, report: PassReport) -> None:
        """Kubernetes shows why provisioner leaves a held node alone: its Node carries the hold's
        reason (an annotation, never a cordon), and loses it once the hold ends. A node of SLURM's
        that was drained (ours) because SLURM asked for it while held is given back to SLURM
        then; a node in Kubernetes is given back by _sync_slurm_view."""
        for name in self.shared:
            k = world.kube_nodes.get(name)
            want = world.holds[name].reason if name in world.holds else None
            try:
                if k is not None and k.hold != want:
                    self.kube.mark_hold(name, want)
                s, st = world.slurm_nodes[name], world.states[name]
                if want is None and s.drain and s.reason_is_ours and HELD in (s.reason or "") \
                        and st.phase == STEADY and st.desired_role == SLURM:
                    self.slurm.resume([name])
                    report.steps.append(Step(name, "slurm-free", "hold ended: SLURM's drain for it lifted"))
            except OperationError as exc:
                report.notes.append(f"{name}: the hold not shown (or its end) in the clusters: {exc}")

    def _refuse_held(self, world: World, report: PassReport) -> None:
        """slurmctld's asks for a held node, answered at once and for good: a resume is refused
        (SLURM requeues its job now, as for any refusal), a suspend powers nothing off."""
        for ask in world.asks:
            hold = world.holds.get(ask.node)
            if hold is None or ask.kind not in (pol.RESUME, pol.SUSPEND):
                continue
            why = f"{hold.describe()}; `provisioner unhold {ask.node}` ends it"
            answer = pol.Answer(ask.id, ask.node, "refused", why) if ask.kind == pol.RESUME else \
                pol.Answer(ask.id, ask.node, "done", f"not powered off: {why}")
            try:
                self._close(ask, answer, {}, report)
            except LockLost:
                raise
            except Exception as exc:  # noqa: BLE001 - left open: the next pass answers it
                report.errors.append(f"{ask.node}: {ask.source}'s ask not answered yet: {exc}")

    def _give_up(self, ask, report: PassReport) -> str:
        st = self.store.get(ask.node)
        if st is None or ask.node not in self.shared:
            return "not a shared node: nothing to do"
        why = f"slurmctld gave up waiting for it ({ask.reason})"
        if (st.phase in SWITCHING and st.target_role == SLURM) or (st.phase == STEADY and st.desired_role == SLURM):
            where = f"in phase {st.phase}"
            if machine.fire(self, st, Go("given-up", f"{why} {where}", direction=SLURM), report):
                return f"failed {where}" if st.phase != STEADY else "failed: it was powered on for SLURM and did not come back"
            return f"not failed: its phase changed meanwhile (now {self.store.get(ask.node).phase})"
        return f"not waited for in SLURM ({st.phase}, {st.desired_role}): nothing to do"

    def _answer(self, decision: pol.Decision, world: World, report: PassReport) -> None:
        """Close the asks the policy answered, on facts: a resume is granted only once its node
        was powered (a boot here, or its switch's power action); until then it stays open and the
        next pass tries again (a failed power action too), within the ask's life (slurmctld's
        ResumeTimeout, after which its ResumeFailProgram answers it)."""
        open_asks = {a.id: a for a in world.asks}
        booted: dict[str, tuple[str, str]] = {}  # node -> (powered | not-needed | failed, what happened)
        for move in decision.boots:
            booted[move.node] = self._power_for_slurm(move.node, "boot", move.reason, report)
        for ans in decision.answers:
            ask = open_asks.get(ans.ask)
            if ask is None:
                continue
            try:
                self._close(ask, ans, booted, report)
            except LockLost:
                raise
            except Exception as exc:  # noqa: BLE001 - left open: the next pass answers it
                report.errors.append(f"{ans.node}: {ask.source}'s ask not answered yet: {exc}")
        for move in decision.power_off:
            self._power_for_slurm(move.node, "off", move.reason, report)

    def _close(self, ask, ans: pol.Answer, booted: dict[str, str | None], report: PassReport) -> None:
        if ans.outcome == "deferred":
            report.notes.append(f"{ans.node}: {ask.source}'s ask waits: {ans.message}")
            return
        outcome, message = ans.outcome, ans.message
        if outcome == "granted" and ask.kind == pol.RESUME:
            if ans.node in booted:
                how, what = booted[ans.node]
                if how == "failed":
                    report.notes.append(f"{ans.node}: {ask.source}'s ask stays open: {what}; tried again next pass")
                    return
                if how == "not-needed":
                    outcome, message = "done", what
            else:
                st = self.store.get(ans.node)
                if not (st.phase in (BOOTING, JOINING) or (st.phase == STEADY and st.desired_role == SLURM)):
                    report.notes.append(f"{ans.node}: {ask.source}'s ask stays open until the node is powered "
                                        f"({message}; now {st.phase})")
                    return
                message = f"{message}; powered for SLURM ({st.phase})"
        if outcome == "refused" and ask.kind == pol.RESUME and ans.node in self.shared:
            # slurmctld gave a job to this node: hold it (ours) and power it down again, so
            # the job is requeued now rather than after ResumeTimeout, and not sent back here.
            try:
                self.slurm.drain([ans.node], f"resume refused: {message}")
                self.slurm.power_down([ans.node])
            except OperationError as exc:
                report.notes.append(f"{ans.node}: refused {ask.source}'s ask, and SLURM did not take it: {exc}")
        if self.store.close_ask(ask, outcome, message, actor=self.actor):
            report.steps.append(Step(ans.node, f"ask-{outcome}", f"{ask.source} {ask.kind}: {message}",
                                     ok=outcome != "refused"))

    def _power_for_slurm(self, name: str, action: str, reason: str, report: PassReport) -> tuple[str, str]:
        """Power a node that stays in SLURM: on (SLURM gave it a job) or off (SLURM suspended it).
        Re-checked right before: never while jobs run there. Returns ("powered" | "not-needed" |
        "failed", what happened)."""
        intent = None
        try:
            s = self.slurm.nodes([name])[name]
            expects_boot = s.powered_down or "powering_up" in s.flags  # SLURM waits for it to boot
            if s.runs_jobs or (action == "off" and not s.powered_down) or (action == "boot" and not expects_boot):
                why = f"not powering {action}: SLURM shows it {describe_slurm(s)}"
                report.notes.append(f"{name}: {why}")
                return "not-needed", why
            check_held()
            if action == "boot":
                # The boot's written intent (and its secrets window): a grant of ours. A pass killed
                # after the power action finds it and waits for the boot instead of a second one.
                now = self.clock()
                since = self._resume_boot_pending(name, now)
                if since is not None:
                    why = f"powered on at {machine.stamp(since)} by an earlier pass: waiting for it to boot"
                    report.notes.append(f"{name}: {why}")
                    return "powered", why
                self.store.grant_boot([name], actor=self.actor, reason=f"SLURM resume: {reason}", now=now)
                intent = now
            result = self.power(self.site, [self.site.nodes[name]], action, netboot=action == "boot",
                                store=self.store, actor=self.actor, roles={name: SLURM})[0]
            machine.crash_point(f"after-power-{action}")
            if intent is not None and not result.ok:
                self._end_grant(name, intent, report)
            elif action == "off" and result.ok:
                row = self.store.boot_row(name) or {}
                if row.get("granted_by") == self.actor and row.get("granted_at") is not None:
                    self._end_grant(name, row["granted_at"], report)  # off: no boot of ours is coming
        except LockLost:
            raise
        except Exception as exc:  # noqa: BLE001 - this node only
            report.steps.append(Step(name, f"power-{action}", f"{reason}: {exc}", ok=False))
            if intent is not None:
                self._end_grant(name, intent, report)
            return "failed", str(exc)
        report.steps.append(Step(name, f"power-{action}", f"{reason}: " + ("ok" if result.ok else result.error),
                                 ok=result.ok))
        return ("powered", "powered on") if result.ok else ("failed", f"power {action} failed: {result.error}")

    def _resume_boot_pending(self, name: str, now: float) -> float | None:
        """When an earlier pass powered `name` on for slurmctld and its boot has not called back
        yet (the token issued after that grant is not spent), within phase_timeout_s: that
        grant's time. None: no boot of ours is on its way."""
        row = self.store.boot_row(name) or {}
        since = row.get("granted_at")
        if row.get("granted_by") != self.actor or since is None or not 0 <= now - since < self.policy.phase_timeout_s:
            return None
        booted = row.get("spent_at") is not None and (row.get("issued_at") or 0) >= since
        return None if booted else since

    def _end_grant(self, name: str, since: float, report: PassReport) -> None:
        try:
            self.store.end_boot_grant(name, since)
        except Exception as exc:  # noqa: BLE001 - the window closes at its end anyway
            report.notes.append(f"{name}: its boot window stays open until it ends: {exc}")

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
