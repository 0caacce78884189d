"""The switch state machine, one row per transition (and per branch that only a long integration
run would reach), against in-process fakes of the two clusters and of power (tests/fakes.py):
milliseconds each, so `make test-fast` covers every step. The same steps run against the real
daemons in test_balance_*.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest

from provisioner import config
from provisioner.reconcile import PassReport, Reconciler
from provisioner.states import (BOOTING, CORDONING, DRAINING, FAILED, JOINING, K8S, PHASES, REBOOTING, REQUESTED,
                                SLURM, STEADY, SWITCHING, TIMEOUTS, TRANSITIONS, IllegalTransition, lookup, other,
                                transition)
from provisioner.store import Store
from tests.fakes import OURS, FakeKube, FakePower, FakeSlurm, kube_node, slurm_node
from testbed.site import write_site

NOW = 1_800_000_000.0
TIMEOUT = 20  # policy.phase_timeout_s of the test site
LATE = TIMEOUT + 1


@dataclass
class Case:
    id: str
    phase: str
    to: str
    then: str  # the phase after one step
    step: str | None = None  # the action of the step the report shows last (None: no step)
    age: float = 0  # seconds since the phase began
    state: dict = field(default_factory=dict)  # more NodeState fields
    slurm: dict = field(default_factory=dict)  # SlurmNode fields of sn01
    kube: dict | None = field(default_factory=dict)  # KubeNode fields of sn01; None: no Node object
    power_ok: bool = True
    evictable: bool = True
    resume_pings: bool = False  # slurmctld pings a resumed node first (not responding for a moment)
    check: Callable | None = None  # check(state_after, report, slurm, kube, power)
    slurm_refuses: dict = field(default_factory=dict)  # FakeSlurm.refuse
    kube_refuses: dict = field(default_factory=dict)  # FakeKube.refuse


def forced(**more) -> dict:
    return {"pinned": 1, "switch_actor": "admin", **more}


def calls(fake, kind: str) -> list:
    return [c for c in fake.calls if c[0] == kind]


CASES = [
    # requested
    Case("requested-to-k8s-drains", REQUESTED, K8S, DRAINING, "draining",
         check=lambda st, r, s, k, p: calls(s, "drain") and s.state["sn01"].drain),
    Case("requested-to-slurm-cordons", REQUESTED, SLURM, CORDONING, "cordoning",
         check=lambda st, r, s, k, p: k.state["sn01"].cordoned_by_us),
    Case("requested-to-slurm-without-a-node-object", REQUESTED, SLURM, CORDONING, "cordoning", kube=None,
         check=lambda st, r, s, k, p: not k.calls),
    Case("requested-to-slurm-someone-elses-cordon-stays-theirs", REQUESTED, SLURM, CORDONING, "cordoning",
         kube={"unschedulable": True},
         check=lambda st, r, s, k, p: "someone else" in r.steps[-1].message and not k.state["sn01"].cordoned_by_us),
    Case("requested-to-k8s-someone-elses-drain-balancer-rolls-back", REQUESTED, K8S, STEADY, "rollback",
         slurm={"flags": frozenset({"drain"}), "reason": "bad DIMM", "reason_is_ours": False},
         check=lambda st, r, s, k, p: not calls(s, "drain") and not calls(s, "resume")),
    Case("requested-to-k8s-someone-elses-drain-admin-waits", REQUESTED, K8S, REQUESTED, None, age=5, state=forced(),
         slurm={"flags": frozenset({"drain"}), "reason": "bad DIMM", "reason_is_ours": False}),
    Case("requested-to-k8s-someone-elses-drain-admin-fails-past-the-timeout", REQUESTED, K8S, FAILED, "failed",
         age=LATE, state=forced(), slurm={"flags": frozenset({"drain"}), "reason": "bad DIMM", "reason_is_ours": False},
         check=lambda st, r, s, k, p: "bad DIMM" in st.failed_reason and not calls(s, "resume")),
    Case("requested-to-slurm-cordon-refused-waits", REQUESTED, SLURM, REQUESTED, "requested", age=5,
         kube_refuses={"cordon": "admission webhook denied the request"},
         check=lambda st, r, s, k, p: not r.steps[-1].ok and "webhook" in r.steps[-1].message),
    Case("requested-to-slurm-cordon-refused-past-the-timeout-rolls-back", REQUESTED, SLURM, STEADY, "rollback",
         age=LATE, kube_refuses={"cordon": "admission webhook denied the request"},
         check=lambda st, r, s, k, p: st.desired_role == K8S and st.target_role is None),
    Case("requested-to-slurm-cordon-refused-admin-fails-past-the-timeout", REQUESTED, SLURM, FAILED, "failed",
         age=LATE, state=forced(), kube_refuses={"cordon": "forbidden: RBAC"},
         check=lambda st, r, s, k, p: "RBAC" in st.failed_reason),
    # draining
    Case("draining-drained-goes-down-and-reboots", DRAINING, K8S, REBOOTING, "rebooting",
         slurm={"flags": frozenset({"drain"}), "reason": OURS, "reason_is_ours": True},
         kube={"boot_id": "old-boot"},
         check=lambda st, r, s, k, p: calls(s, "down") and st.desired_role == K8S and st.k8s_boot_id == "old-boot"),
    Case("draining-jobs-run-waits", DRAINING, K8S, DRAINING, None, age=5,
         slurm={"state": "allocated", "alloc_cpus": 2, "flags": frozenset({"drain"}), "reason": OURS,
                "reason_is_ours": True}),
    Case("draining-jobs-outlast-the-timeout-balancer-rolls-back", DRAINING, K8S, STEADY, "rollback", age=LATE,
         slurm={"state": "allocated", "alloc_cpus": 2, "flags": frozenset({"drain"}), "reason": OURS,
                "reason_is_ours": True},
         check=lambda st, r, s, k, p: calls(s, "resume") and st.desired_role == SLURM),
    Case("draining-forced-waits-for-jobs-however-long", DRAINING, K8S, DRAINING, None, age=LATE, state=forced(),
         slurm={"state": "allocated", "alloc_cpus": 2, "flags": frozenset({"drain"}), "reason": OURS,
                "reason_is_ours": True},
         check=lambda st, r, s, k, p: any("still draining" in n for n in r.notes)),
    Case("draining-lifted-by-someone-else", DRAINING, K8S, STEADY, "rollback",
         check=lambda st, r, s, k, p: "lifted by someone else" in r.steps[-1].message and not calls(s, "resume")),
    Case("draining-someone-elses-hold-hands-off", DRAINING, K8S, STEADY, "rollback",
         slurm={"flags": frozenset({"drain"}), "reason": "bad DIMM", "reason_is_ours": False},
         check=lambda st, r, s, k, p: "hands off" in r.steps[-1].message and not calls(s, "resume")),
    # cordoning
    Case("cordoning-empty-reboots", CORDONING, SLURM, REBOOTING, "rebooting",
         kube={"unschedulable": True, "cordoned_by_us": True},
         check=lambda st, r, s, k, p: st.desired_role == SLURM and st.k8s_boot_id == "boot-1"),
    Case("cordoning-pods-appeared-balancer-rolls-back", CORDONING, SLURM, STEADY, "rollback",
         kube={"unschedulable": True, "cordoned_by_us": True, "pods": ("web-1",)},
         check=lambda st, r, s, k, p: calls(k, "uncordon") and not calls(k, "evict")),
    Case("cordoning-forced-evicts-and-reboots", CORDONING, SLURM, REBOOTING, "rebooting", state=forced(),
         kube={"unschedulable": True, "cordoned_by_us": True, "pods": ("web-1",)},
         check=lambda st, r, s, k, p: calls(k, "evict")),
    Case("cordoning-forced-pdb-blocks-waits", CORDONING, SLURM, CORDONING, None, age=5, state=forced(),
         evictable=False, kube={"unschedulable": True, "cordoned_by_us": True, "pods": ("db-0",)},
         check=lambda st, r, s, k, p: any("waiting for pods to leave" in n for n in r.notes)),
    Case("cordoning-forced-pdb-blocks-past-the-timeout-fails", CORDONING, SLURM, FAILED, "failed", age=LATE,
         state=forced(), evictable=False, kube={"unschedulable": True, "cordoned_by_us": True, "pods": ("db-0",)},
         check=lambda st, r, s, k, p: "could not be evicted" in st.failed_reason and "disruption budget" in
         st.failed_reason),
    # rebooting
    Case("rebooting-powers-and-waits-for-the-boot", REBOOTING, K8S, BOOTING, "booting",
         slurm={"state": "down", "reason": "k8s_connect", "reason_is_ours": True},
         check=lambda st, r, s, k, p: p.calls == [("boot", ("sn01",), True)] and st.power_at == NOW
         and st.phase_since == NOW),
    Case("rebooting-refused-jobs-appeared", REBOOTING, K8S, DRAINING, "reboot-refused",
         slurm={"state": "allocated", "alloc_cpus": 1},
         check=lambda st, r, s, k, p: not p.calls and st.desired_role == SLURM),
    Case("rebooting-refused-pods-appeared", REBOOTING, SLURM, CORDONING, "reboot-refused",
         kube={"unschedulable": True, "cordoned_by_us": True, "pods": ("late-0",)},
         check=lambda st, r, s, k, p: not p.calls and st.desired_role == K8S),
    Case("rebooting-power-fails-counts-an-attempt", REBOOTING, K8S, REBOOTING, "power", power_ok=False,
         slurm={"state": "down"},
         check=lambda st, r, s, k, p: st.attempts == 1 and not r.steps[-1].ok and st.power_at is None),
    Case("rebooting-power-fails-past-max-retries", REBOOTING, K8S, FAILED, "failed", power_ok=False,
         state={"attempts": 1}, slurm={"state": "down"},
         check=lambda st, r, s, k, p: "power action failed 2 times" in st.failed_reason),
    Case("rebooting-after-a-pass-died-past-its-power-action", REBOOTING, K8S, BOOTING, "booting", age=30,
         state={"power_at": NOW - 10}, slurm={"state": "down"},
         check=lambda st, r, s, k, p: not p.calls and st.phase_since == NOW - 10),
    Case("rebooting-to-slurm-powers", REBOOTING, SLURM, BOOTING, "booting",
         kube={"unschedulable": True, "cordoned_by_us": True}, check=lambda st, r, s, k, p: len(p.calls) == 1),
    Case("rebooting-to-slurm-power-fails-counts-an-attempt", REBOOTING, SLURM, REBOOTING, "power", power_ok=False,
         kube={"unschedulable": True, "cordoned_by_us": True}, check=lambda st, r, s, k, p: st.attempts == 1),
    Case("rebooting-to-slurm-power-fails-past-max-retries", REBOOTING, SLURM, FAILED, "failed", power_ok=False,
         state={"attempts": 1}, kube={"unschedulable": True, "cordoned_by_us": True}),
    Case("rebooting-cannot-even-ask-slurm-past-the-timeout-fails", REBOOTING, K8S, FAILED, "failed", age=LATE,
         slurm_refuses={"nodes": "Unable to contact slurm controller"},
         check=lambda st, r, s, k, p: not p.calls and "slurm controller" in st.failed_reason),
    # After a retry (the boot callback lost), the node this switch powered already runs the
    # target side's work: it has joined; neither a reboot nor the loop back to cordoning.
    Case("rebooting-to-slurm-after-a-retry-the-node-runs-its-job-it-serves", REBOOTING, SLURM, JOINING, "joining",
         age=5, state={"attempts": 1, "power_at": NOW - 100},
         slurm={"state": "allocated", "alloc_cpus": 2, "slurmd_start_time": NOW - 90},
         check=lambda st, r, s, k, p: not p.calls and st.desired_role == SLURM and st.phase_since == NOW - 100),
    Case("rebooting-to-k8s-after-a-retry-pods-on-the-new-node-it-serves", REBOOTING, K8S, JOINING, "joining",
         age=5, state={"attempts": 1, "power_at": NOW - 100, "k8s_boot_id": "old-boot"},
         slurm={"state": "down", "reason": "k8s_connect", "reason_is_ours": True},
         kube={"boot_id": "new-boot", "pods": ("web-0",)},
         check=lambda st, r, s, k, p: not p.calls and st.desired_role == K8S),
    Case("rebooting-to-k8s-pods-on-the-old-boot-are-refused", REBOOTING, K8S, DRAINING, "reboot-refused",
         age=5, state={"attempts": 1, "power_at": NOW - 100, "k8s_boot_id": "old-boot"},
         slurm={"state": "down", "reason": "k8s_connect", "reason_is_ours": True},
         kube={"boot_id": "old-boot", "pods": ("web-0",)}, check=lambda st, r, s, k, p: not p.calls),
    # booting
    Case("booting-to-slurm-callback-lost-slurmd-registered", BOOTING, SLURM, JOINING, "joining", age=10,
         slurm={"state": "down", "reason": "k8s_connect", "reason_is_ours": True, "slurmd_start_time": NOW - 5}),
    Case("booting-to-slurm-callback", BOOTING, SLURM, JOINING, "joining", age=10,
         state={"booted_role": SLURM, "booted_at": NOW - 1}),
    Case("booting-to-slurm-wrong-image-called-back-reboots-again", BOOTING, SLURM, REBOOTING, "retry", age=LATE,
         state={"booted_role": K8S, "booted_at": NOW - 1}),
    Case("booting-to-slurm-no-callback-after-the-last-retry-fails", BOOTING, SLURM, FAILED, "failed", age=LATE,
         state={"attempts": 1}),
    Case("booting-callback-of-this-boot", BOOTING, K8S, JOINING, "joining", age=10,
         state={"booted_role": K8S, "booted_at": NOW - 5, "booted_version": "7"},
         check=lambda st, r, s, k, p: st.phase_since == NOW - 10),
    Case("booting-callback-from-before-the-reboot-does-not-count", BOOTING, K8S, BOOTING, None, age=10,
         state={"booted_role": K8S, "booted_at": NOW - 60}),
    Case("booting-no-callback-in-time-reboots-again", BOOTING, K8S, REBOOTING, "retry", age=LATE,
         check=lambda st, r, s, k, p: st.attempts == 1 and st.phase_since == NOW),
    Case("booting-no-callback-after-the-last-retry-fails", BOOTING, K8S, FAILED, "failed", age=LATE,
         state={"attempts": 1}, check=lambda st, r, s, k, p: "no boot callback" in st.failed_reason),
    # joining k8s
    Case("joining-k8s-new-kubelet-ready", JOINING, K8S, STEADY, "done", age=5, state={"k8s_boot_id": "old-boot"},
         kube={"boot_id": "new-boot", "unschedulable": True, "cordoned_by_us": True, "role": "slurm"},
         check=lambda st, r, s, k, p: k.state["sn01"].role == K8S and not k.state["sn01"].unschedulable
         and st.last_switch_at == NOW),
    Case("joining-k8s-ready-from-before-the-reboot-is-not-joined", JOINING, K8S, JOINING, None, age=5,
         state={"k8s_boot_id": "boot-1"}, kube={"boot_id": "boot-1"},
         check=lambda st, r, s, k, p: not calls(k, "label")),
    Case("joining-k8s-someone-elses-cordon-stays", JOINING, K8S, STEADY, "done", age=5,
         kube={"boot_id": "new", "unschedulable": True, "cordoned_by_us": False},
         check=lambda st, r, s, k, p: k.state["sn01"].unschedulable and not calls(k, "uncordon")),
    Case("joining-k8s-not-ready-in-time-reboots-again", JOINING, K8S, REBOOTING, "retry", age=LATE,
         kube={"ready": False}),
    Case("joining-k8s-no-node-after-the-last-retry-fails", JOINING, K8S, FAILED, "failed", age=LATE, kube=None,
         state={"attempts": 1}, check=lambda st, r, s, k, p: "kubelet is not Ready" in st.failed_reason),
    # joining slurm
    Case("joining-slurm-new-slurmd-resumed", JOINING, SLURM, STEADY, "done", age=5,
         slurm={"state": "down", "reason": "k8s_connect", "reason_is_ours": True, "slurmd_start_time": NOW - 2},
         check=lambda st, r, s, k, p: calls(s, "resume") and k.state["sn01"].role == SLURM
         and any(x.action == "resumed" for x in r.steps)),
    Case("joining-slurm-slurmd-from-before-the-reboot-is-not-joined", JOINING, SLURM, JOINING, None, age=5,
         slurm={"state": "down", "reason": "k8s_connect", "reason_is_ours": True,
                "slurmd_start_time": NOW - 3600},
         check=lambda st, r, s, k, p: not calls(s, "resume")),
    Case("joining-slurm-not-registered-in-time-reboots-again", JOINING, SLURM, REBOOTING, "retry", age=LATE,
         slurm={"state": "down", "flags": frozenset({"not_responding"}), "reason": "k8s_connect",
                "reason_is_ours": True}),
    Case("joining-slurm-resumed-but-not-yet-responding-waits", JOINING, SLURM, JOINING, "resumed", age=5,
         resume_pings=True, slurm={"state": "down", "reason": "k8s_connect", "reason_is_ours": True, "slurmd_start_time": NOW - 2}),
    Case("joining-slurm-registered-not-yet-available-past-the-timeout-joins-never-reboots", JOINING, SLURM, STEADY,
         "done", age=LATE, resume_pings=True,
         slurm={"state": "down", "reason": "k8s_connect", "reason_is_ours": True, "slurmd_start_time": NOW - 2},
         check=lambda st, r, s, k, p: not p.calls and "its slurmd is registered" in r.steps[-1].message),
    Case("joining-slurm-held-by-someone-else-fails", JOINING, SLURM, FAILED, "failed", age=5,
         slurm={"state": "down", "reason": "admin: bad fan", "reason_is_ours": False, "slurmd_start_time": NOW - 2},
         check=lambda st, r, s, k, p: "someone else holds it" in st.failed_reason and not calls(s, "resume")),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    path = write_site(tmp_path_factory.mktemp("states") / "site",
                      policy={"phase_timeout_s": TIMEOUT, "max_retries": 1, "cooldown_s": 0})
    return config.load(path)


def run_case(case: Case, site, tmp_path):
    store = Store(str(tmp_path / f"{case.id}.db"))
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    desired = other(case.to) if case.phase in (REQUESTED, DRAINING, CORDONING) else case.to
    store.update("sn01", actor="test", kind="test", message="arranged", phase=case.phase, target_role=case.to,
                 desired_role=desired, phase_since=NOW - case.age, **{"switch_actor": "balancer", **case.state})
    slurm = FakeSlurm(sn01=slurm_node("sn01", **case.slurm))
    kube = FakeKube(**({} if case.kube is None else {"sn01": kube_node("sn01", **case.kube)}))
    kube.evictable = case.evictable
    slurm.refuse, kube.refuse = dict(case.slurm_refuses), dict(case.kube_refuses)
    slurm.resume_leaves_not_responding = case.resume_pings
    power = FakePower(ok=case.power_ok)
    rec = Reconciler(site, store, slurm=slurm, kube=kube, power=power, clock=lambda: NOW)
    report = PassReport(dry_run=False)
    rec._step(store.get("sn01"), report)
    events = [(e.data["from"], e.data["event"], e.data["target"]) for e in store.events(["sn01"])
              if e.data and "event" in e.data]
    return store, report, slurm, kube, power, events


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_transition(case: Case, site, tmp_path):
    store, report, slurm, kube, power, events = run_case(case, site, tmp_path)
    after = store.get("sn01")
    assert after.phase == case.then, (report.steps, report.notes)
    assert (report.steps[-1].action if report.steps else None) == case.step, report.steps
    if case.check:
        assert case.check(after, report, slurm, kube, power), (after, report.steps, report.notes)
    for source, event, direction in events:  # every write is a declared event, logged under its kind
        t = lookup(source, event, direction)
        assert any(e.kind == t.kind for e in store.events(["sn01"]))
    if after.phase != case.phase:
        transition(case.phase, after.phase, case.to)
        assert store.events(["sn01"], limit=1)[-1].kind != "test"
    store.close()


def test_every_declared_transition_has_a_row(site, tmp_path):
    """Every (phase, event, direction) of the table is taken by a row above, or by a named test."""
    covered = set()
    for case in CASES:
        store, *_, events = run_case(case, site, tmp_path)
        covered |= set(events)
        store.close()
    covered |= {(STEADY, "start", r) for r in (SLURM, K8S)} | {(FAILED, "start", r) for r in (SLURM, K8S)}
    # slurmctld gave up: test_a_node_slurm_gave_up_on_is_failed, test_resume_fail_ends_a_switch_in_any_phase
    covered |= {(p, "given-up", SLURM) for p in (STEADY, REQUESTED, CORDONING, REBOOTING, BOOTING, JOINING)}
    # an admin's cancel: test_cancel_*
    covered |= {(p, "cancel", r) for p in (REQUESTED, REBOOTING) for r in (SLURM, K8S)}
    covered |= {(DRAINING, "cancel", K8S), (CORDONING, "cancel", SLURM)}
    declared = {(t.source, t.event, d) for t in TRANSITIONS for d in t.directions}
    assert declared - covered == set()
    assert len(CASES) >= 20


def test_every_switching_phase_has_a_way_out():
    """A timeout for every phase but the final ones, and each declared event of it exists."""
    assert set(TIMEOUTS) == set(SWITCHING)
    for phase, events in TIMEOUTS.items():
        for event in events:
            if event == "retry":
                assert all(lookup(phase, e, r) for e in ("retry", "fail") for r in (SLURM, K8S))
            elif event is not None:
                for r in (SLURM, K8S):
                    if (phase, r) not in ((DRAINING, SLURM), (CORDONING, K8S)):
                        lookup(phase, event, r)


def test_a_switch_starts_from_steady_or_failed_only(site, tmp_path):
    store = Store(str(tmp_path / "state.db"))
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    rec = Reconciler(site, store, slurm=FakeSlurm(), kube=FakeKube(), power=FakePower(), clock=lambda: NOW)
    report = PassReport(dry_run=False)
    assert rec._start("sn01", K8S, "test", actor="balancer", forced=False, report=report)
    assert store.get("sn01").phase == REQUESTED
    assert not rec._start("sn01", K8S, "again", actor="balancer", forced=False, report=report)
    store.update("sn01", actor="test", kind="test", message="", phase=FAILED)
    assert rec._start("sn01", SLURM, "admin", actor="admin", forced=True, report=report)
    assert store.get("sn01").pinned
    store.close()


def test_undeclared_transitions_are_refused():
    with pytest.raises(IllegalTransition, match="booting -> draining"):
        transition(BOOTING, DRAINING, K8S)
    with pytest.raises(IllegalTransition):
        transition(REQUESTED, DRAINING, SLURM)  # draining is the way to k8s only
    with pytest.raises(IllegalTransition):
        transition(STEADY, BOOTING, K8S)
    assert transition(JOINING, STEADY, SLURM).event == "joined"


def test_the_diagram_names_every_phase_and_event():
    import provisioner.states as states

    doc = states.__doc__
    assert all(p in doc for p in PHASES)
    assert all(f" {t.event} " in doc or f"{t.event}:" in doc for t in TRANSITIONS), \
        [t.event for t in TRANSITIONS if f" {t.event} " not in doc and f"{t.event}:" not in doc]


def test_a_failed_power_action_is_tried_again_on_the_next_pass(site, tmp_path):
    # A failed action leaves no intent behind: the next pass powers again instead of waiting
    # for a boot that never started (the CI failure of the silent-BMC test).
    store = Store(str(tmp_path / "state.db"))
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    store.update("sn01", actor="test", kind="test", message="arranged", phase=REBOOTING, target_role=K8S,
                 desired_role=K8S, phase_since=NOW - 5, switch_actor="balancer")
    power = FakePower(ok=False)
    rec = Reconciler(site, store, slurm=FakeSlurm(sn01=slurm_node("sn01", state="down")), kube=FakeKube(),
                     power=power, clock=lambda: NOW)
    rec._step(store.get("sn01"), PassReport(dry_run=False))
    rec._step(store.get("sn01"), PassReport(dry_run=False))
    after = store.get("sn01")
    assert len(power.calls) == 2
    assert after.phase == FAILED and "power action failed 2 times" in after.failed_reason
    store.close()


def test_a_node_slurm_gave_up_on_is_failed(site, tmp_path):
    """slurmctld's ResumeFailProgram: a node it powered up did not register within ResumeTimeout.
    Steady in SLURM (powered on for a job, never came): given-up -> failed; switching to SLURM:
    the switch fails. Either way with the reason, and the ask answered."""
    store = Store(str(tmp_path / "state.db"))
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    shared = [n.name for n in site.nodes.values() if n.shared]
    a, b = shared[0], shared[1]
    store.update(a, actor="test", kind="test", message="arranged", phase=STEADY, desired_role=SLURM)
    store.update(b, actor="test", kind="test", message="arranged", phase=BOOTING, target_role=SLURM,
                 desired_role=SLURM, phase_since=NOW - 5, switch_actor="balancer")
    store.add_asks([a, b], "resume-fail", source="slurmctld", reason="ResumeFailProgram", actor="slurmctld")
    slurm = FakeSlurm(**{n: slurm_node(n, state="down", reason="ResumeTimeout reached", reason_is_ours=False)
                         for n in shared})
    rec = Reconciler(site, store, slurm=slurm, kube=FakeKube(), power=FakePower(), clock=lambda: NOW)
    report = PassReport(dry_run=False)
    rec._given_up(rec.observe(), report)
    for name, phase in ((a, STEADY), (b, BOOTING)):
        st = store.get(name)
        assert st.phase == FAILED and "slurmctld gave up waiting for it" in st.failed_reason, st
        transition(phase, FAILED, SLURM)
    assert store.open_asks() == []
    assert [e.kind for e in store.events([a], kinds=["ask-done"])] == ["ask-done"]
    store.close()


def test_a_refused_resume_holds_the_node_in_slurm_and_powers_it_down(site, tmp_path):
    """The policy refuses slurmctld's ask (the node is pinned to k8s): drained with the reason and
    powered down again in SLURM (the job requeued now), and the refusal in the history."""
    store = Store(str(tmp_path / "state.db"))
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    name = next(n.name for n in site.nodes.values() if n.shared)
    store.update(name, actor="test", kind="test", message="arranged", phase=STEADY, desired_role=K8S, pinned=1)
    store.add_asks([name], "resume", source="slurmctld", reason="ResumeProgram for JobId=9", actor="slurmctld")
    slurm = FakeSlurm(**{n.name: slurm_node(n.name, state="allocated", flags=frozenset({"powering_up"}))
                         for n in site.nodes.values()})
    kube = FakeKube(**{n.name: kube_node(n.name) for n in site.nodes.values() if n.shared})
    rec = Reconciler(site, store, slurm=slurm, kube=kube, power=FakePower(), clock=lambda: NOW)
    report = rec.run_pass()
    assert ("drain", (name,), "resume refused: pinned to k8s by an admin") in slurm.calls
    assert ("power_down", (name,)) in slurm.calls
    refused = store.events([name], kinds=["ask-refused"])
    assert refused and "pinned to k8s by an admin" in refused[-1].message
    assert store.get(name).desired_role == K8S and store.open_asks() == []
    assert any(s.action == "ask-refused" for s in report.steps)
    store.close()


def test_the_documented_table_is_the_table():
    """docs/switching.md holds the table as `python -m provisioner.states` prints it."""
    import re
    from pathlib import Path

    from provisioner.states import table_text

    doc = (Path(__file__).resolve().parent.parent / "docs" / "switching.md").read_text()
    found = re.search(r"<!-- table: .*?-->\n(.*)<!-- end of table -->", doc, re.S)
    assert found and found.group(1) == table_text(), "regenerate the table: python -m provisioner.states"
