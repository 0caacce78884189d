"""The balancer's safety promises, against the real parts (testbed/simnodes.py): work that arrives
late stops a reboot, a pass killed at any step leaves nothing stranded, one pass at a time, and a
dead BMC fails one node visibly without holding up the others. The shared nodes' daemons are
played by the harness (a real slurmd on the host, a simulated kubelet); no image boots."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from provisioner import config
from provisioner.clusters.kubernetes import KubernetesAdapter
from provisioner.reconcile import CRASH_ENV
from testbed.kube_control_plane import PROVISIONER_USER
from testbed.tcp_gate import TcpGate
from testbed.wait import wait_for
from testbed.simnodes import ROOT, kernel_args, provisioner_cmd
from tests.fixtures.balance import k8s_wants_a_node, running, settled, slurm_wants_a_node

pytestmark = pytest.mark.integration

ALL_K8S = {n: "k8s" for n in ("sn01", "sn02", "sn03", "sn04")}


# --------------------------------------------------------------------------- work arrives late


def test_pod_bound_between_decision_and_power_stops_the_reboot(balance_site):
    sim = balance_site(roles=ALL_K8S)
    jobs, pending = slurm_wants_a_node(sim)
    # In the pass itself: after sn01 is cordoned and found empty, right at the pre-power
    # re-check, a pod is bound to it by nodeName (bypassing the scheduler, as a static workload
    # would). The pass runs in this process with its adapter wrapped to do exactly that.
    adapter = KubernetesAdapter(config.load(sim.config).kubernetes)
    cordon, node = adapter.cordon, adapter.node
    seen = {"cordon": False, "looks": 0}

    def cordon_then_note(name):
        seen["cordon"] = seen["cordon"] or name == "sn01"
        return cordon(name)

    def look(name):
        if seen["cordon"] and name == "sn01":
            seen["looks"] += 1
            if seen["looks"] == 2:  # CORDONING found it empty; this is the pre-power re-check
                sim.kube.add_pod("late-0", node="sn01")
                sim.kube.wait_bound("late-0")
        return node(name)

    adapter.cordon, adapter.node = cordon_then_note, look
    try:
        report = sim.pass_in_process(kube=adapter)
    finally:
        adapter.close()
    steps = [(s["node"], s["action"]) for s in report["steps"]]
    assert ("sn01", "reboot-refused") in steps and ("sn01", "booting") not in steps, steps
    refused = next(s for s in report["steps"] if s["action"] == "reboot-refused")
    assert "Kubernetes shows pods on it (default/late-0)" in refused["message"]
    assert sim.bmc_actions("sn01") == []
    assert kernel_args(sim.ipxe("sn01"))["provisioner.role"] == "k8s"  # the boot script went back too

    # Later passes roll sn01 back (uncordoned, pod untouched) and give the job another node.
    sim.passes_until(lambda: sim.slurm.job_state(pending)[0] == "RUNNING" and settled(sim), timeout=60,
                     what="the pending job to run elsewhere", cli=False)
    assert sim.slurm.job_state(pending)[1] == "sn02"
    assert sim.bmc_actions("sn01") == [] and sim.serving("sn01") == {"k8s"}
    assert sim.kube.pod("late-0")["status"]["phase"] == "Running"
    assert sim.state("sn01").desired_role == "k8s" and running(sim, jobs)


def test_job_started_after_the_drain_stops_the_reboot(balance_site):
    sim = balance_site()
    fixed_jobs = k8s_wants_a_node(sim)
    proc, _ = sim.balance(env={CRASH_ENV: "before-power"})
    assert proc.returncode == -9
    st = sim.state("sn01")
    assert (st.phase, st.desired_role) == ("rebooting", "k8s")
    # Meanwhile an admin puts sn01 back into service and a job lands on it.
    sim.slurm.run("scontrol", "update", "nodename=sn01", "state=resume")
    job = sim.slurm.sbatch(nodelist="sn01")
    sim.slurm.wait_job_running(job)

    proc, report = sim.balance()
    refused = [s for s in report["steps"] if s["node"] == "sn01" and s["action"] == "reboot-refused"]
    assert refused and "SLURM shows jobs on it" in refused[0]["message"]
    assert sim.state("sn01").desired_role == "slurm"
    assert kernel_args(sim.ipxe("sn01"))["provisioner.role"] == "slurm"

    sim.passes_until(lambda: settled(sim) and sim.serving("sn02") == {"k8s"}, timeout=60,
                     what="sn01 rolled back, another node moved", cli=False)
    assert sim.bmc_actions("sn01") == [] and sim.serving("sn01") == {"slurm"}
    assert running(sim, [job, *fixed_jobs])
    history = [e.message for e in sim.events(["sn01"])]
    assert any("rolled back: the drain was lifted by someone else" in m for m in history)


def test_admin_forced_switches_wait_for_jobs_and_evict_pods_never_kill(balance_site):
    sim = balance_site(roles={"sn02": "k8s"})
    job = sim.slurm.sbatch(nodelist="sn01")
    sim.slurm.wait_job_running(job)
    # A ReplicaSet's pod on sn02: evicted, the ReplicaSet makes another one (Pending: it may only
    # run on sn02, which is cordoned now).
    sim.kube.add_replicaset("api", 1, node_selector={"kubernetes.io/hostname": "sn02"})
    (api,) = [p["metadata"]["name"] for p in wait_for(lambda: sim.kube.pods("sn02"), 30, "the api pod on sn02")]
    sim.kube.wait_bound(api)

    for name, role in (("sn01", "k8s"), ("sn02", "slurm")):
        proc = sim.cli("role", name, role, "--reason", "maintenance", "--now")
        assert proc.returncode == 0, proc.stderr
    # sn01 drains and waits for its job; sn02's pod was evicted through the Eviction API.
    for _ in range(2):
        sim.pass_in_process()
    assert sim.state("sn01").phase == "draining" and sim.slurm.job_state(job)[0] == "RUNNING"
    assert sim.bmc_actions("sn01") == []
    sim.kube.wait_gone(api)  # its kubelet finished the eviction
    assert any(p["metadata"]["name"].startswith("api-") and not p["spec"].get("nodeName") for p in sim.kube.pods())

    sim.slurm.run("scancel", job)  # the job ends on its own terms: now sn01 may go
    sim.passes_until(lambda: settled(sim) and sim.serving("sn01") == {"k8s"} and sim.serving("sn02") == {"slurm"},
                     timeout=60, what="both forced switches", cli=False)
    assert sim.booted_once("sn01") and sim.booted_once("sn02")


def test_a_pod_deaf_to_sigterm_keeps_its_node_up_for_its_whole_grace_period(balance_site):
    """As with the real kubelet, an evicted pod stays Terminating until its containers stop; this
    one ignores SIGTERM, so it runs until its grace period (8 s) ends in SIGKILL. The forced switch
    waits for it: no power action while the pod exists, then exactly one."""
    sim = balance_site(roles={"sn02": "k8s"})
    sim.kube.add_replicaset("slow", 1, node_selector={"kubernetes.io/hostname": "sn02"}, grace_s=8, stop_s=3600)
    (pod,) = [p["metadata"]["name"] for p in wait_for(lambda: sim.kube.pods("sn02"), 30, "the slow pod on sn02")]
    sim.kube.wait_bound(pod)
    proc = sim.cli("role", "sn02", "slurm", "--reason", "maintenance", "--now")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: ((sim.kube.pod(pod) or {}).get("metadata") or {}).get("deletionTimestamp"), 30,
             "the slow pod to be evicted")
    terminating = []

    def pod_gone() -> bool:
        if sim.kube.pod(pod) is None:
            return True
        assert sim.bmc_actions("sn02") == [], "sn02 powered while its pod was still Terminating"
        terminating.append(sim.state("sn02").phase)
        return False

    sim.passes_until(pod_gone, timeout=60, what="the slow pod's grace period to end", cli=False)
    # Passes came meanwhile and waited before the power step.
    assert terminating and set(terminating) <= {"cordoning", "draining"}, terminating
    sim.passes_until(lambda: settled(sim) and sim.serving("sn02") == {"slurm"}, timeout=60,
                     what="the switch to finish", cli=False)
    assert sim.booted_once("sn02")


# --------------------------------------------------------------------------- crashes


def wants_a_node_on(balance_site, to: str):
    """A world where side `to` waits for a shared node: (sim, the jobs running meanwhile, goal)."""
    if to == "slurm":
        sim = balance_site(roles=ALL_K8S)
        jobs, pending = slurm_wants_a_node(sim)

        def goal():
            return sim.slurm.job_state(pending)[0] == "RUNNING"
    else:
        sim = balance_site()
        jobs = k8s_wants_a_node(sim)

        def goal():
            return all(p["spec"].get("nodeName") for p in sim.kube.pods() if p["metadata"]["name"].startswith("web"))
    return sim, jobs, goal


@pytest.mark.parametrize("to,point", [
    ("slurm", "after-cordon"), ("slurm", "before-power"), ("slurm", "after-power"),
    ("k8s", "after-down"), ("k8s", "before-power"), ("k8s", "after-power"),
])
def test_kill_9_at_each_step_then_passes_finish_the_switch(balance_site, to, point):
    sim, jobs, goal = wants_a_node_on(balance_site, to)

    proc, _ = sim.balance(env={CRASH_ENV: point})
    assert proc.returncode == -9, (proc.returncode, proc.stderr)
    assert sim.state("sn01").phase != "steady"  # killed mid-switch

    # The killed pass was the CLI, as cron runs it; the passes after it run the same code in
    # this process (faster: no console-script start-up each time).
    sim.passes_until(lambda: goal() and settled(sim), timeout=60, what=f"the switch to finish after kill -9 {point}",
                     cli=False)
    # The node ended on the side the demand asked for, rebooted into it exactly once (also when
    # the pass died after the power action and before recording it: the next pass sees the
    # node's boot callback and does not power it again), and nothing was killed.
    assert sim.serving("sn01") == {to} and sim.state("sn01").desired_role == to
    boots, attempts = sim.reboots("sn01")
    assert boots == 1 or (point != "after-power" and 1 <= boots <= attempts), \
        (boots, attempts, sim.bmc_actions("sn01"))
    assert running(sim, jobs)
    if to == "k8s":
        assert sim.kube.pod("big-0")["status"]["phase"] == "Running"
    assert all(sim.serving(n) == {sim.state(n).desired_role} for n in sim.shared)


@pytest.mark.parametrize("to,point", [
    ("slurm", "after-write-booted"), ("slurm", "after-join-steps"), ("slurm", "before-write-joined"),
    ("k8s", "after-write-booted"), ("k8s", "after-join-steps"),
])
def test_kill_9_after_the_power_action_then_passes_finish_the_switch(balance_site, to, point):
    """The crash points of booting and joining: the node has been powered and is coming up in its
    new role when the pass dies. The passes after it finish the switch without powering it again."""
    sim, jobs, goal = wants_a_node_on(balance_site, to)

    # A pass goes on through booting and joining when the node calls back in time; when it
    # does not, a later pass reaches the point: CLI passes with the crash point until one dies.
    killed: list[int] = []

    def one_pass_reaches_the_point():
        proc, _ = sim.balance(env={CRASH_ENV: point})
        if proc.returncode == -9:
            killed.append(proc.returncode)
        else:
            assert proc.returncode == 0, proc.stderr
        return killed or sim.state("sn01").phase == "steady"

    wait_for(one_pass_reaches_the_point, 90, f"a pass to die at {point}")
    assert killed, f"the switch ended without reaching {point}: {sim.states()}"

    sim.passes_until(lambda: goal() and settled(sim), timeout=60, what=f"the switch to finish after kill -9 {point}",
                     cli=False)
    assert sim.serving("sn01") == {to} and sim.state("sn01").desired_role == to
    assert sim.booted_once("sn01"), sim.bmc_actions("sn01")
    assert running(sim, jobs)


@pytest.mark.parametrize("point", [None, "after-write-cancel"])
def test_an_admin_cancels_a_drain_that_waits_for_a_job_and_a_kill_9_strands_nothing(balance_site, point):
    """An admin's switch to k8s drains sn01 and waits for its job; the admin cancels it. The
    drain provisioner set is lifted and the job never stopped, also when the cancelling command
    is killed right after its write (the passes after it lift the drain it left)."""
    sim = balance_site()
    job = sim.slurm.sbatch(nodelist="sn01")
    sim.slurm.wait_job_running(job)
    assert sim.cli("role", "sn01", "k8s", "--reason", "maintenance", "--now").returncode == 0
    sim.pass_in_process()
    assert sim.state("sn01").phase == "draining" and sim.slurm.job_state(job)[0] == "RUNNING"

    proc = sim.cli("role", "sn01", "--cancel", "--reason", "wrong node", env={CRASH_ENV: point} if point else None)
    assert proc.returncode == (-9 if point else 0), proc.stderr
    st = sim.state("sn01")
    assert (st.phase, st.desired_role, st.pinned) == ("steady", "slurm", False), st

    sim.passes_until(lambda: "DRAIN" not in sim.slurm.node_state("sn01"), timeout=60,
                     what="the drain provisioner set to be lifted", cli=False)
    assert sim.slurm.job_state(job)[0] == "RUNNING" and sim.bmc_actions("sn01") == []
    # slurmctld may mark the node NOT_RESPONDING for a ping or two on a loaded host: a condition
    wait_for(lambda: settled(sim), 60, "every shared node steady and serving its side")
    sim.slurm.run("scancel", job)


# --------------------------------------------------------------------------- one pass at a time


def test_twenty_passes_at_once_exactly_one_acts(balance_site):
    # A long client timeout: the pass that holds the lock is held up below on purpose.
    sim = balance_site(roles=ALL_K8S)
    slurm_wants_a_node(sim)
    # The pass that got the lock waits at its first Kubernetes request (its connection held by
    # a TCP gate in front of the real API server) until every other one has exited: all 20 run
    # at the same time, whatever the machine's speed.
    tcp = TcpGate(int(sim.kube.server.rsplit(":", 1)[1])).start()
    gated = sim.kube.plane.kubeconfig(PROVISIONER_USER, sim.workdir / "kubeconfig-gated",
                                      server=f"https://127.0.0.1:{tcp.port}")
    sim.config = sim.write_config(kubernetes={"kubeconfig": str(gated), "timeout_s": 90})
    tcp.hold()
    argv = [*provisioner_cmd(), "--config", str(sim.config), "balance", "--json"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(20)]
    try:
        deadline = time.monotonic() + 60
        while sum(p.poll() is not None for p in procs) < 19 and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = [p for p in procs if p.poll() is None]
        assert len(waiting) == 1, f"{len(waiting)} passes still running while one holds the lock"
        wait_for(lambda: tcp.held >= 1, 30, "the pass holding the lock to wait at the gate")
    finally:
        tcp.release()
        outputs = [p.communicate(timeout=90) for p in procs]
        tcp.stop()
    assert [p.returncode for p in procs] == [0] * 20, [o[1] for o in outputs]
    reports = [json.loads(out) for out, _ in outputs if out.strip()]
    assert len(reports) == 1
    assert [(m["node"], m["to"]) for m in reports[0]["moves"]] == [("sn01", "slurm")]
    skipped = [err for out, err in outputs if not out.strip()]
    assert len(skipped) == 19 and all("another balance pass is running" in e for e in skipped)
    requested = [e for n in sim.shared for e in sim.events([n], kinds=["switch"])]
    assert len(requested) == 1


# --------------------------------------------------------------------------- a dead BMC


def test_silent_bmc_fails_its_node_after_retries_and_the_others_still_move(balance_site):
    sim = balance_site(policy={"max_retries": 1}, power={"timeout_s": 2.0, "retries": 1})
    sim.kube.add_pod("big-0", node="kn01", requests={"cpu": "1", "memory": "128Mi"})
    for i in range(2):  # two whole nodes wanted: sn01 and sn02 move at once
        sim.kube.add_pod(f"train-{i}", namespace="ml", requests={"cpu": "1", "memory": "128Mi"})
    for i in range(2):
        sim.kube.wait_unschedulable(f"train-{i}", "ml")
    sim.bmc.set_fault("sn01", "silent")

    sim.passes_until(lambda: sim.state("sn01").phase == "failed" and sim.serving("sn02") == {"k8s"}, timeout=60,
                     what="sn01 failed and sn02 in Kubernetes", cli=False)
    st = sim.state("sn01")
    assert "power action failed 2 times" in st.failed_reason
    assert "did not answer within 2s (2 attempts)" in st.failed_reason
    retries = [e.message for e in sim.events(["sn01"], kinds=["retry"])]
    assert len(retries) == 1  # max_retries=1: one retry, then failed
    # Visible to the admin, not silently stranded.
    listing = sim.cli("nodes", "sn01").stdout
    assert re.search(r"\bfailed\b.*power action failed 2 times", listing), listing  # PHASE ... REASON
    view = sim.slurm_view("sn01")
    assert view.down and view.reason == "k8s_connect" and sim.serving("sn01") == set()

    # A failed node is left out of further moves...
    before = len(sim.events(["sn01"]))
    sim.balance()
    assert [e.kind for e in sim.events(["sn01"])[before:]] == []
    # ...until the admin fixes the BMC and says where it goes.
    sim.bmc.set_fault("sn01", None)
    assert sim.cli("role", "sn01", "slurm", "--reason", "BMC replaced", "--now").returncode == 0
    sim.passes_until(lambda: sim.state("sn01").phase == "steady" and sim.serving("sn01") == {"slurm"},
                     timeout=40, what="sn01 back in SLURM", cli=False)


# --------------------------------------------------------------------------- PodDisruptionBudgets


def test_a_pdb_decides_a_forced_switch_refused_visibly_then_let_through(balance_site):
    """The real API server applies the budget the real disruption controller computed: one that
    allows no disruption makes the forced switch fail, visibly, with nothing deleted; once it
    allows one, the same switch evicts the pod and goes through."""
    sim = balance_site(roles={"sn01": "k8s"}, policy={"phase_timeout_s": 6})
    sim.kube.add_replicaset("db", 1, node_selector={"kubernetes.io/hostname": "sn01"})
    (db,) = [p["metadata"]["name"] for p in wait_for(lambda: sim.kube.pods("sn01"), 30, "the db pod on sn01")]
    sim.kube.wait_bound(db)
    sim.kube.add_pdb("db", match_labels={"app": "db"}, min_available=1)
    sim.kube.wait_pdb("db", allowed=0)
    mark = sim.kube.plane.audit_mark()

    assert sim.cli("role", "sn01", "slurm", "--reason", "maintenance", "--now").returncode == 0
    sim.passes_until(lambda: sim.state("sn01").phase == "failed", timeout=40, what="the switch to fail", cli=False)

    reason = sim.state("sn01").failed_reason
    assert "pods could not be evicted in" in reason and f"default/{db}" in reason
    assert "Cannot evict pod as it would violate the pod's disruption budget" in reason
    assert re.search(r"\bfailed\b.*pods could not be evicted", sim.cli("nodes", "sn01").stdout)
    pod = sim.kube.pod(db)
    assert pod["spec"]["nodeName"] == "sn01" and not pod["metadata"].get("deletionTimestamp")
    calls = sim.kube.plane.audit(mark)
    evictions = [c["code"] for c in calls if c["subresource"] == "eviction"]
    assert evictions and set(evictions) == {429}
    assert not [c for c in calls if c["verb"] == "delete"]
    assert sim.bmc_actions("sn01") == []

    # The budget now allows one disruption: the admin asks again, the eviction goes through.
    sim.kube.api.patch("/apis/policy/v1/namespaces/default/poddisruptionbudgets/db",
                       {"spec": {"minAvailable": 0}})
    sim.kube.wait_pdb("db", allowed=1)
    mark = sim.kube.plane.audit_mark()
    assert sim.cli("role", "sn01", "slurm", "--reason", "maintenance, budget relaxed", "--now").returncode == 0
    sim.passes_until(lambda: sim.state("sn01").phase == "steady" and sim.serving("sn01") == {"slurm"}, timeout=60,
                     what="sn01 in SLURM", cli=False)
    calls = sim.kube.plane.audit(mark)
    assert [c["code"] for c in calls if c["subresource"] == "eviction"] == [201]
    assert not [c for c in calls if c["verb"] == "delete"]
    assert sim.kube.pod(db) is None  # evicted; its ReplicaSet's new pod waits for a node
    assert sim.booted_once("sn01")
