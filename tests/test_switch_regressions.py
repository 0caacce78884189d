"""Switches that used to never end, kept as regressions, on in-process fakes (tests/fakes.py):
slurmctld giving up on a switch stuck in `requested`, the rebooting -> cordoning -> rebooting loop
of a node that already runs its job, an admin who could not cancel, a resume ask granted before
its node was powered, and a pass that lost its lock but went on writing."""

from __future__ import annotations

import pytest

from provisioner import cli, config
from provisioner.reconcile import PassReport, Reconciler
from provisioner.states import (BOOTING, CORDONING, DRAINING, FAILED, JOINING, K8S, REBOOTING, REQUESTED, SLURM,
                                STEADY)
from provisioner.store import Store
from provisioner.switch.locks import LockLost, holding
from tests.fakes import OURS, FakeKube, FakePower, FakeSlurm, kube_node, slurm_node
from testbed.site import write_site

NOW = 1_800_000_000.0
TIMEOUT = 20
SHARED = ("sn01", "sn02", "sn03", "sn04")


class Clock:
    def __init__(self):
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def make_site(tmp_path, power_saving: bool = False):
    return config.load(write_site(tmp_path / "site", policy={"phase_timeout_s": TIMEOUT, "max_retries": 1,
                                                             "cooldown_s": 0},
                                  slurm={"power_saving": power_saving}))


@pytest.fixture
def world(tmp_path):
    site = make_site(tmp_path)
    store = Store(site.store)
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    slurm = FakeSlurm(**{n.name: slurm_node(n.name) for n in site.nodes.values()})
    kube = FakeKube(**{n: kube_node(n, role=None) for n in SHARED})
    clock = Clock()
    rec = Reconciler(site, store, slurm=slurm, kube=kube, power=FakePower(), clock=clock)
    yield site, store, slurm, kube, rec, clock
    store.close()


def arrange(store, name, **fields):
    store.update(name, actor="test", kind="test", message="arranged", **fields)


# --------------------------------------------------------------------------- slurmctld gives up


def test_resume_fail_on_a_switch_stuck_in_requested_ends_it_and_later_passes_run(world):
    """The cordon keeps failing (a webhook); slurmctld's ResumeFailProgram: the switch fails with
    the reason, the ask is answered, and every later pass runs (also once the cordon works)."""
    site, store, slurm, kube, rec, clock = world
    kube.state["sn01"] = kube_node("sn01", role=K8S)
    arrange(store, "sn01", phase=REQUESTED, target_role=SLURM, desired_role=K8S, phase_since=NOW - 5,
            switch_actor="balancer")
    kube.refuse["cordon"] = "admission webhook 'policy' denied the request"
    rec.run_pass(balance=False)
    assert store.get("sn01").phase == REQUESTED
    store.add_asks(["sn01"], "resume-fail", source="slurmctld", reason="ResumeFailProgram", actor="slurmctld")
    report = rec.run_pass(balance=False)
    st = store.get("sn01")
    assert st.phase == FAILED and "slurmctld gave up" in st.failed_reason and "requested" in st.failed_reason
    assert store.open_asks() == [] and not report.errors
    del kube.refuse["cordon"]
    clock.now += 60
    assert rec.run_pass().errors == []


@pytest.mark.parametrize("phase", [REQUESTED, CORDONING, REBOOTING, BOOTING, JOINING])
def test_resume_fail_ends_a_switch_to_slurm_in_any_phase(world, phase):
    site, store, slurm, kube, rec, clock = world
    arrange(store, "sn01", phase=phase, target_role=SLURM, desired_role=SLURM, phase_since=NOW - 5,
            switch_actor="balancer")
    store.add_asks(["sn01"], "resume", source="slurmctld", reason="JobId=3", actor="slurmctld")
    store.add_asks(["sn01"], "resume-fail", source="slurmctld", reason="ResumeFailProgram", actor="slurmctld")
    report = PassReport(dry_run=False)
    rec._given_up(rec.observe(), report)
    assert store.get("sn01").phase == FAILED
    outcomes = sorted(e.kind for e in store.events(["sn01"], kinds=["ask-done", "ask-failed"]))
    assert outcomes == ["ask-done", "ask-failed"] and store.open_asks() == []


def test_resume_fail_for_a_node_not_waited_for_is_answered(world):
    site, store, slurm, kube, rec, clock = world
    arrange(store, "sn02", phase=DRAINING, target_role=K8S, desired_role=SLURM, phase_since=NOW)
    slurm.set("sn02", state="allocated", alloc_cpus=1, flags=frozenset({"drain"}), reason=OURS, reason_is_ours=True)
    store.add_asks(["sn02", "cn01"], "resume-fail", source="slurmctld", reason="ResumeFailProgram",
                   actor="slurmctld")
    report = rec.run_pass(balance=False)
    assert store.open_asks() == [] and not report.errors
    assert store.get("sn02").phase == DRAINING


# --------------------------------------------------------------------------- the loop


def _lost_callback_switch(store, slurm, kube, to):
    """A switch whose boot callback was lost: its first boot timed out and it is about to be
    rebooted again, while the node already serves the target role and runs work there."""
    arrange(store, "sn01", phase=REBOOTING, target_role=to, desired_role=to, phase_since=NOW - 1, attempts=1,
            power_at=NOW - TIMEOUT - 5, k8s_boot_id="old-boot", switch_actor="balancer")
    if to == SLURM:
        slurm.set("sn01", state="allocated", alloc_cpus=2, slurmd_start_time=NOW - TIMEOUT)
        kube.set("sn01", ready=False, unschedulable=True, cordoned_by_us=True, boot_id="old-boot")
    else:
        slurm.set("sn01", state="down", reason=OURS, reason_is_ours=True)
        kube.state["sn01"] = kube_node("sn01", boot_id="new-boot", pods=("web-0",))


@pytest.mark.parametrize("to", [SLURM, K8S])
def test_a_node_already_running_its_work_after_a_lost_callback_joins_instead_of_looping(world, to):
    site, store, slurm, kube, rec, clock = world
    _lost_callback_switch(store, slurm, kube, to)
    power = rec.power
    for _ in range(3):
        rec.run_pass(balance=False)
        clock.now += 5
    st = store.get("sn01")
    assert st.phase == STEADY and st.desired_role == to, st
    assert power.calls == []  # never rebooted under its work
    kinds = [e.kind for e in store.events(["sn01"]) if e.kind != "test"]
    assert "reboot-refused" not in kinds and kinds.count("switched") == 1, kinds


# --------------------------------------------------------------------------- cancel


@pytest.mark.parametrize("to,phase", [(K8S, REQUESTED), (SLURM, REQUESTED), (K8S, DRAINING), (SLURM, CORDONING),
                                      (K8S, REBOOTING), (SLURM, REBOOTING)])
def test_cancel_before_power_lifts_only_our_own_holds(world, to, phase):
    site, store, slurm, kube, rec, clock = world
    kube.state["sn01"] = kube_node("sn01", role=K8S if to == SLURM else SLURM)
    arrange(store, "sn01", phase=phase, target_role=to, desired_role=K8S if to == SLURM else SLURM,
            phase_since=NOW - 5, pinned=1, switch_actor="admin:x")
    if to == K8S and phase != REQUESTED:
        slurm.set("sn01", flags=frozenset({"drain"}), reason=OURS, reason_is_ours=True)
    if to == SLURM and phase != REQUESTED:
        kube.set("sn01", unschedulable=True, cordoned_by_us=True)
    res = rec.cancel(["sn01", "sn02"], actor="admin:x", reason="changed my mind")
    assert (res.cancelled, res.idle, res.refused, res.ok) == (["sn01"], ["sn02"], {}, True)
    st = store.get("sn01")
    assert (st.phase, st.target_role, st.pinned) == (STEADY, None, False)
    assert st.desired_role == (K8S if to == SLURM else SLURM)
    assert not slurm.state["sn01"].drain and not kube.state["sn01"].unschedulable
    assert [e.kind for e in store.events(["sn01"], kinds=["rollback"])] == ["rollback"]
    assert "cancelled" in store.events(["sn01"], kinds=["rollback"])[-1].message


def test_cancel_leaves_someone_elses_drain_and_cordon(world):
    site, store, slurm, kube, rec, clock = world
    arrange(store, "sn01", phase=REQUESTED, target_role=K8S, desired_role=SLURM, phase_since=NOW - 5, pinned=1,
            switch_actor="admin:x")
    slurm.set("sn01", flags=frozenset({"drain"}), reason="bad DIMM", reason_is_ours=False)
    arrange(store, "sn02", phase=CORDONING, target_role=SLURM, desired_role=K8S, phase_since=NOW - 5)
    kube.set("sn02", unschedulable=True, cordoned_by_us=False)
    res = rec.cancel(["sn01", "sn02"], actor="admin:x", reason="no")
    assert res.cancelled == ["sn01", "sn02"]
    assert slurm.state["sn01"].drain and slurm.state["sn01"].reason == "bad DIMM"
    assert kube.state["sn02"].unschedulable and ("uncordon", "sn02") not in kube.calls


@pytest.mark.parametrize("phase,power_at", [(REBOOTING, NOW - 1), (BOOTING, NOW - 5), (JOINING, NOW - 5)])
def test_cancel_after_power_says_what_happens_instead(world, phase, power_at):
    site, store, slurm, kube, rec, clock = world
    arrange(store, "sn01", phase=phase, target_role=K8S, desired_role=K8S, phase_since=NOW - 5, power_at=power_at)
    res = rec.cancel(["sn01"], actor="admin:x", reason="too late")
    assert not res.ok and res.cancelled == []
    why = res.refused["sn01"]
    assert "not cancelled" in why and "rebooted again" in why and "provisioner role sn01 slurm" in why
    assert store.get("sn01").phase == phase


def test_cli_role_cancel_exit_codes(world, capsys, monkeypatch):
    site, store, slurm, kube, rec, clock = world
    monkeypatch.setattr(cli, "_reconciler", lambda ctx: rec)
    conf = str(site.path)
    assert cli.main(["--config", conf, "role", "sn01", "k8s", "--reason", "maint"]) == 0
    assert cli.main(["--config", conf, "role", "sn[01-02]", "--cancel", "--reason", "oops"]) == 0
    out = capsys.readouterr().out
    assert "sn01: switch cancelled" in out and "sn02: not switching: nothing to cancel" in out
    arrange(store, "sn03", phase=BOOTING, target_role=K8S, desired_role=K8S, phase_since=NOW, power_at=NOW)
    assert cli.main(["--config", conf, "role", "sn03", "--cancel", "--reason", "late"]) == 1
    assert "not cancelled" in capsys.readouterr().out
    assert cli.main(["--config", conf, "role", "sn03", "--reason", "no role"]) == 2


def test_an_admins_switch_on_a_node_someone_else_drained_ends(world):
    """`provisioner role k8s sn01` on a node someone else drained: it waits its timeout, then
    fails with the reason; the admin can cancel it before that."""
    site, store, slurm, kube, rec, clock = world
    slurm.set("sn01", flags=frozenset({"drain"}), reason="bad DIMM", reason_is_ours=False)
    rec.change_role(["sn01"], K8S, actor="admin:x", reason="maint")
    rec.run_pass(balance=False)
    assert store.get("sn01").phase == REQUESTED
    clock.now += TIMEOUT + 1
    rec.run_pass(balance=False)
    st = store.get("sn01")
    assert st.phase == FAILED and "bad DIMM" in st.failed_reason
    assert slurm.state["sn01"].reason == "bad DIMM"


# --------------------------------------------------------------------------- asks on facts


@pytest.fixture
def ps_world(tmp_path):
    site = make_site(tmp_path, power_saving=True)
    store = Store(site.store)
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    slurm = FakeSlurm(**{n.name: slurm_node(n.name) for n in site.nodes.values()})
    kube = FakeKube(**{n: kube_node(n, role=None) for n in SHARED})
    power = FakePower(ok=False)
    rec = Reconciler(site, store, slurm=slurm, kube=kube, power=power, clock=Clock())
    yield store, slurm, rec, power
    store.close()


def test_a_resume_ask_is_granted_only_once_the_node_is_powered(ps_world):
    """slurmctld asks for sn01, powered down in SLURM: the BMC times out, so the ask stays open
    (not `granted` for a node nobody powered); the next pass powers it and grants it."""
    store, slurm, rec, power = ps_world
    slurm.set("sn01", flags=frozenset({"powered_down", "powering_up"}), state="allocated", alloc_cpus=4)
    store.add_asks(["sn01"], "resume", source="slurmctld", reason="JobId=7", actor="slurmctld")
    rec.run_pass()
    assert [a.node for a in store.open_asks()] == ["sn01"]
    assert store.events(["sn01"], kinds=["ask-granted"]) == []
    power.ok = True
    rec.run_pass()
    assert store.open_asks() == []
    assert len(store.events(["sn01"], kinds=["ask-granted"])) == 1
    assert [c[0] for c in power.calls] == ["boot", "boot"]


def test_a_resume_boot_is_written_before_it_is_sent_and_never_sent_twice(ps_world, monkeypatch):
    """The boot's intent is a grant of ours (it also opens the node's secrets window): a pass
    that powered the node and died before it answered the ask leaves it, and the next pass
    grants the ask without a second power action (a second "boot" would reset the booting node)."""
    store, slurm, rec, power = ps_world
    power.ok = True
    slurm.set("sn01", flags=frozenset({"powered_down", "powering_up"}), state="allocated", alloc_cpus=4)
    store.add_asks(["sn01"], "resume", source="slurmctld", reason="JobId=9", actor="slurmctld")

    def killed(*a, **kw):
        raise KeyboardInterrupt  # as a kill -9 right after the power action: nothing after it runs
    monkeypatch.setattr(store, "close_ask", killed)
    with pytest.raises(KeyboardInterrupt):
        rec.run_pass()
    monkeypatch.undo()
    grant = store.boot_row("sn01")
    assert grant["granted_by"] == "balancer" and grant["granted_at"] is not None
    report = rec.run_pass()
    assert [c[0] for c in power.calls] == ["boot"], power.calls
    assert store.open_asks() == [] and len(store.events(["sn01"], kinds=["ask-granted"])) == 1
    assert any("by an earlier pass" in n for n in report.notes), report.notes


def test_a_resume_after_the_last_one_booted_powers_the_node_again(ps_world):
    """The intent stands only until its boot calls back (the token issued after the grant is
    spent) or the node is powered off: a second resume soon after is a new boot."""
    store, slurm, rec, power = ps_world
    power.ok = True
    slurm.set("sn01", flags=frozenset({"powered_down", "powering_up"}), state="allocated", alloc_cpus=4)
    store.add_asks(["sn01"], "resume", source="slurmctld", reason="JobId=11", actor="slurmctld")
    rec.run_pass()
    since = store.boot_row("sn01")["granted_at"]
    assert store.issue_boot("sn01", "b" * 32, since - 5, None)  # the boot server's clock, a bit behind
    assert store.record_booted("sn01", "slurm", "1", actor="t", source=None, spend="b" * 32)
    store.add_asks(["sn01"], "resume", source="slurmctld", reason="JobId=12", actor="slurmctld")
    rec.run_pass()
    assert [c[0] for c in power.calls] == ["boot", "boot"], power.calls
    assert store.open_asks() == []


def test_powering_a_node_off_ends_the_resume_boot_it_had(ps_world):
    store, slurm, rec, power = ps_world
    power.ok = True
    slurm.set("sn01", flags=frozenset({"powered_down", "powering_up"}), state="allocated", alloc_cpus=4)
    store.add_asks(["sn01"], "resume", source="slurmctld", reason="JobId=13", actor="slurmctld")
    rec.run_pass()
    assert store.boot_row("sn01")["granted_at"] is not None
    slurm.set("sn01", flags=frozenset({"powered_down"}), state="idle", alloc_cpus=0)
    assert rec._power_for_slurm("sn01", "off", "suspended", PassReport(dry_run=False))[0] == "powered"
    assert store.boot_row("sn01")["granted_at"] is None


def test_a_failed_resume_boot_closes_its_window(ps_world):
    store, slurm, rec, power = ps_world
    slurm.set("sn01", flags=frozenset({"powered_down", "powering_up"}), state="allocated", alloc_cpus=4)
    store.add_asks(["sn01"], "resume", source="slurmctld", reason="JobId=10", actor="slurmctld")
    rec.run_pass()  # the BMC times out
    assert store.boot_row("sn01")["granted_at"] is None  # no boot is coming: no secrets window


def test_a_resume_ask_for_a_node_that_switches_waits_for_its_power_action(ps_world):
    store, slurm, rec, power = ps_world
    for n in SHARED:  # all of them in Kubernetes, powered down for SLURM
        store.update(n, actor="test", kind="test", message="arranged", desired_role=K8S)
        slurm.set(n, flags=frozenset({"powered_down"}), state="idle")
    slurm.set("sn01", flags=frozenset({"powered_down", "powering_up"}), state="allocated", alloc_cpus=4)
    store.add_asks(["sn01"], "resume", source="slurmctld", reason="JobId=8", actor="slurmctld")
    rec.run_pass()
    st = store.get("sn01")
    assert st.target_role == SLURM and st.phase == REBOOTING  # the power action failed
    assert [a.node for a in store.open_asks()] == ["sn01"]
    power.ok = True
    rec.run_pass()
    assert store.get("sn01").phase == BOOTING and store.open_asks() == []
    assert "powered for SLURM" in store.events(["sn01"], kinds=["ask-granted"])[-1].message


# --------------------------------------------------------------------------- the lock


def test_a_pass_that_lost_its_lock_stops_before_its_next_write(world):
    site, store, slurm, kube, rec, clock = world
    rec.change_role(["sn01"], K8S, actor="admin:x", reason="maint")
    before = len(store.events(["sn01"]))

    def lost():
        raise LockLost("the lock's connection was lost")

    with holding(lost), pytest.raises(LockLost):
        rec.run_pass(balance=False)
    assert store.get("sn01").phase == REQUESTED and len(store.events(["sn01"])) == before
    assert rec.power.calls == []


def test_the_power_intent_compare_and_set_includes_power_at(world):
    """Two passes saw the same rebooting row; the first wrote its power intent: the second's
    intent (same phase, an older power_at) is refused, so it does not power the node too."""
    site, store, slurm, kube, rec, clock = world
    arrange(store, "sn01", phase=REBOOTING, target_role=K8S, desired_role=K8S, phase_since=NOW - 1,
            switch_actor="balancer")
    slurm.set("sn01", state="down", reason=OURS, reason_is_ours=True)
    seen = store.get("sn01")
    arrange(store, "sn01", power_at=NOW)  # the other pass's intent
    report = PassReport(dry_run=False)
    rec._step(seen, report)
    assert rec.power.calls == [] and store.get("sn01").power_at == NOW


# --------------------------------------------------------------------------- a node leaves the shared pool


@pytest.mark.parametrize("pool, outcome", [(K8S, STEADY), (SLURM, BOOTING)])
def test_a_node_that_left_the_shared_pool_mid_switch_is_rolled_back_or_finished(world, pool, outcome):
    """site.yaml now puts sn01, cordoned on its way to SLURM, in pool k8s: rolled back before power,
    our cordon lifted; in pool slurm: the switch goes on (powered, booting). Either way the pass warns."""
    import dataclasses

    site, store, slurm, kube, rec, clock = world
    kube.state["sn01"] = kube_node("sn01", role=K8S, cordoned_by_us=True)
    arrange(store, "sn01", phase=CORDONING, target_role=SLURM, desired_role=K8S, phase_since=NOW - 5,
            switch_actor="balancer")
    nodes = {**site.nodes, "sn01": dataclasses.replace(site.nodes["sn01"], pool=pool, default_role=pool)}
    moved = Reconciler(dataclasses.replace(site, nodes=nodes), store, slurm=slurm, kube=kube, power=FakePower(),
                       clock=clock)
    report = moved.run_pass(balance=False)
    st = store.get("sn01")
    assert st.phase == outcome and any("sn01 left the shared pool" in n for n in report.notes), \
        (st, report)
    if pool == K8S:
        assert not kube.state["sn01"].cordoned_by_us and st.target_role is None


# --------------------------------------------------------------------------- a hold left behind


@pytest.mark.parametrize("reason,lifted", [
    ("provisioner: switching to k8s: demand", True),  # a rollback's pass died before lifting its drain
    ("k8s_connect", True),
    ("provisioner: resume refused: pinned to k8s", False),  # our drain with a purpose of its own
    ("hardware: bad DIMM", False),  # someone else's
])
def test_a_steady_node_keeps_no_drain_an_ended_switch_left(world, reason, lifted):
    site, store, slurm, kube, rec, clock = world
    slurm.set("sn01", flags=frozenset({"drain"}), reason=reason, reason_is_ours=reason.startswith("provisioner:")
              or reason == "k8s_connect")
    report = rec.run_pass(balance=False)
    assert (("resume", ("sn01",)) in slurm.calls) == lifted, slurm.calls
    assert [s.node for s in report.steps if s.action == "hold-lifted"] == (["sn01"] if lifted else [])


def test_a_steady_k8s_node_keeps_no_cordon_an_ended_switch_left(world):
    site, store, slurm, kube, rec, clock = world
    arrange(store, "sn02", desired_role=K8S)
    kube.state["sn02"] = kube_node("sn02", role=K8S)
    kube.set("sn02", unschedulable=True, cordoned_by_us=True)
    rec.run_pass(balance=False)
    assert ("uncordon", "sn02") in kube.calls and not kube.state["sn02"].unschedulable
