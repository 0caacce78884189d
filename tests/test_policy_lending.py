"""Lending and reclaim in the pure decision: homes, reclaim with its grace, the head job's
reservation, lending limits, room on busy nodes covering pods, and asks under the same rules."""

from dataclasses import replace

from provisioner.policy import EVICT, REQUEUE, WAIT, Ask, decide, reclaim_bound
from tests.test_policy import NOW, POLICY, jobs, moved, node, pods, snap


def resume(i, name):
    return Ask(i, name, "resume", "slurmctld", f"JobId={i} (ResumeProgram)")


def test_an_idle_lent_node_comes_home_at_once_even_inside_its_cooldown():
    lent = node("sn1", "k8s", home="slurm", last_switch_at=NOW - 60)
    d = decide(snap([lent], jobs=jobs(1)))
    assert moved(d) == [("sn1", "slurm")]
    assert not d.moves[0].reclaim and "its home is slurm" in d.moves[0].reason
    # A node lent *to* slurm that slurm just got still keeps its cooldown.
    borrowed = node("sn1", "k8s", home="k8s", last_switch_at=NOW - 60)
    assert moved(decide(snap([borrowed], jobs=jobs(1)))) == []


def test_a_busy_lent_node_is_reclaimed_with_the_borrowers_grace_then_its_pods_evicted():
    policy = replace(POLICY, reclaim_grace_s={"slurm": 900, "k8s": 120})
    d = decide(snap([node("sn1", "k8s", home="slurm", busy=True)], jobs=jobs(1), policy=policy))
    (m,) = d.moves
    assert (m.node, m.to_role, m.reclaim, m.from_role, m.work) == ("sn1", "slurm", True, "k8s", EVICT)
    assert m.grace_s == 120 and m.deadline == NOW + 120
    assert "reclaiming sn1, busy in k8s" in m.reason and "cordoned now, 120 s grace" in m.reason
    assert d.lent == {"slurm": 0}  # after this move, none of slurm's home nodes is lent


def test_a_busy_node_lent_to_slurm_is_reclaimed_and_its_jobs_requeued():
    d = decide(snap([node("sn1", "slurm", home="k8s", busy=True)], pods=pods(1)))
    (m,) = d.moves
    assert (m.to_role, m.reclaim, m.work, m.grace_s) == ("k8s", True, REQUEUE, 1800)
    assert "drained now, 1800 s grace, then its jobs are requeued" in m.reason


def test_reclaim_waits_for_the_demand_to_persist():
    lent = node("sn1", "k8s", home="slurm", busy=True)
    d = decide(snap([lent], jobs=jobs(1), since=NOW - 30))
    assert moved(d) == [] and any("waiting for 120 s" in n for n in d.notes)


def test_busy_nodes_are_never_taken_from_their_home():
    d = decide(snap([node("sn1", "k8s", home="k8s", busy=True), node("sn2", "k8s", busy=True)], jobs=jobs(2)))
    assert moved(d) == [] and d.held == {}


def test_an_idle_node_to_borrow_is_taken_before_a_busy_one_is_reclaimed():
    nodes = [node("sn1", "k8s", home="slurm", busy=True), node("sn2", "k8s", home="k8s")]
    assert moved(decide(snap(nodes, jobs=jobs(1)))) == [("sn2", "slurm")]
    # Two wanted: the idle one and the reclaim, one slot each.
    d = decide(snap(nodes, jobs=jobs(2)))
    assert sorted(moved(d)) == [("sn1", "slurm"), ("sn2", "slurm")]
    assert [m.reclaim for m in sorted(d.moves, key=lambda m: m.node)] == [True, False]


def test_movable_work_is_reclaimed_first():
    nodes = [node("sn1", "k8s", home="slurm", busy=True, movable=False),
             node("sn2", "k8s", home="slurm", busy=True)]
    assert moved(decide(snap(nodes, jobs=jobs(1)))) == [("sn2", "slurm")]


def test_a_pdb_refusal_holds_the_node_with_its_reason_until_the_cooldown_passes():
    refused = "Cannot evict pod as it would violate the pod's disruption budget."
    lent = node("sn1", "k8s", home="slurm", busy=True, evict_refused_at=NOW - 100, evict_refused=refused)
    d = decide(snap([lent], jobs=jobs(1)))
    assert moved(d) == []
    assert "a PodDisruptionBudget refused the eviction" in d.held["sn1"] and refused in d.held["sn1"]
    assert any(n.startswith("sn1: not moved to slurm: reclaim held") for n in d.notes)
    later = replace(lent, evict_refused_at=NOW - 700)
    assert moved(decide(snap([later], jobs=jobs(1)))) == [("sn1", "slurm")]


def test_pinned_lent_nodes_are_not_reclaimed_and_say_so():
    d = decide(snap([node("sn1", "k8s", home="slurm", busy=True, pinned=True)], jobs=jobs(1)))
    assert moved(d) == [] and d.held == {"sn1": "pinned to k8s by an admin"}


def test_nodes_gathered_for_a_wide_head_job_are_not_lent_away():
    # Two shared nodes idle in slurm, gathered for a 4-node job; Kubernetes' pods want nodes.
    wide = (jobs(1)[0].__class__("7", "Resources", ("batch",), 4, 1),)
    nodes = [node("sn1", "slurm"), node("sn2", "slurm"), node("sn3", "k8s", busy=True)]
    d = decide(snap(nodes, jobs=wide, pods=pods(2)))
    assert moved(d) == []
    assert any("sn[1-2]: not moved to k8s: slurm's own pending work needs it" in n for n in d.notes)
    # Without the wide job they are spare and lent.
    assert len(moved(decide(snap(nodes, pods=pods(2))))) == 2


def test_only_the_idle_nodes_beyond_the_own_demand_are_lent():
    nodes = [node(f"sn{i}", "slurm") for i in range(1, 4)] + [node("sn9", "k8s", busy=True)]
    d = decide(snap(nodes, jobs=jobs(2), pods=pods(3), policy=replace(POLICY, max_in_flight=5)))
    assert len(moved(d)) == 1  # three idle, two jobs waiting: one is spare


def test_lending_limit_per_side():
    nodes = [node(f"sn{i}", "slurm", home="slurm") for i in range(1, 4)]
    policy = replace(POLICY, max_in_flight=5, lending_limit={"slurm": 1, "k8s": None})
    d = decide(snap(nodes, pods=pods(3), policy=policy))
    assert len(moved(d)) == 1 and d.lent["slurm"] == 1
    already = nodes + [node("sn4", "k8s", home="slurm", busy=True)]
    d = decide(snap(already, pods=pods(3), policy=policy))
    assert moved(d) == []
    assert any("slurm lends at most lending_limit=1 home node(s)" in n for n in d.notes)


def test_room_on_a_busy_kubernetes_node_covers_the_pods_that_fit():
    busy = node("sn1", "k8s", busy=True, memory=32 << 30, room_cpu_m=3000, room_memory=8 << 30)
    spare = node("sn2", "slurm")
    assert moved(decide(snap([busy, spare], pods=pods(1, cpu_m=2000)))) == []
    assert moved(decide(snap([busy, spare], pods=pods(2, cpu_m=2000)))) == [("sn2", "k8s")]  # the second does not fit
    assert moved(decide(snap([busy, spare], pods=pods(1, cpu_m=3500)))) == [("sn2", "k8s")]
    # GPUs and memory count too.
    gpu_pod = (pods(1, cpu_m=1000)[0].__class__("ml", "g", cpu_m=1000, gpus=1),)
    assert moved(decide(snap([busy, replace(spare, gpus=1)], pods=gpu_pod))) == [("sn2", "k8s")]  # no GPU on sn1
    big = (pods(1)[0].__class__("ml", "m", cpu_m=1000, memory=16 << 30),)
    assert moved(decide(snap([busy, spare], pods=big))) == [("sn2", "k8s")]


def test_the_failover_race_one_node_for_two_pods_that_fit_on_it():
    """Two pods of 2 CPUs pend; one 4-CPU node is enough. When the node has joined and runs the
    first pod, the second still reads Unschedulable (the scheduler has not retried it yet): the
    room left on the node covers it, and no second node moves."""
    two = pods(2, cpu_m=2000)
    first = decide(snap([node("sn1", "slurm"), node("sn2", "slurm")], pods=two))
    assert moved(first) == [("sn1", "k8s")]
    joined = node("sn1", "k8s", busy=True, room_cpu_m=2000, last_switch_at=NOW)
    second = decide(snap([joined, node("sn2", "slurm")], pods=two[1:]))
    assert moved(second) == [] and second.demand["k8s"] == 0


def test_a_resume_ask_reclaims_a_busy_home_node():
    d = decide(snap([node("sn1", "k8s", home="slurm", busy=True)], asks=(resume(1, "sn1"),)))
    (m,) = d.moves
    assert m.reclaim and m.work == EVICT
    assert [(a.node, a.outcome, a.message) for a in d.answers] == [("sn1", "granted", "switching to slurm after the k8s grace")]


def test_a_resume_ask_follows_the_lending_rules():
    # Kubernetes' own pending pods need its idle home node: refused.
    d = decide(snap([node("sn1", "k8s", home="k8s")], pods=pods(1), asks=(resume(1, "sn1"),)))
    assert moved(d) == [] and d.answers[0].outcome == "refused"
    assert d.answers[0].message == "k8s's own pending work needs it"
    # Its lending limit: refused.
    policy = replace(POLICY, lending_limit={"slurm": None, "k8s": 0})
    d = decide(snap([node("sn1", "k8s", home="k8s")], asks=(resume(1, "sn1"),), policy=policy))
    assert d.answers[0].message == "k8s lends at most lending_limit=0 home node(s)"
    # The power-saving view says the same, so SLURM does not ask.
    assert d.slurm_hold == {"sn1": "k8s lends at most lending_limit=0 home node(s)"}


def test_home_side_claim_wins_over_the_borrowers_demand():
    # sn1 (home k8s) idle in slurm, where one job waits; k8s's demand persists: it goes home.
    d = decide(snap([node("sn1", "slurm", home="k8s")], jobs=jobs(1), pods=pods(1)))
    assert moved(d) == [("sn1", "k8s")]


def test_reclaim_bound():
    policy = replace(POLICY, reclaim_grace_s={"slurm": 600, "k8s": 300})
    # slurm's node lent to k8s: persistence 120 + a pass 60 + k8s's grace 300 + the switch 40
    assert reclaim_bound(policy, "slurm", 60, 40) == 520
    assert reclaim_bound(policy, "k8s", 60, 75) == 120 + 60 + 600 + 75



def test_a_reclaim_in_its_grace_is_released_when_its_home_no_longer_needs_it():
    in_grace = node("sn1", "slurm", phase="cordoning", busy=True, home="slurm", reclaim_deadline=NOW + 300)
    past_grace = node("sn2", "slurm", phase="cordoning", busy=True, home="slurm", reclaim_deadline=NOW - 100)
    # No SLURM work waits any more: the one still in its grace is released; the other's work is
    # already being moved, so its switch goes on.
    d = decide(snap([in_grace, past_grace]))
    assert list(d.release) == ["sn1"] and "slurm no longer needs it" in d.release["sn1"]
    # While a job still waits for it, it is kept.
    assert not decide(snap([in_grace, past_grace], jobs=jobs(2))).release


# Requeue only what costs less than the wait it saves (policy.requeue_pays): Kubernetes reclaims
# its home node lent to SLURM; its job has run `work_cost` node-seconds and ends at its time limit.
def lent_to_slurm(**kw):
    return node("sn1", "slurm", home="k8s", busy=True, work_ids=("42",), **kw)


def test_a_cheap_job_is_requeued_after_the_grace():
    # 1 node-hour run; its time limit is 10 h away: the requeue saves the home side ~9.5 h.
    d = decide(snap([lent_to_slurm(work_cost=3600, work_ends_at=NOW + 36000)], pods=pods(1)))
    (m,) = d.moves
    assert (m.work, m.deadline, m.grace_s) == (REQUEUE, NOW + 1800, 1800)
    assert "1800 s grace, then its jobs are requeued" in m.reason


def test_a_costly_job_is_waited_for_until_its_time_limit():
    # 16 nodes x 10 h run (160 node-h); its time limit is 2 h away: the node stays drained.
    ends = NOW + 7200
    d = decide(snap([lent_to_slurm(work_cost=16 * 36000, work_ends_at=ends)], pods=pods(1)))
    (m,) = d.moves
    assert (m.reclaim, m.work, m.deadline, m.to_role) == (True, WAIT, ends, "k8s")
    assert "drained now, waiting for job 42 to end (requeue would lose 160.0 node-h" in m.reason
    # A site that wants the old behaviour: every job that can be requeued is.
    always = replace(POLICY, reclaim_requeue="always")
    (m,) = decide(snap([lent_to_slurm(work_cost=16 * 36000, work_ends_at=ends)], pods=pods(1), policy=always)).moves
    assert (m.work, m.deadline) == (REQUEUE, NOW + 1800)


def test_the_cheaper_reclaim_goes_first_and_a_job_ending_within_the_grace_first_of_all():
    nodes = [node("sn1", "slurm", home="k8s", busy=True, work_cost=1e6, work_ends_at=NOW + 7200),
             node("sn2", "slurm", home="k8s", busy=True, work_cost=3600, work_ends_at=NOW + 36000),
             node("sn3", "slurm", home="k8s", busy=True, work_cost=1e6, work_ends_at=NOW + 600)]
    assert moved(decide(snap(nodes, pods=pods(1)))) == [("sn3", "k8s")]
    assert moved(decide(snap(nodes[:2], pods=pods(1)))) == [("sn2", "k8s")]


def test_a_job_with_no_time_limit_is_requeued_however_long_it_ran():
    # Waiting for it has no bound; the home side was promised one (docs/lending.md says why).
    (m,) = decide(snap([lent_to_slurm(work_cost=100 * 3600, work_ends_at=None)], pods=pods(1))).moves
    assert (m.work, m.deadline) == (REQUEUE, NOW + 1800)


def test_a_job_that_cannot_be_requeued_keeps_the_old_path():
    (m,) = decide(snap([lent_to_slurm(work_cost=3600, work_ends_at=NOW + 36000, movable=False)], pods=pods(1))).moves
    assert m.work == REQUEUE and "those that cannot be run to their end" in m.reason


def test_a_reclaim_waiting_for_its_job_is_released_until_the_time_limit():
    # Drained and waiting (its deadline is the job's time limit): released when Kubernetes no
    # longer needs it, however long past the grace it has waited.
    waiting = node("sn1", "k8s", phase="draining", busy=True, home="k8s", reclaim_deadline=NOW + 3600)
    d = decide(snap([waiting]))
    assert list(d.release) == ["sn1"] and "k8s no longer needs it" in d.release["sn1"]
    assert not decide(snap([waiting], pods=pods(1))).release
