"""Gang asks (a ProvisioningRequest: N nodes at once) are answered all or nothing by the same
decide(): nodes move only when every node the gang needs can come; never half a gang."""

from dataclasses import replace

from provisioner.policy import RESUME, Ask, GangAsk, PendingPod, decide
from tests.test_policy import NOW, POLICY, jobs, moved, node, pods, snap


def gang(n, cpu_m=4000, selector=(), gid="ml/train", **kw):
    return GangAsk(gid, ((PendingPod("ml", "tpl", cpu_m=cpu_m, node_selector=selector), n),), **kw)


def answer(d, gid="ml/train"):
    return next(a for a in d.gangs if a.ask == gid)


def test_a_gang_of_two_whole_nodes_moves_two_idle_slurm_nodes_at_once_without_persistence():
    d = decide(snap([node("sn1", "slurm"), node("sn2", "slurm"), node("sn3", "slurm", busy=True)],
                    since=None, gangs=(gang(2),)))
    assert moved(d) == [("sn1", "k8s"), ("sn2", "k8s")]
    a = answer(d)
    assert (a.outcome, a.nodes) == ("switching", ("sn1", "sn2"))
    assert "ml/train asks for 2 node(s) at once (all or nothing); sn1 idle in slurm" == d.moves[0].reason


def test_all_or_nothing_one_movable_node_moves_nothing_and_says_why():
    d = decide(snap([node("sn1", "slurm"), node("sn2", "slurm", busy=True)], gangs=(gang(2),)))
    assert moved(d) == []
    a = answer(d)
    assert a.outcome == "waiting" and a.nodes == ()
    assert "1 of 2 pod(s) (4000m CPU) have no node now" in a.message
    assert "1 busy in slurm" in a.message and "nothing is switched" in a.message


def test_larger_than_the_pool_or_a_selector_no_node_matches_fails_for_good():
    nodes = [node("sn1", "slurm"), node("sn2", "k8s")]
    a = answer(decide(snap(nodes, gangs=(gang(3),))))
    assert a.outcome == "failed" and "can never be served" in a.message and "among the 2 shared node(s)" in a.message
    a = answer(decide(snap(nodes, gangs=(gang(1, selector=(("zone", "b"),)),))))
    assert a.outcome == "failed" and "selector zone=b" in a.message


def test_small_pods_pack_and_idle_k8s_nodes_count_first():
    # 6 pods of 2 CPUs on 4-CPU nodes: 3 nodes; sn1 is in Kubernetes already, sn2 and sn3 move.
    d = decide(snap([node("sn1", "k8s"), node("sn2", "slurm"), node("sn3", "slurm"), node("sn4", "slurm")],
                    gangs=(gang(6, cpu_m=2000),)))
    assert moved(d) == [("sn2", "k8s"), ("sn3", "k8s")]
    assert answer(d).nodes == ("sn1", "sn2", "sn3")


def test_provisioned_when_every_booked_node_is_in_kubernetes_and_kept_from_slurm():
    nodes = [node("sn1", "k8s"), node("sn2", "k8s")]
    g = gang(2, booked=("sn1", "sn2"))
    d = decide(snap(nodes, jobs=jobs(2), gangs=(g,), asks=(Ask(1, "sn1", RESUME, "slurmctld", "JobId=3"),)))
    assert answer(d).outcome == "provisioned" and answer(d).nodes == ("sn1", "sn2")
    assert moved(d) == []  # SLURM's pending jobs do not take booked nodes
    assert "booked for ml/train" in d.answers[0].message and d.answers[0].outcome == "refused"
    assert d.slurm_hold["sn1"] == "booked for ml/train"


def test_switching_nodes_booked_before_stay_its_own_and_beyond_the_slots_wait():
    nodes = [node("sn1", "k8s", phase="booting"), node("sn2", "slurm"), node("sn3", "slurm"), node("sn4", "slurm")]
    d = decide(snap(nodes, gangs=(gang(4, booked=("sn1",)),)))
    assert moved(d) == [("sn2", "k8s")]  # max_in_flight 2, one in flight already
    a = answer(d)
    assert a.outcome == "switching" and a.nodes == ("sn1", "sn2", "sn3", "sn4")
    assert "2 wait for a switch slot" in a.message


def test_the_booking_expires():
    g = gang(1, booked=("sn1",), provisioned_at=NOW - 700, booking_s=600)
    d = decide(snap([node("sn1", "k8s")], jobs=jobs(1), gangs=(g,)))
    assert answer(d).outcome == "expired"
    assert moved(d) == [("sn1", "slurm")]  # free for SLURM again


def test_the_slurm_minimum_holds_for_a_gang():
    policy = replace(POLICY, min_nodes={"slurm": 1, "k8s": 0})
    d = decide(snap([node("sn1", "slurm"), node("sn2", "slurm")], policy=policy, gangs=(gang(2),)))
    assert moved(d) == [] and "below its minimum of 1" in answer(d).message


def test_two_gangs_never_share_a_node():
    nodes = [node("sn1", "slurm"), node("sn2", "slurm"), node("sn3", "slurm")]
    d = decide(snap(nodes, gangs=(gang(2, gid="ml/a"), gang(2, gid="ml/b"))))
    assert moved(d) == [("sn1", "k8s"), ("sn2", "k8s")]
    assert answer(d, "ml/b").outcome == "waiting" and "booked for ml/a" in answer(d, "ml/b").message


def test_a_gang_counts_a_node_busy_in_slurm_whose_home_is_kubernetes_it_comes_back_by_reclaim():
    """All or nothing, now or by reclaim: sn2 is Kubernetes' own node lent to SLURM and busy
    there; the gang takes it home with a reclaim (drain, grace, requeue), never a plain drain
    that waits for the job."""
    policy = replace(POLICY, reclaim_grace_s={"slurm": 600, "k8s": 60})
    d = decide(snap([node("sn1", "slurm", home="slurm"), node("sn2", "slurm", busy=True, home="k8s"),
                     node("sn3", "slurm", busy=True, home="slurm")], policy=policy, gangs=(gang(2),)))
    assert moved(d) == [("sn1", "k8s"), ("sn2", "k8s")]
    idle, busy = d.moves
    assert not idle.reclaim
    assert (busy.reclaim, busy.from_role, busy.work, busy.grace_s, busy.deadline) == (True, "slurm", "requeue", 600,
                                                                                         NOW + 600)
    assert "reclaiming sn2, busy in slurm; its home is k8s" in busy.reason
    assert answer(d).outcome == "switching"


def test_a_gang_prefers_kubernetes_idle_home_nodes_to_reclaiming_a_busy_one():
    d = decide(snap([node("sn1", "slurm", busy=True, home="k8s"), node("sn2", "slurm", home="k8s"),
                     node("sn3", "slurm", home="slurm")], gangs=(gang(2),)))
    assert moved(d) == [("sn2", "k8s"), ("sn3", "k8s")] and not any(m.reclaim for m in d.moves)


def test_a_gang_takes_slurms_home_nodes_only_up_to_its_lending_limit():
    policy = replace(POLICY, max_in_flight=5, lending_limit={"slurm": 1, "k8s": None})
    d = decide(snap([node("sn1", "slurm", home="slurm"), node("sn2", "slurm", home="slurm")], policy=policy,
                    gangs=(gang(2),)))
    assert moved(d) == []
    a = answer(d)
    assert a.outcome == "waiting" and "slurm lends at most lending_limit=1 home node(s)" in a.message
    # One lent already: no room at all; with the limit raised, both move at once.
    d = decide(snap([node("sn1", "slurm", home="slurm"), node("sn2", "slurm", home="slurm")],
                    policy=replace(policy, lending_limit={"slurm": 2, "k8s": None}), gangs=(gang(2),)))
    assert moved(d) == [("sn1", "k8s"), ("sn2", "k8s")]


def test_nodes_a_gang_took_count_against_the_lending_limit_of_later_moves():
    policy = replace(POLICY, max_in_flight=5, lending_limit={"slurm": 1, "k8s": None})
    d = decide(snap([node("sn1", "slurm", home="slurm"), node("sn2", "slurm", home="slurm")], policy=policy,
                    pods=pods(1), gangs=(gang(1),)))
    assert moved(d) == [("sn1", "k8s")]  # the gang's; the pending pod may not borrow a second one


def test_a_gang_reclaims_the_busy_node_that_loses_the_least_work():
    """The same order as any reclaim: work that ends within the grace first, then the least work lost."""
    policy = replace(POLICY, reclaim_grace_s={"slurm": 600, "k8s": 60})
    busy = dict(busy=True, home="k8s", movable=True)
    d = decide(snap([node("sn1", "slurm", work_cost=9000.0, **busy), node("sn2", "slurm", work_cost=100.0, **busy),
                     node("sn3", "slurm", work_cost=9000.0, work_ends_at=NOW + 300, **busy)],
                    policy=policy, gangs=(gang(2),)))
    assert sorted(moved(d)) == [("sn2", "k8s"), ("sn3", "k8s")]  # not sn1: most work lost, not ending


def test_a_gang_that_a_reclaim_cannot_complete_reclaims_nothing():
    """All or nothing holds for reclaims too: sn2 (Kubernetes' own, busy in SLURM) could come home
    by reclaim, but sn3 is pinned to SLURM, so the pair cannot come: sn2 is not reclaimed, and no
    SLURM job is touched for half a gang."""
    policy = replace(POLICY, reclaim_grace_s={"slurm": 600, "k8s": 60})
    d = decide(snap([node("sn2", "slurm", busy=True, home="k8s"), node("sn3", "slurm", home="k8s", pinned=True)],
                    policy=policy, gangs=(gang(2),)))
    assert moved(d) == []
    a = answer(d)
    assert a.outcome == "waiting" and "1 of 2 pod(s)" in a.message and "nothing is switched" in a.message
