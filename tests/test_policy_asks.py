"""The policy answers schedulers' asks (slurmctld's ResumeProgram/SuspendProgram) by the same
rules as polled demand: one arbiter for every ask."""

from dataclasses import replace

from provisioner.policy import RESUME, SUSPEND, Ask, decide
from tests.test_policy import NOW, POLICY, moved, node, pods, snap


def resume(i, name, reason="JobId=7"):
    return Ask(i, name, RESUME, "slurmctld", reason)


def answers(d):
    return {(a.node, a.outcome): a.message for a in d.answers}


def test_a_resume_ask_moves_its_node_at_once_without_persistence():
    d = decide(snap([node("sn1", "k8s"), node("sn2", "k8s")], since=None, asks=(resume(1, "sn2"),)))
    assert moved(d) == [("sn2", "slurm")]
    assert "slurmctld asks for it (JobId=7)" in d.moves[0].reason
    assert answers(d) == {("sn2", "granted"): "switching to slurm"}


def test_refused_asks_say_why():
    nodes = [node("sn1", "k8s", pinned=True), node("sn2", "k8s", busy=True),
             node("sn3", "k8s", last_switch_at=NOW - 60), node("sn4", "k8s", phase="failed")]
    d = decide(snap(nodes, asks=tuple(resume(i, f"sn{i}") for i in range(1, 5)) + (resume(5, "cn01"),)))
    assert moved(d) == []
    got = answers(d)
    assert got[("sn1", "refused")] == "pinned to k8s by an admin"
    assert got[("sn2", "refused")] == "busy in k8s"
    assert "cooldown_s=600" in got[("sn3", "refused")]
    assert got[("sn4", "refused")] == "failed"
    assert "not a shared node" in got[("cn01", "refused")]


def test_the_minimum_on_the_other_side_holds_for_asks():
    policy = replace(POLICY, min_nodes={"slurm": 0, "k8s": 1})
    d = decide(snap([node("sn1", "k8s"), node("sn2", "k8s")], policy=policy,
                    asks=(resume(1, "sn1"), resume(2, "sn2"))))
    assert moved(d) == [("sn1", "slurm")]
    assert "k8s keeps its minimum of 1" in answers(d)[("sn2", "refused")]


def test_asks_beyond_the_in_flight_cap_wait_open():
    nodes = [node("sn1", "k8s"), node("sn2", "k8s"), node("sn3", "k8s"), node("sn4", "slurm", phase="booting")]
    d = decide(snap(nodes, asks=tuple(resume(i, f"sn{i}") for i in range(1, 4))))
    assert moved(d) == [("sn1", "slurm")]  # max_in_flight 2, one in flight
    assert ("sn2", "deferred") in answers(d) and ("sn3", "deferred") in answers(d)


def test_both_sides_at_once_share_the_slots_by_the_rule():
    # SLURM asks for its home nodes lent to Kubernetes; Kubernetes then wants SLURM's spare ones.
    nodes = [node("sn1", "k8s", home="slurm"), node("sn2", "k8s", home="slurm"), node("sn3", "slurm"),
             node("sn4", "slurm")]
    d = decide(snap(nodes, pods=pods(2), asks=(resume(1, "sn1"), resume(2, "sn2"))))
    assert sorted(moved(d)) == [("sn1", "slurm"), ("sn3", "k8s")]  # 2 slots, one each (proportional)
    slurm_first = decide(snap(nodes, pods=pods(2), asks=(resume(1, "sn1"), resume(2, "sn2")),
                              policy=replace(POLICY, share_rule="slurm-first")))
    assert sorted(moved(slurm_first)) == [("sn1", "slurm"), ("sn2", "slurm")]


def test_a_resume_for_a_node_in_slurm_boots_it():
    d = decide(snap([node("sn1", "slurm")], asks=(resume(1, "sn1"),)))
    assert moved(d) == [] and [m.node for m in d.boots] == ["sn1"]
    assert answers(d)[("sn1", "granted")] == "in SLURM already: powering it on"


def test_a_suspended_node_goes_to_kubernetes_only_when_it_has_work():
    ask = Ask(1, "sn1", SUSPEND, "slurmctld", "idle for SuspendTime")
    idle = decide(snap([node("sn1", "slurm")], asks=(ask,)))
    assert moved(idle) == [] and [m.node for m in idle.power_off] == ["sn1"]
    assert "powered off" in answers(idle)[("sn1", "done")]
    wanted = decide(snap([node("sn1", "slurm")], pods=pods(1), asks=(ask,)))
    assert moved(wanted) == [("sn1", "k8s")] and wanted.power_off == ()
    assert "SLURM released sn1" in wanted.moves[0].reason


def test_a_suspend_for_a_node_already_leaving_is_done():
    d = decide(snap([node("sn1", "k8s", phase="rebooting")], asks=(Ask(1, "sn1", SUSPEND, "slurmctld", "x"),)))
    assert answers(d) == {("sn1", "done"): "already leaving SLURM (rebooting, to k8s)"}


def test_slurm_hold_says_which_k8s_nodes_slurm_may_ask_for():
    d = decide(snap([node("sn1", "k8s"), node("sn2", "k8s", pinned=True), node("sn3", "k8s", busy=True),
                     node("sn4", "slurm")]))
    assert d.slurm_hold == {"sn1": None, "sn2": "pinned to k8s by an admin", "sn3": "busy in k8s"}
