"""The machine: the one place a switch's phase is written.

A phase handler (handlers.py) observes and acts, then returns what happened: `Go(event, ...)`, an
event of the table in provisioner/states.py, or `Wait(why)` when the phase must wait. `step()`
runs the handler of a node's phase and hands the event to `fire()`, which looks the target up by
(phase, event, direction), checks that the pass still holds its lock, makes the one
compare-and-set write (expecting the phase, the attempts and the power intent the handler saw)
and logs the event under the kind the table declares. A handler that waits, or fails, past
policy.phase_timeout_s takes the way out the table declares for its phase (states.TIMEOUTS).

An error in a step (an adapter's OperationError, or anything else) is recorded and counts as a
wait, so the timeout still ends the switch; it never ends the pass for the other nodes.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from provisioner.errors import OperationError
from provisioner.states import FAILED, K8S, RECLAIM_TIMEOUTS, SLURM, STEADY, TIMEOUTS, lookup, other
from provisioner.store import NodeState
from provisioner.switch.locks import LockLost, check_held

if TYPE_CHECKING:
    from provisioner.reconcile import PassReport, Reconciler

# Test-only fault injection: PROVISIONER_CRASH_AT=<point> makes the pass SIGKILL itself there,
# to prove that a pass killed at any step leaves a state the next pass can finish or roll back.
# The points: after-drain, after-cordon, after-down, before-power, after-power, after-join-steps
# (in the handlers), and before-write-<event> / after-write-<event> around every write of the
# machine (before-write-booted, before-write-joined, after-write-rollback, ...).
CRASH_ENV = "PROVISIONER_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        die()


def die() -> None:
    """kill -9 of this process (the fast tests replace it with an exception no handler catches)."""
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Go:
    """A handler's result: take `event` (a row of states.TRANSITIONS) with these extra fields."""

    event: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    ok: bool = True  # how the pass report shows the step
    seen: NodeState | None = None  # the row as the handler left it (after an intermediate write)
    direction: str | None = None  # from steady or failed (no target_role yet): the switch's target
    actor: str | None = None  # who takes it (default: the pass's actor)
    data: dict[str, Any] = field(default_factory=dict)  # more for the event's data
    brief: str | None = None  # the pass report's words, when shorter than the log's


@dataclass(frozen=True)
class Wait:
    """A handler's result: the phase waits for `why` (its timeout says so if it runs out)."""

    why: str
    note: str | None = None  # for the pass report now
    on_timeout: str | None = None  # the event its timeout takes instead of the phase's (a declared one)


def step(rec: Reconciler, st: NodeState, report: PassReport) -> bool:
    """One step of a switching node. True when its phase changed (the caller tries the next)."""
    from provisioner.switch.handlers import HANDLERS

    try:
        out = HANDLERS[st.phase](rec, st, report)
    except LockLost:
        raise
    except Exception as exc:  # noqa: BLE001 - one node's error never ends the pass; its timeout still runs
        why = str(exc) if isinstance(exc, OperationError) else f"{exc.__class__.__name__}: {exc}"
        report.steps.append(_step(st.name, st.phase, why, ok=False))
        rec.store.add_event(st.name, rec.actor, "step-failed", f"{st.phase}: {why}", {"phase": st.phase})
        out = Wait(why)
    if isinstance(out, Go):
        seen = out.seen or st
        return fire(rec, seen, out, report) and lookup(seen.phase, out.event, out.direction or seen.target_role).target \
            != seen.phase
    if out.note:
        report.notes.append(f"{st.name}: {out.note}")
    return _on_timeout(rec, st, out.why, report, out.on_timeout)


def _on_timeout(rec: Reconciler, st: NodeState, why: str, report: PassReport, event: str | None = None) -> bool:
    """The phase waited (or failed) past policy.phase_timeout_s: the way out states.TIMEOUTS
    declares. True when the phase changed."""
    now = rec.clock()
    age = now - waits_since(st, now)
    if age <= rec.policy.phase_timeout_s:
        return False
    reclaim = st.reclaim_deadline is not None and st.phase in RECLAIM_TIMEOUTS and not rec.forced(st)
    event = event or (RECLAIM_TIMEOUTS[st.phase] if reclaim else TIMEOUTS[st.phase][1 if rec.forced(st) else 0])
    if event is None:
        report.notes.append(f"{st.name}: still {st.phase} after {int(age)} s ({why}; started by {st.switch_actor}; "
                            f"`provisioner role {st.name} --cancel` ends it)")
        return False
    if event == "retry":
        attempts = st.attempts + 1
        if attempts > rec.policy.max_retries:
            return fire(rec, st, Go("fail", f"{why} after {attempts} boot(s) ({int(age)} s in {st.phase})"), report)
        return fire(rec, st, Go("retry", f"{why} within {rec.policy.phase_timeout_s} s; rebooting again "
                                         f"(attempt {attempts + 1} of {rec.policy.max_retries + 1})",
                                {"attempts": attempts}, ok=False), report)
    return fire(rec, st, Go(event, why if f"{int(age)} s" in why else f"{why} ({int(age)} s in {st.phase})"), report)


def waits_since(st: NodeState, now: float) -> float:
    """When the phase's timeout starts counting: its start, or for a reclaim waiting for its
    work (draining, cordoning) the end of the grace, so phase_timeout_s never cuts a grace short."""
    since = st.phase_since or now
    if st.reclaim_deadline is not None and st.phase in RECLAIM_TIMEOUTS:
        since = max(since, st.reclaim_deadline)
    return since


def fire(rec: Reconciler, st: NodeState, go: Go, report: PassReport) -> bool:
    """Take the declared transition for go.event: the one compare-and-set write of a switch.
    True when it was written (False: the row changed under this pass, which leaves it alone)."""
    to = go.direction or st.target_role
    t = lookup(st.phase, go.event, to)
    now = rec.clock()
    fields = dict(go.fields)
    if t.target != t.source:
        fields.setdefault("phase", t.target)
        fields.setdefault("phase_since", now)
    if t.target in (STEADY, FAILED):
        fields.update(reclaim_deadline=None, reclaim_work=None)
    if t.target == STEADY:
        fields.update(target_role=None, attempts=0)
        if t.event == "joined":
            fields.update(last_switch_at=now, failed_reason=None)
    elif t.target == FAILED:
        fields["failed_reason"] = go.message
    message = {"phase": f"{st.phase} -> {t.target}: {go.message}", "failed": f"switch to {to} FAILED: {go.message}",
               "rollback": f"switch to {to} {'cancelled' if t.event == 'cancel' else 'rolled back'}: {go.message}",
               "switched": f"now in {to}: {go.message}", "reboot-refused": f"not rebooting: {go.message}"}
    data = {"event": t.event, "from": st.phase, "to": to if t.kind in ("switch", "switched") else t.target,
            "target": to, **go.data}
    if st.phase == STEADY:
        message = {}  # slurmctld's give-up of a node it powered for itself: no switch to name
    check_held()
    crash_point(f"before-write-{t.event}")
    ok = rec.store.update(st.name, actor=go.actor or rec.actor, kind=t.kind, message=message.get(t.kind, go.message),
                          expect={"phase": st.phase, "attempts": st.attempts, "power_at": st.power_at},
                          data=data, **fields)
    if not ok:  # another pass (or an admin's cancel) moved the node meanwhile: its write stands
        report.notes.append(f"{st.name}: {st.phase} changed under this pass; left to the next one")
        return False
    crash_point(f"after-write-{t.event}")
    action = {"phase": t.target, "switched": "done", "failed": FAILED, "power-intent": None,
              "switch": "requested"}.get(t.kind, t.kind)
    if t.event == "power-failed":
        action = "power"
    if action is not None:
        report.steps.append(_step(st.name, action, go.brief or go.message, ok=go.ok and t.target != FAILED))
    if t.kind == "rollback":
        _release(rec, st, report)
    elif t.target == FAILED and to == SLURM and rec.site.slurm.power_saving:
        _slurm_down(rec, st.name, f"switch to slurm failed: {go.message}", report)
    return True


def _release(rec: Reconciler, st: NodeState, report: PassReport) -> None:
    """After a rollback or a cancel: lift the holds the switch set on the side the node stays in."""
    lift_own_hold(rec, st.name, other(st.target_role), report, "the switch ended but its hold stays")


def lift_own_hold(rec: Reconciler, name: str, side: str, report: PassReport, what: str) -> bool:
    """Lift provisioner's own drain (SLURM) or cordon (Kubernetes) of `name` on `side`; someone
    else's drain or cordon stays theirs. True when a hold was lifted."""
    try:
        if side == K8S:
            k = rec.kube.node(name)
            if k is not None and k.cordoned_by_us:
                rec.kube.uncordon(name)
                return True
        else:
            s = rec.slurm.nodes([name])[name]
            if (s.drain or s.down) and s.reason_is_ours:
                rec.slurm.resume([name])
                return True
    except OperationError as exc:
        report.notes.append(f"{name}: {what}: {exc}; the next pass or an admin lifts it")
    return False


def _slurm_down(rec: Reconciler, name: str, reason: str, report: PassReport) -> None:
    """Fail the way slurmctld's ResumeTimeout does (DOWN, the job waiting for it requeued),
    at once rather than when the timeout runs out. A reason slurmctld set stays."""
    try:
        rec.slurm.down([name], reason)
    except OperationError as exc:
        report.notes.append(f"{name}: left as SLURM shows it: {exc}")


def _step(node: str, action: str, message: str, ok: bool = True):
    from provisioner.reconcile import Step

    return Step(node, action, message, ok)


def stamp(ts: float) -> str:
    """A time in an event or a message: UTC with its offset, one reading on every host."""
    from provisioner.store import iso

    return iso(ts)
