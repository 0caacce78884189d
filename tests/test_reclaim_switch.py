"""A reclaim carried out by the reconciler, on in-process fakes (tests/fakes.py): the snapshot
carries homes, room and the work's cost, decide() emits the reclaim, and the switch records its
grace deadline, holds the node at once, waits for the grace, then evicts pods or requeues jobs.
A PodDisruptionBudget that keeps refusing rolls it back and holds the node; a job that cannot be
requeued is waited for. The same runs against the real daemons in test_reclaim_e2e.py."""

from __future__ import annotations

import pytest

from provisioner import config
from provisioner.clusters.kubernetes import PendingPod
from provisioner.clusters.slurm import PendingJob
from provisioner.reconcile import Reconciler
from provisioner.states import BOOTING, CORDONING, DRAINING, EVICT, K8S, REQUEUE, SLURM, STEADY, WAIT
from provisioner.store import Store
from tests.fakes import FakeKube, FakePower, FakeSlurm, kube_node, slurm_node
from testbed.site import mac, write_site

NOW = 1_800_000_000.0
TIMEOUT = 20  # phase_timeout_s
GRACE = {"slurm": 1800, "k8s": 30}


class Clock:
    now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path):
    nodes = [
        {"name": "cn[01-02]", "pool": "slurm", "macs": [mac(1, 1), mac(2, 1)], "bmc": {"address": "127.0.0.1"}},
        {"name": "sn01", "pool": "shared", "default_role": "k8s", "macs": [mac(1, 3)], "ip": "10.0.3.1",
         "bmc": {"address": "127.0.0.1"}},
        {"name": "sn[02-04]", "pool": "shared", "default_role": "slurm", "macs": [mac(i, 3) for i in range(2, 5)],
         "ip": "10.0.3.[2-4]", "bmc": {"address": "127.0.0.1"}},
    ]
    site = config.load(write_site(tmp_path / "site", nodes, policy={
        "phase_timeout_s": TIMEOUT, "max_retries": 1, "cooldown_s": 600, "demand_persist_s": 0,
        "reclaim_grace_s": GRACE}))
    store = Store(site.store)
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    slurm = FakeSlurm(**{n: slurm_node(n) for n in site.nodes})
    kube = FakeKube(sn01=kube_node("sn01", pods=("web-1",)))
    for name in ("sn03", "sn04"):
        slurm.run_job(name, f"job-{name}")
    clock = Clock()
    rec = Reconciler(site, store, slurm=slurm, kube=kube, power=FakePower(), clock=clock)
    yield store, slurm, kube, rec, clock
    store.close()


def lend_sn02_to_k8s(store, slurm, kube) -> None:
    """sn02 (home slurm) runs a Deployment's pod in Kubernetes; a SLURM job waits."""
    store.update("sn02", actor="test", kind="test", message="lent", desired_role=K8S)
    slurm.set("sn02", state="down", reason="provisioner: k8s_connect", reason_is_ours=True)
    kube.state["sn02"] = kube_node("sn02", pods=("web-0",), requested=(1000, 1 << 30, 0))
    slurm.pending = [PendingJob("77", "Resources", ("batch",), 1, 1)]


def lend_sn01_to_slurm(store, slurm, kube, requeue: bool = True, ran: float = 100) -> None:
    """sn01 (home k8s) runs a SLURM job (for `ran` s, its time limit NOW + 5000); a pod waits in Kubernetes."""
    store.update("sn01", actor="test", kind="test", message="lent", desired_role=SLURM)
    kube.state["sn01"] = kube_node("sn01", role=SLURM, unschedulable=True, cordoned_by_us=True)
    slurm.set("sn02", state="allocated", alloc_cpus=4)
    slurm.run_job("sn01", "42", requeue=requeue, start_time=NOW - ran, end_time=NOW + 5000)
    kube.pending = [PendingPod("ml", "train-0", 1000, 1 << 30, 0, (), (), (), 0, None, "0/3 nodes are available")]


def test_the_snapshot_carries_homes_room_and_the_works_cost(world):
    store, slurm, kube, rec, clock = world
    lend_sn02_to_k8s(store, slurm, kube)
    lend_sn01_to_slurm(store, slurm, kube)
    nodes = {n.name: n for n in rec.snapshot(rec.observe(), record_demand=False).nodes}
    assert nodes["sn01"].home == K8S and nodes["sn02"].home == SLURM
    assert (nodes["sn02"].room_cpu_m, nodes["sn02"].room_memory) == (3000, 15 << 30)
    assert nodes["sn01"].movable and nodes["sn01"].work_cost == 100 and nodes["sn01"].work_ends_at == NOW + 5000


def test_slurm_reclaims_its_node_pods_are_evicted_after_the_grace(world):
    store, slurm, kube, rec, clock = world
    lend_sn02_to_k8s(store, slurm, kube)
    report = rec.run_pass()
    (move,) = [m for m in report.moves if m.node == "sn02"]
    assert move.reclaim and move.to_role == SLURM and move.work == EVICT
    st = store.get("sn02")
    # Cordoned at once; its pods keep running until the grace ends.
    assert st.phase == CORDONING and st.reclaim_deadline == NOW + GRACE["k8s"] and st.reclaim_work == EVICT
    assert kube.state["sn02"].cordoned_by_us and kube.state["sn02"].pods
    assert ("evict", "sn02") not in kube.calls
    assert any("grace" in n for n in report.notes)

    clock.now = NOW + GRACE["k8s"] + 1
    report = rec.run_pass()
    assert ("evict", "sn02") in kube.calls and not kube.state["sn02"].pods
    assert [s.action for s in report.steps if s.node == "sn02"][:3] == ["evicted", "rebooting", "booting"]
    assert store.get("sn02").phase == BOOTING
    assert [e.kind for e in store.events(["sn02"], kinds=["evicted"])] == ["evicted"]


def test_a_budget_that_keeps_refusing_rolls_the_reclaim_back_and_holds_the_node(world):
    store, slurm, kube, rec, clock = world
    lend_sn02_to_k8s(store, slurm, kube)
    kube.evictable = False
    rec.run_pass()
    clock.now = NOW + GRACE["k8s"] + 1
    report = rec.run_pass()
    assert store.get("sn02").phase == CORDONING  # refused: tried again on later passes
    assert any("PodDisruptionBudget refuses" in n for n in report.notes)

    clock.now = NOW + GRACE["k8s"] + TIMEOUT + 1  # the timeout counts from the grace deadline
    report = rec.run_pass()
    st = store.get("sn02")
    assert st.phase == STEADY and st.desired_role == K8S and st.reclaim_deadline is None
    assert st.evict_refused_at == clock.now and "disruption budget" in st.evict_refused
    assert not kube.state["sn02"].unschedulable and kube.state["sn02"].pods  # our cordon lifted, nothing deleted
    assert "PodDisruptionBudget" in report.held["sn02"] and not [m for m in report.moves if m.node == "sn02"]
    (rollback,) = store.events(["sn02"], kinds=["rollback"])
    assert "PodDisruptionBudget kept refusing" in rollback.message and rollback.data["held"] == "pod-disruption-budget"

    # Held for cooldown_s: the dry run says so; then it is tried again.
    clock.now += 60
    dry = rec.run_pass(dry_run=True)
    assert "PodDisruptionBudget" in dry.held["sn02"] and not dry.moves
    clock.now += 600
    report = rec.run_pass()
    assert [m.node for m in report.moves] == ["sn02"] and store.get("sn02").phase == CORDONING


def test_kubernetes_reclaims_its_node_requeueable_jobs_are_requeued_after_the_grace(world):
    store, slurm, kube, rec, clock = world
    lend_sn01_to_slurm(store, slurm, kube)
    report = rec.run_pass()
    (move,) = report.moves
    assert move.node == "sn01" and move.reclaim and move.work == REQUEUE
    st = store.get("sn01")
    assert st.phase == DRAINING and st.reclaim_deadline == NOW + GRACE["slurm"] and slurm.state["sn01"].drain

    # Longer than phase_timeout_s since the drain, but within the grace: it waits, no rollback.
    clock.now = NOW + TIMEOUT * 3
    rec.run_pass()
    assert store.get("sn01").phase == DRAINING and not [c for c in slurm.calls if c[0] == "requeue"]

    clock.now = NOW + GRACE["slurm"] + 1
    report = rec.run_pass()
    assert ("requeue", "sn01") in slurm.calls and not slurm.jobs["sn01"]
    assert any(s.action == "requeued" and "42" in s.message for s in report.steps)
    rec.run_pass()
    assert store.get("sn01").phase == BOOTING and store.get("sn01").desired_role == K8S


def test_a_job_that_cannot_be_requeued_runs_to_its_end(world):
    store, slurm, kube, rec, clock = world
    lend_sn01_to_slurm(store, slurm, kube, requeue=False)
    rec.run_pass()
    clock.now = NOW + GRACE["slurm"] + TIMEOUT * 5  # long past the grace and the phase timeout
    report = rec.run_pass()
    assert store.get("sn01").phase == DRAINING and slurm.jobs["sn01"]
    assert any("cannot be requeued" in n and "--no-requeue" in n for n in report.notes)
    slurm.end_job("sn01", "42")
    rec.run_pass()
    assert store.get("sn01").phase == BOOTING


def test_a_held_node_shows_in_nodes_and_its_json(world, capsys):
    import json
    import time

    from provisioner import cli

    store, slurm, kube, rec, clock = world
    store.update("sn02", actor="test", kind="rollback", message="refused", evict_refused_at=time.time(),
                 evict_refused="default/web-0: Cannot evict pod as it would violate the pod's disruption budget.")
    conf = str(rec.site.path)
    assert cli.main(["--config", conf, "nodes", "sn[02-03]", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert "PodDisruptionBudget" in rows["sn02"]["reclaim_held"] and rows["sn03"]["reclaim_held"] is None
    assert cli.main(["--config", conf, "nodes", "sn02"]) == 0
    assert "reclaim held: a PodDisruptionBudget refused" in capsys.readouterr().out


def test_a_reclaim_whose_home_work_went_away_is_released_within_the_grace(world):
    store, slurm, kube, rec, clock = world
    lend_sn02_to_k8s(store, slurm, kube)
    rec.run_pass()
    assert store.get("sn02").phase == CORDONING
    slurm.pending = []  # the job was cancelled (or started elsewhere)
    clock.now = NOW + 5
    report = rec.run_pass()
    st = store.get("sn02")
    assert st.phase == STEADY and st.desired_role == K8S and st.reclaim_deadline is None
    assert not kube.state["sn02"].unschedulable and kube.state["sn02"].pods  # our cordon lifted, pods untouched
    assert ("evict", "sn02") not in kube.calls
    assert any("slurm no longer needs it" in n for n in report.notes)


def test_a_job_whose_requeue_costs_more_than_the_wait_runs_to_its_end(world, capsys):
    import json

    from provisioner import cli

    store, slurm, kube, rec, clock = world
    # It has run 4000 s; requeued at the grace's end it would save 5000 - 1800 = 3200 s of one node.
    lend_sn01_to_slurm(store, slurm, kube, ran=4000)
    (move,) = rec.run_pass().moves
    assert move.work == WAIT and move.deadline == NOW + 5000
    st = store.get("sn01")
    assert (st.phase, st.reclaim_work, st.reclaim_deadline) == (DRAINING, WAIT, NOW + 5000) and slurm.state["sn01"].drain
    assert "waiting for job 42 to end (requeue would lose 1.1 node-h" in st.switch_reason
    clock.now = NOW + GRACE["slurm"] + TIMEOUT * 5  # past the grace and the phase timeout: no requeue
    report = rec.run_pass()
    assert store.get("sn01").phase == DRAINING and not [c for c in slurm.calls if c[0] == "requeue"]
    assert any("reclaim: waiting for job 42 to end" in n for n in report.notes)
    assert cli.main(["--config", str(rec.site.path), "nodes", "sn01", "--json"]) == 0
    assert "waiting for job 42 to end" in json.loads(capsys.readouterr().out)[0]["reclaim_waits"]
    clock.now = NOW + 5000 + TIMEOUT * 5  # past its time limit too (SLURM still ending it): it waits
    rec.run_pass()
    assert store.get("sn01").phase == DRAINING and not [c for c in slurm.calls if c[0] == "requeue"]
    slurm.end_job("sn01", "42")
    rec.run_pass()
    assert store.get("sn01").phase == BOOTING


def test_a_reclaim_waiting_for_its_job_is_released_when_the_pod_went_away(world):
    store, slurm, kube, rec, clock = world
    lend_sn01_to_slurm(store, slurm, kube, ran=4000)
    rec.run_pass()
    clock.now = NOW + GRACE["slurm"] + 600  # past the grace, before the job's time limit
    kube.pending = []
    report = rec.run_pass()
    st = store.get("sn01")
    assert st.phase == STEADY and st.desired_role == SLURM and st.reclaim_deadline is None
    assert not slurm.state["sn01"].drain and slurm.jobs["sn01"]  # our drain lifted, the job untouched
    assert any("k8s no longer needs it" in n for n in report.notes)
