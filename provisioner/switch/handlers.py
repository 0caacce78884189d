"""The phase handlers of a switch: one function per switching phase, `on_<phase>(rec, st, report)`.
Each checks the next step's preconditions against both clusters, takes the step's actions in the
clusters, and returns what happened: `Go(event, ...)` (an event of provisioner/states.py; the
machine writes the phase) or `Wait(why)`. None of them writes a phase itself.

  to k8s:   requested -> draining (SLURM drain, our reason) -> [drained: down k8s_connect,
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
(power_at, the power-intent event): a pass that dies between the action and its record does not
power the node twice.

Safety rules kept here:
- right before any power action, both clusters are asked again whether the node runs a job or
  a pod; if it does, no power action, and the node goes back to the step before (unless the
  work is the target side's, on a node this switch already powered: it serves, on to joining);
- drains and cordons that provisioner did not set are never lifted (the adapters refuse too);
- a balancer move that cannot get its node free within policy.phase_timeout_s is rolled back;
  an admin-forced one waits for running jobs to end however long they take, and fails visibly
  when pods cannot be evicted within the timeout (a PodDisruptionBudget);
- a node that does not come back after a reboot is rebooted again, at most policy.max_retries
  times, then marked `failed` with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from provisioner.clusters.slurm import PAPER_REASON
from provisioner.states import (BOOTING, CORDONING, DRAINING, EVICT, JOINING, K8S, REBOOTING, REQUEUE, REQUESTED, SLURM, WAIT,
                                other)
from provisioner.store import NodeState
from provisioner.switch.machine import Go, Wait, crash_point, fire, stamp

log = logging.getLogger(__name__)

DRAIN_REASON = "switching to k8s"  # how a switch's own drain reads in SLURM, after our prefix


def set_by_a_switch(reason: str | None, prefix: str) -> bool:
    """A SLURM reason of ours that a switch sets: its drain, or the paper's down once drained.
    Our other drains (a refused resume, a node in Kubernetes under power saving) are not."""
    r = (reason or "").strip()
    return r == PAPER_REASON or r.removeprefix(prefix).strip().startswith(DRAIN_REASON)

if TYPE_CHECKING:
    from provisioner.reconcile import PassReport, Reconciler

# slurmd reports its start time from the node's clock, which a freshly booted diskless node may
# not have synced yet: a slurmd that started up to this long before the reboot still counts as
# this boot's. One that ran before the previous switch is older (a cron pass is a minute apart).
CLOCK_SLACK_S = 60

# The boot server stamps a callback with its host's clock, the balancer the power action with
# its own. One recorded after the power intent is stamped no earlier than it by the store
# (store._since_power: the store's order decides, whatever the clocks say); one recorded before
# counts as this boot's when at most this much older than the power action.
HOST_CLOCK_SKEW_S = 5


def on_requested(rec: Reconciler, st: NodeState, report: PassReport) -> Go | Wait:
    name = st.name
    if st.target_role == K8S:
        s = rec.slurm.nodes([name])[name]
        if s.held_by_other:
            why = f"held in SLURM by someone else ({s.reason}): hands off"
            return Wait(why) if rec.forced(st) else Go("rollback", why)
        rec.slurm.drain([name], f"{DRAIN_REASON}: {st.switch_reason or ''}".strip())
        crash_point("after-drain")
        return Go("drain", f"draining in SLURM ({st.switch_reason})")
    cordon_ours = rec.kube.cordon(name) if rec.kube.node(name) else True
    crash_point("after-cordon")
    note = "" if cordon_ours else " (already cordoned by someone else: that cordon stays theirs)"
    return Go("cordon", f"cordoned in Kubernetes{note}")


def on_draining(rec: Reconciler, st: NodeState, report: PassReport) -> Go | Wait:
    name = st.name
    s = rec.slurm.nodes([name])[name]
    if s.held_by_other:
        return Go("rollback", f"someone else changed the node in SLURM ({s.reason}): hands off")
    if not (s.drain or s.down):
        return Go("rollback", "the drain was lifted by someone else")
    if s.busy:
        if st.reclaim_work == REQUEUE:
            return _requeue(rec, st, report)
        if st.reclaim_work == WAIT:
            # A requeue would lose more work than it saves (policy.requeue_pays): the jobs run to
            # their end, as jobs that cannot be requeued do (the same wait, without a timeout).
            return Wait(f"reclaim: {waiting_for(st)}", note=f"reclaim: {waiting_for(st)}")
        return Wait("jobs still running")
    if rec.site.slurm.power_saving:
        # Powered down for SLURM, still drained (ours) until it is settled in Kubernetes.
        rec.slurm.power_down([name])
        done = "drained and powered down in SLURM"
    else:
        rec.slurm.down([name])
        done = "drained and down in SLURM (k8s_connect)"
    crash_point("after-down")
    k = rec.kube.node(name)
    return Go("drained", f"{done}; will boot the k8s image",
              {"desired_role": K8S, "power_at": None, "k8s_boot_id": k.boot_id if k is not None else None})


def on_cordoning(rec: Reconciler, st: NodeState, report: PassReport) -> Go | Wait:
    name = st.name
    k = rec.kube.node(name)
    if k is not None and k.busy and st.reclaim_work == EVICT:
        out = _evict(rec, st, report)
        if out is not None:
            return out
    elif k is not None and k.busy:
        if not rec.forced(st):
            return Go("rollback", f"pods appeared on the node ({', '.join(p.key for p in k.pods)})")
        res = rec.kube.evict_pods(name)
        if not res.free:
            blocked = "; ".join(f"{p} ({why})" for p, why in res.blocked) or ", ".join(res.remaining)
            age = rec.clock() - (st.phase_since or rec.clock())
            return Wait(f"pods could not be evicted in {int(age)} s: {blocked}",
                        note=f"waiting for pods to leave: {blocked}")
    if rec.site.slurm.power_saving:
        # SLURM must expect the node: our hold lifted, and "powering up" (when slurmctld asked
        # for it, it is already), so its slurmd's registration counts within ResumeTimeout.
        s = rec.slurm.nodes([name])[name]
        if (s.drain or s.down) and s.reason_is_ours:
            rec.slurm.resume([name])
        rec.slurm.power_up([name])
    return Go("emptied", "no pods left; will boot the slurm image",
              {"desired_role": SLURM, "power_at": None, "k8s_boot_id": k.boot_id if k is not None else None})


def waiting_for(st: NodeState) -> str:
    """What a reclaim that waits for its jobs (states.WAIT) waits for: the decision's own words
    (policy.reclaim_work), kept in the switch's reason; `provisioner nodes` shows them too."""
    reason = st.switch_reason or ""
    at = reason.rfind("waiting for ")
    words = reason[at:] if at >= 0 else "waiting for its jobs to end"
    return f"{words}; their time limit {stamp(st.reclaim_deadline)}" if st.reclaim_deadline else words


def _move_work(rec: Reconciler, st: NodeState, report: PassReport):
    """A reclaim's work: left running until its grace deadline (the node takes no new work; a
    Wait), then moved by st.reclaim_work (requeue its jobs, evict its pods) and recorded in the
    pass report and the history (`requeued`, `evicted`). Returns the adapter's result."""
    from provisioner.reconcile import Step

    requeue = st.reclaim_work == REQUEUE
    if st.reclaim_deadline is not None and rec.clock() < st.reclaim_deadline:
        why = f"reclaim: its {'jobs' if requeue else 'pods'} run until the end of the grace at {stamp(st.reclaim_deadline)}"
        return Wait(why, note=why)
    res = rec.slurm.requeue_jobs_on(st.name) if requeue else rec.kube.evict_pods(st.name)
    kind, noun, moved = ("requeued", "job", res.requeued) if requeue else ("evicted", "pod", res.evicted)
    if moved:
        what = f"{kind} {noun}(s) {', '.join(moved)}: their grace ended at {stamp(st.reclaim_deadline)}"
        report.steps.append(Step(st.name, kind, what))
        rec.store.add_event(st.name, rec.actor, kind, what, {f"{noun}s": list(moved)})
    return res


def _requeue(rec: Reconciler, st: NodeState, report: PassReport) -> Wait:
    """A reclaimed SLURM node past its grace: its jobs that can be requeued are requeued (back to
    the queue with their priority, to start elsewhere); the others run to their end or time
    limit, and the drain waits for them (a reclaim's draining has no timeout: states.RECLAIM_TIMEOUTS)."""
    res = _move_work(rec, st, report)
    if isinstance(res, Wait):
        return res
    if res.kept:
        kept = "; ".join(f"job {j}: {why}" for j, why in res.kept)
        return Wait(f"reclaim: waiting for jobs that cannot be requeued to end ({kept})",
                    note=f"waiting for jobs that cannot be requeued to end ({kept})")
    return Wait("requeued jobs still ending" if res.remaining else "jobs ended")


def _evict(rec: Reconciler, st: NodeState, report: PassReport) -> Go | Wait | None:
    """A reclaimed Kubernetes node past its grace: its pods are evicted through the Eviction API.
    A PodDisruptionBudget that still refuses phase_timeout_s after the deadline rolls the switch
    back (our cordon lifted, the node stays in Kubernetes) and its refusal is recorded on the
    node, so that decide() holds it for cooldown_s. None: the node is free."""
    res = _move_work(rec, st, report)
    if isinstance(res, Wait):
        return res
    if res.free:
        return None
    if not res.blocked:
        return Wait(f"evicted pods still terminating ({', '.join(res.remaining)})")
    refused = "; ".join(f"{p}: {why}" for p, why in res.blocked)
    now = rec.clock()
    if now - (st.reclaim_deadline or now) > rec.policy.phase_timeout_s:
        return Go("rollback", f"a PodDisruptionBudget kept refusing the eviction for "
                              f"{int(now - st.reclaim_deadline)} s after the grace ({refused}); held in Kubernetes for "
                              f"cooldown_s={rec.policy.cooldown_s} s",
                  {"evict_refused_at": now, "evict_refused": refused}, ok=False,
                  data={"held": "pod-disruption-budget", "refused": refused})
    return Wait(f"a PodDisruptionBudget refuses the eviction ({refused})",
                note=f"a PodDisruptionBudget refuses the eviction ({refused}); tried again next pass")


def on_rebooting(rec: Reconciler, st: NodeState, report: PassReport) -> Go | Wait:
    name, to = st.name, st.target_role
    if st.power_at is not None and st.power_at >= (st.phase_since or 0):
        # A power action was on its way when the pass that sent it stopped, before recording
        # it. Powering the node again would interrupt its boot (or its new kubelet's first
        # pods): wait for this boot instead; if it never comes, BOOTING's timeout retries.
        return Go("power", f"a power action was sent at {stamp(st.power_at)} by a pass that stopped before "
                           "recording it; waiting for that boot", {"phase_since": st.power_at})
    if to == K8S:  # before the re-check: signing may take seconds, the re-check must be last
        _kubelet_certificate(rec, st)
    # Re-check both clusters right before the power action: a job or a pod that arrived
    # since the last look (an admin resume, a pod bound by nodeName) stops the reboot.
    s = rec.slurm.nodes([name])[name]
    k = rec.kube.node(name)
    holders = []
    if s.runs_jobs:
        holders.append(f"SLURM shows jobs on it ({s.state})")
    if k is not None and k.busy:
        holders.append(f"Kubernetes shows pods on it ({', '.join(p.key for p in k.pods)})")
    if holders:
        proof = serving(st, s, k, st.power_at)
        if proof:
            # After a retry: the node this switch powered already runs the target's work (its
            # boot callback was lost). Rebooting it would kill that work; going back a step
            # would loop (rebooting, cordoning, rebooting, ...). It has joined.
            return Go("serving", f"{proof}, and runs work there: {'; '.join(holders)}",
                      {"phase_since": st.power_at})
        return Go("refused", "; ".join(holders), {"desired_role": other(to)})
    crash_point("before-power")
    # Taken before the action: a fast node may call back before this pass records BOOTING.
    # Written before it too: a pass that dies between the action and its record must not
    # make the next one power the node again (see the top of this function).
    powered_at = rec.clock()
    if not fire(rec, st, Go("power-intent", f"powering {name} to boot the {to} image", {"power_at": powered_at}),
                report):
        return Wait("the power intent could not be written")
    seen = replace(st, power_at=powered_at)
    result = rec.power(rec.site, [rec.site.nodes[name]], "boot", netboot=True, store=rec.store, actor=rec.actor,
                       roles={name: to})[0]
    crash_point("after-power")
    if not result.ok:
        attempts = st.attempts + 1
        if attempts > rec.policy.max_retries:
            return Go("fail", f"power action failed {attempts} times: {result.error}", seen=seen)
        # The action is known to have failed: clear its intent, or the next pass would wait
        # for a boot that was never started instead of trying the power action again.
        return Go("power-failed", f"power failed ({result.error}); attempt {attempts} of {rec.policy.max_retries + 1}",
                  {"attempts": attempts, "power_at": None}, ok=False, seen=seen, brief=f"failed: {result.error}")
    return Go("power", f"power {result.method} boot with one-time network boot",
              {"phase_since": powered_at, "k8s_boot_id": k.boot_id if k is not None else None}, seen=seen)


def _kubelet_certificate(rec: Reconciler, st: NodeState) -> None:
    """Before powering a node into Kubernetes: its kubelet's client certificate (kubelet_certs),
    which its overlay then carries, so it joins without TLS bootstrap. Never in the way of the
    switch: a failure is one log line and an event, and the node bootstraps as before."""
    from provisioner import kubelet_certs
    from provisioner.errors import OperationError

    if not rec.site.kubernetes.kubelet_certificates:
        return
    try:
        out = kubelet_certs.ensure(rec.site, rec.kube, st.name)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the node still boots (and bootstraps)
        why = str(exc) if isinstance(exc, OperationError) else f"{type(exc).__name__}: {exc}"
        msg = f"no kubelet client certificate before the reboot, its kubelet joins by TLS bootstrap: {why}"
        log.warning("node %s: %s", st.name, msg)
        rec.store.add_event(st.name, rec.actor, "kubelet-cert-fallback", msg)
        return
    if out.issued:
        rec.store.add_event(st.name, rec.actor, "kubelet-cert", out.message, {"not_after": out.not_after.isoformat()})


def serving(st: NodeState, s, k, powered_at: float | None) -> str | None:
    """Proof that the node serves the switch's target role since the power action at
    `powered_at` (None: no power action in this switch, no proof): a slurmd started since then
    that SLURM hears from, or a Ready kubelet with another bootID than before the reboot."""
    if powered_at is None:
        return None
    if st.target_role == SLURM:
        if s.responding and s.slurmd_start_time is not None and s.slurmd_start_time >= int(powered_at) - CLOCK_SLACK_S:
            return "a slurmd started since the power action is registered"
        return None
    if k is not None and k.ready and st.k8s_boot_id and k.boot_id != st.k8s_boot_id:
        return "its kubelet is Ready with a new bootID"
    return None


def on_booting(rec: Reconciler, st: NodeState, report: PassReport) -> Go | Wait:
    to = st.target_role
    if st.booted_role == to and st.booted_at and st.booted_at >= (st.phase_since or 0) - HOST_CLOCK_SKEW_S:
        return Go("booted", f"booted the {to} image (version {st.booted_version})", {"phase_since": st.phase_since})
    s = rec.slurm.nodes([st.name])[st.name] if to == SLURM else None
    k = rec.kube.node(st.name) if to == K8S else None
    proof = serving(st, s, k, st.phase_since)
    if proof:
        return Go("booted", f"{proof}; its boot callback did not come", {"phase_since": st.phase_since})
    return Wait(f"no boot callback from the {to} image")


def on_joining(rec: Reconciler, st: NodeState, report: PassReport) -> Go | Wait:
    return _joined_slurm(rec, st, report) if st.target_role == SLURM else _joined_k8s(rec, st, report)


def _joined_slurm(rec: Reconciler, st: NodeState, report: PassReport) -> Go | Wait:
    from provisioner.reconcile import Step

    name = st.name
    s = rec.slurm.nodes([name])[name]
    # SLURM notices a slurmd that went away only after SlurmdTimeout (300 s by default):
    # until then the old one still "responds". Only a slurmd started since the reboot
    # proves that the new image joined.
    if not serving(st, s, None, st.phase_since):
        return Wait("slurmd has not registered")
    if s.held_by_other:
        return Go("fail", f"joined SLURM but someone else holds it ({s.reason})")
    if s.drain or s.down:
        s = rec.slurm.resume([name])[name]
        report.steps.append(Step(name, "resumed", "slurmd registered; resumed in SLURM"))
    if not s.available:
        # Right after a resume slurmctld pings the node (NOT_RESPONDING for a moment):
        # done once SLURM would give it a job, on this pass or the next. Never rebooted for
        # that: its slurmd is this boot's, and SLURM may give it a job any moment now.
        return Wait(f"SLURM does not show it available yet ({s.state}"
                    f"{'+' + '+'.join(sorted(s.flags)) if s.flags else ''}); its slurmd is registered",
                    on_timeout="joined")
    if rec.kube.node(name):
        rec.kube.label(name, SLURM)
    crash_point("after-join-steps")
    return Go("joined", "available in SLURM, labelled sched=slurm")


def _joined_k8s(rec: Reconciler, st: NodeState, report: PassReport) -> Go | Wait:
    name = st.name
    k = rec.kube.node(name)
    if k is None or not k.ready:
        return Wait("kubelet is not Ready")
    if st.k8s_boot_id and k.boot_id == st.k8s_boot_id:
        # Ready, but from the boot before the reboot: the control plane notices a silent
        # kubelet only after its grace period (40 s by default).
        return Wait(f"the Node still shows the boot from before the reboot (bootID {st.k8s_boot_id[:8]}...); "
                    "its kubelet has not re-registered")
    rec.kube.label(name, K8S)
    note = "labelled sched=k8s"
    if k.cordoned_by_us:
        rec.kube.uncordon(name)
        note += ", uncordoned"
    elif k.cordoned_by_other:
        note += "; left cordoned: that cordon is someone else's"
    crash_point("after-join-steps")
    return Go("joined", f"Ready in Kubernetes, {note}")


# The handler of each switching phase (states.SWITCHING).
HANDLERS = {
    REQUESTED: on_requested,
    DRAINING: on_draining,
    CORDONING: on_cordoning,
    REBOOTING: on_rebooting,
    BOOTING: on_booting,
    JOINING: on_joining,
}
