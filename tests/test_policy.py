"""The pure decision function: the paper's loop and the rules it lacked."""

from dataclasses import replace

import pytest

from provisioner.model import Policy
from provisioner.policy import PendingJob, PendingPod, SharedNode, Snapshot, decide

NOW = 1_000_000.0
POLICY = Policy(min_nodes={"slurm": 0, "k8s": 0}, cooldown_s=600, demand_persist_s=120, max_in_flight=2,
                share_rule="proportional")
K8S_LABELS = (("sched", "k8s"),)


def node(name, role, **kw):
    return SharedNode(name=name, role=role, partitions=("batch",), cpus=4, k8s_labels=K8S_LABELS, **kw)


def jobs(n, reason="Resources", partition="batch", cpus=1):
    return tuple(PendingJob(str(i), reason, (partition,), 1, cpus) for i in range(n))


def pods(n, cpu_m=4000, selector=()):
    return tuple(PendingPod("ml", f"p{i}", cpu_m=cpu_m, node_selector=selector) for i in range(n))


def snap(nodes, jobs=(), pods=(), policy=POLICY, since=NOW - 300, **kw):
    return Snapshot(now=NOW, policy=policy, nodes=tuple(nodes), jobs=jobs, pods=pods,
                    demand_since={"slurm": since, "k8s": since}, **kw)


def moved(decision):
    return [(m.node, m.to_role) for m in decision.moves]


def test_paper_slurm_pending_takes_idle_k8s_node():
    d = decide(snap([node("sn1", "k8s"), node("sn2", "slurm", busy=True)], jobs=jobs(1)))
    assert moved(d) == [("sn1", "slurm")]
    assert "1 job Pending (Resources) in partition batch" in d.moves[0].reason
    assert "sn1 idle in k8s" in d.moves[0].reason


def test_paper_unschedulable_pods_take_idle_slurm_node():
    d = decide(snap([node("sn1", "slurm"), node("sn2", "k8s", busy=True)], pods=pods(2, cpu_m=1000)))
    assert moved(d) == [("sn1", "k8s")]
    assert "2 pods Pending (Unschedulable) in namespace ml" in d.moves[0].reason


def test_no_demand_no_move():
    assert moved(decide(snap([node("sn1", "k8s"), node("sn2", "slurm")]))) == []


def test_only_servable_demand_counts():
    nodes = [node("sn1", "k8s")]
    assert moved(decide(snap(nodes, jobs=jobs(3, partition="gpu")))) == []  # not in that partition
    assert moved(decide(snap(nodes, jobs=jobs(3, cpus=64)))) == []  # too big for the node
    assert moved(decide(snap(nodes, jobs=jobs(3, reason="Dependency")))) == []  # waiting on something else
    nodes = [node("sn1", "slurm")]
    assert moved(decide(snap(nodes, pods=pods(2, selector=(("sched", "slurm"),))))) == []
    assert moved(decide(snap(nodes, pods=pods(2, cpu_m=64000)))) == []
    assert moved(decide(snap(nodes, pods=pods(2, selector=(("sched", "k8s"),))))) == [("sn1", "k8s")]


def test_demand_covered_by_idle_nodes_on_its_side_moves_nothing():
    d = decide(snap([node("sn1", "k8s"), node("sn2", "slurm")], jobs=jobs(1)))
    assert moved(d) == []  # sn2 is idle in slurm and will take the job
    assert any("already covered" in n for n in d.notes)


def test_pinned_failed_busy_and_unavailable_nodes_never_move():
    nodes = [node("sn1", "k8s", pinned=True), node("sn2", "k8s", phase="failed"),
             node("sn3", "k8s", busy=True), node("sn4", "k8s", available=False, held_by="cordoned by someone else")]
    d = decide(snap(nodes, jobs=jobs(4)))
    assert moved(d) == []
    text = "\n".join(d.notes)
    assert "sn1: not moved to slurm: pinned" in text and "cordoned by someone else" in text


def test_minimum_per_side():
    policy = replace(POLICY, min_nodes={"slurm": 0, "k8s": 1})
    d = decide(snap([node("sn1", "k8s"), node("sn2", "k8s")], jobs=jobs(5), policy=policy))
    assert moved(d) == [("sn1", "slurm")]  # sn2 stays: k8s keeps one
    assert any("minimum of 1" in n for n in d.notes)


def test_cooldown_after_a_switch():
    d = decide(snap([node("sn1", "k8s", last_switch_at=NOW - 60)], jobs=jobs(1)))
    assert moved(d) == [] and any("cooldown" in n for n in d.notes)
    assert moved(decide(snap([node("sn1", "k8s", last_switch_at=NOW - 601)], jobs=jobs(1)))) == [("sn1", "slurm")]


@pytest.mark.parametrize("since", [None, NOW - 30])
def test_demand_must_persist(since):
    d = decide(snap([node("sn1", "k8s")], jobs=jobs(1), since=since))
    assert moved(d) == [] and any("waiting for 120 s" in n for n in d.notes)


def test_max_in_flight():
    nodes = [node(f"sn{i}", "k8s") for i in range(5)] + [node("sx", "slurm", phase="rebooting")]
    d = decide(snap(nodes, jobs=jobs(5)))
    assert len(d.moves) == 1  # 2 slots, one taken by sx
    nodes[-1] = replace(nodes[-1], phase="steady", busy=True)
    assert len(decide(snap(nodes, jobs=jobs(5))).moves) == 2


def test_both_sides_share_slots_proportionally():
    # Each side's home nodes are lent to the other, and both sides want them back.
    nodes = [node(f"k{i}", "k8s", home="slurm") for i in range(6)] + \
        [node(f"s{i}", "slurm", home="k8s") for i in range(6)]
    policy = replace(POLICY, max_in_flight=4)
    # slurm wants 9 nodes (9 jobs), k8s wants 3 (3 pods of a whole node): 4 slots -> 3 and 1
    d = decide(snap(nodes, jobs=jobs(9 + 6), pods=pods(3 + 6), policy=policy))
    to = [m.to_role for m in d.moves]
    assert to.count("slurm") == 3 and to.count("k8s") == 1
    d = decide(snap(nodes, jobs=jobs(15), pods=pods(9), policy=replace(policy, share_rule="k8s-first")))
    assert [m.to_role for m in d.moves].count("k8s") == 3


def test_switching_nodes_count_as_coming():
    nodes = [node("sn1", "slurm", phase="rebooting"), node("sn2", "k8s")]
    assert moved(decide(snap(nodes, jobs=jobs(1)))) == []  # sn1 is on its way to slurm


def test_deterministic_order_prefers_longest_settled():
    nodes = [node("sn1", "k8s", last_switch_at=NOW - 5000), node("sn2", "k8s", last_switch_at=NOW - 9000)]
    assert moved(decide(snap(nodes, jobs=jobs(1)))) == [("sn2", "slurm")]
