"""Reclaim carried out by the balancer against the real daemons (the session's SimSite: real
slurmctld/slurmd, the real Kubernetes control plane, BMC simulators, passes through the CLI):
a Deployment's pod on a node lent to Kubernetes is evicted after the grace and the node goes home
to the job waiting for it; a PodDisruptionBudget with maxUnavailable: 0 keeps the node, visible in
`nodes`, `history` and the dry run, nothing deleted; a requeueable job on a node lent to SLURM is
requeued when Kubernetes reclaims it and runs again elsewhere; one that cannot be requeued is
waited for."""

from __future__ import annotations

import json

import pytest

from testbed.wait import wait_for
from tests.test_kube_reclaim import deployment

pytestmark = pytest.mark.integration

GRACE = {"slurm": 3, "k8s": 3}
SMALL = {"cpu": "1", "memory": "128Mi"}  # fills a simulated node (1 CPU)
ALL_K8S = {n: "k8s" for n in ("sn01", "sn02", "sn03", "sn04")}
HOME_K8S = {n: "k8s" for n in ("sn02", "sn03", "sn04")}  # only sn01 (home slurm) can be taken back


def only_sn01_has_room_in_k8s(sim) -> None:
    """kn01 and sn02-sn04 full: the scheduler can put a new pod only on sn01."""
    for name in (*sim.fixed_k8s, "sn02", "sn03", "sn04"):
        sim.kube.add_pod(f"fill-{name}", node=name, requests=SMALL)


def web_on_sn01(sim, pdb: bool = False) -> str:
    """A Deployment's pod Running and Ready on sn01 (with a budget that allows no disruption)."""
    deployment(sim.kube, "web", requests=SMALL)
    pod = wait_for(lambda: next((p["metadata"]["name"] for p in sim.kube.pods(node="sn01")
                                 if p["metadata"]["name"].startswith("web-")), None), 30, "web's pod on sn01")
    wait_for(lambda: any(c["type"] == "Ready" and c["status"] == "True"
                         for c in (sim.kube.pod(pod) or {}).get("status", {}).get("conditions") or []),
             30, "web's pod Running and Ready")
    if pdb:
        sim.kube.add_pdb("web", match_labels={"app": "web"}, max_unavailable=0)
        wait_for(lambda: (sim.kube.wait_pdb("web", allowed=0).get("status") or {}).get("currentHealthy") == 1, 30,
                 "the budget counting the pod healthy")
    return pod


def test_slurm_takes_its_lent_node_back_the_pod_is_evicted_after_the_grace_and_the_job_runs(balance_site):
    sim = balance_site(roles=ALL_K8S, homes=HOME_K8S, policy={"reclaim_grace_s": GRACE})
    only_sn01_has_room_in_k8s(sim)
    pod = web_on_sn01(sim)
    sim.fill_fixed()
    job = sim.submit_pending("--job-name=home-work")
    sim.passes_until(lambda: sim.slurm.job_state(job) == ("RUNNING", "sn01") and sim.state("sn01").phase == "steady",
                     timeout=120, what=f"job {job} running on sn01, reclaimed from Kubernetes")
    (start,) = [e for e in sim.events(["sn01"], kinds=["switch"])]
    assert start.data["reclaim"]["work"] == "evict" and start.data["reclaim"]["grace_s"] == GRACE["k8s"]
    (evicted,) = sim.events(["sn01"], kinds=["evicted"])
    assert f"default/{pod}" in evicted.message
    assert evicted.ts >= start.data["reclaim"]["deadline"]  # not before the grace ended
    assert sim.kube.pod(pod) is None or sim.kube.pod(pod)["spec"].get("nodeName") != "sn01"
    assert sim.state("sn01").desired_role == "slurm" and sim.state("sn01").reclaim_deadline is None


def test_a_budget_that_refuses_keeps_the_node_held_visibly_and_nothing_is_deleted(balance_site):
    sim = balance_site(roles=ALL_K8S, homes=HOME_K8S,
                       policy={"reclaim_grace_s": GRACE, "phase_timeout_s": 4, "cooldown_s": 600})
    only_sn01_has_room_in_k8s(sim)
    pod = web_on_sn01(sim, pdb=True)
    sim.fill_fixed()
    job = sim.submit_pending("--job-name=home-work")
    reports = sim.passes_until(lambda: sim.state("sn01").evict_refused_at is not None, timeout=60,
                               what="the reclaim of sn01 rolled back on the budget's refusal")
    st = sim.state("sn01")
    assert st.phase == "steady" and st.desired_role == "k8s"
    assert "disruption budget" in st.evict_refused
    # Our cordon lifted, the pod where it was, nothing deleted, the job still waiting.
    assert not sim.kube.node("sn01")["spec"].get("unschedulable")
    assert sim.kube.pod(pod)["spec"]["nodeName"] == "sn01"
    assert not [r for r in sim.kube.requests() if r["verb"] == "delete" and "/pods" in r.get("uri", "")]
    assert sim.slurm.job_state(job)[0] == "PENDING"
    assert any("PodDisruptionBudget refuses" in n for r in reports for n in r["notes"])

    nodes = json.loads(sim.cli("nodes", "sn01", "--json").stdout)
    assert "reclaim held: a PodDisruptionBudget refused" in nodes[0]["reclaim_held"]
    history = sim.cli("history", "sn01").stdout
    assert "PodDisruptionBudget kept refusing" in history
    proc, dry = sim.balance("--dry-run")
    assert "PodDisruptionBudget" in dry["held"]["sn01"] and not dry["moves"]


def lend_sn01_to_slurm(sim, *args: str) -> str:
    """Every SLURM node busy; a job (sbatch args) runs on sn01, whose home is Kubernetes; a pod waits."""
    fill = sim.fill_fixed() + [sim.slurm.sbatch(nodelist=n) for n in ("sn02", "sn03", "sn04")]
    for job in fill:
        sim.slurm.wait_job_running(job)
    job = sim.slurm.sbatch(*args)
    assert sim.slurm.wait_job_running(job) == "sn01"
    sim.kube.add_pod(f"fill-{sim.fixed_k8s[0]}", node=sim.fixed_k8s[0], requests=SMALL)
    sim.kube.add_pod("train-0", namespace="ml", requests={"cpu": "500m", "memory": "128Mi"})
    return job


def test_kubernetes_takes_its_lent_node_back_a_requeueable_job_is_requeued_and_runs_elsewhere(balance_site):
    sim = balance_site(homes={"sn01": "k8s"}, policy={"reclaim_grace_s": GRACE})
    job = lend_sn01_to_slurm(sim, "--requeue")
    sim.passes_until(lambda: sim.events(["sn01"], kinds=["requeued"]), timeout=60, what=f"job {job} requeued")
    assert wait_for(lambda: sim.slurm.job_state(job) == ("PENDING", "(BeginTime)") or None, 30, "the requeue delay")
    sim.passes_until(lambda: sim.state("sn01").phase == "steady" and sim.in_k8s("sn01"), timeout=90,
                     what="sn01 back in Kubernetes")
    # It runs again elsewhere once a node is free (SLURM's requeue delay lifted, as in test_slurm_requeue).
    sim.slurm.run("scancel", sim.slurm.run("squeue", "-h", "-w", "cn01", "-o", "%A").split()[0])
    sim.slurm.run("scontrol", "update", f"jobid={job}", "starttime=now")
    assert sim.slurm.wait_job_running(job) == "cn01"


def test_a_job_that_cannot_be_requeued_is_waited_for(balance_site):
    sim = balance_site(homes={"sn01": "k8s"}, policy={"reclaim_grace_s": GRACE, "phase_timeout_s": 4})
    job = lend_sn01_to_slurm(sim, "--no-requeue")
    sim.passes_until(lambda: any("cannot be requeued" in n for n in sim.balance()[1]["notes"]), timeout=60,
                     what="the reclaim waiting for the job that cannot be requeued")
    # Past the grace and the phase timeout: still draining, the job untouched.
    assert sim.state("sn01").phase == "draining" and sim.slurm.job_state(job) == ("RUNNING", "sn01")
    assert not sim.events(["sn01"], kinds=["requeued", "rollback"])
    sim.slurm.run("scancel", job)
    sim.passes_until(lambda: sim.state("sn01").phase == "steady" and sim.in_k8s("sn01"), timeout=90,
                     what="sn01 back in Kubernetes once the job ended")


def ran_s(sim, job: str) -> int:
    """Seconds the job has run, as SLURM counts them (squeue's %M: [D-][H:]M:SS)."""
    out = sim.slurm.run("squeue", "-h", "-j", job, "-o", "%M", check=False).strip()
    parts = [int(x) for x in out.split("-")[-1].split(":")] if out and out[0].isdigit() else [0]
    return sum(v * 60 ** i for i, v in enumerate(reversed(parts)))


def test_a_job_whose_requeue_costs_more_than_the_wait_is_waited_for_and_the_node_switches_after_it(balance_site):
    # The job's time limit is 60 s and the grace 5 s: from 30 s run, requeueing it at the grace's
    # end loses more (its 30+ node-s) than it saves the pod (60 - 30 - 5 = 25 s at most): the
    # node stays drained and the job runs on; when it ends (cancelled here, to keep the test
    # short; its time limit would end it seconds later) the node goes home.
    sim = balance_site(homes={"sn01": "k8s"}, policy={"reclaim_grace_s": {"slurm": 5, "k8s": 3}})
    job = lend_sn01_to_slurm(sim, "--requeue", "--time=1")
    wait_for(lambda: ran_s(sim, job) >= 30, 60, f"job {job} running for 30 s")
    sim.passes_until(lambda: sim.state("sn01").phase == "draining", timeout=30, what="the reclaim of sn01")
    (start,) = sim.events(["sn01"], kinds=["switch"])
    assert start.data["reclaim"]["work"] == "wait"
    assert f"waiting for job {job} to end (requeue would lose" in start.message
    assert start.data["reclaim"]["deadline"] > start.ts + 5  # its time limit, not the grace
    # Past the grace: drained by us, the job untouched; the notes, `nodes` and history say why.
    reports = sim.passes_until(lambda: ran_s(sim, job) >= 42 or sim.slurm.job_state(job)[0] != "RUNNING",
                               timeout=30, what="the grace long past")
    assert sim.state("sn01").phase == "draining" and sim.slurm.job_state(job) == ("RUNNING", "sn01")
    assert "DRAIN" in sim.slurm.node_state("sn01")
    assert "Reason=provisioner: switching to k8s" in sim.slurm.run("scontrol", "show", "node", "sn01")
    assert any(f"waiting for job {job} to end" in n for r in reports for n in r["notes"])
    assert f"waiting for job {job} to end" in json.loads(sim.cli("nodes", "sn01", "--json").stdout)[0]["reclaim_waits"]
    sim.slurm.run("scancel", job)
    sim.passes_until(lambda: sim.state("sn01").phase == "steady" and sim.in_k8s("sn01"), timeout=90,
                     what="sn01 back in Kubernetes once the job ended")
    assert not sim.events(["sn01"], kinds=["requeued", "rollback"])
