"""The balancer moves shared nodes between real SLURM and a real Kubernetes control plane, through
BMC simulators and the real boot endpoint (testbed/simnodes.py). Passes run through the real CLI,
as cron runs them: `provisioner --config SITE balance --json`. No node boots an image: a shared
node "boots" by fetching its script and posting its callback, then the harness starts its role's
daemon (a real slurmd on the host, or a simulated kubelet)."""

from __future__ import annotations

import json
import re

import pytest

from testbed.simnodes import kernel_args

pytestmark = pytest.mark.integration

ALL_K8S = {n: "k8s" for n in ("sn01", "sn02", "sn03", "sn04")}


def switch_events(sim, name: str) -> list[str]:
    return [e.message for e in sim.events([name], kinds=["switch"])]


def fill_kn01(sim) -> None:
    """The fixed Kubernetes node is full: new pods can only go to a shared node."""
    sim.kube.add_pod("big-0", node="kn01", requests={"cpu": "1", "memory": "128Mi"})


def test_paper_scenario_pending_job_gets_an_idle_k8s_node(balance_site):
    # Fixed SLURM nodes full, a job Pending (Resources), the shared nodes idle on the k8s side.
    sim = balance_site(roles=ALL_K8S)
    running = sim.fill_fixed()
    job = sim.submit_pending("--job-name=needs-a-node")
    # SLURM may start the job on the resumed node a pass before the balancer records the switch
    # done (it waits for SLURM to show the node available): wait for both.
    reports = sim.passes_until(lambda: sim.slurm.job_state(job)[0] == "RUNNING" and sim.state("sn01").phase == "steady",
                               timeout=60, what=f"job {job} to run on a shared node, and the switch to end")

    node = sim.slurm.job_state(job)[1]
    assert node == "sn01"  # one node moved, the first by name
    moves = [m for r in reports for m in r["moves"]]
    assert [(m["node"], m["to"]) for m in moves] == [("sn01", "slurm")], json.dumps(reports, indent=1)
    assert "1 job Pending (Resources) in partition batch; sn01 idle in k8s" in moves[0]["reason"]
    # The switch, step by step, as the reports and the audit log tell it.
    steps = [s["action"] for r in reports for s in r["steps"] if s["node"] == "sn01"]
    assert steps == ["requested", "cordoning", "rebooting", "booting", "joining", "resumed", "done"]
    assert sim.state("sn01").phase == "steady" and sim.state("sn01").desired_role == "slurm"
    assert sim.state("sn01").booted_role == "slurm"
    # It went through the BMC: one-time network boot, then the reset.
    assert sim.booted_once("sn01") and set(sim.bmc_actions("sn01")) == {"reset"}
    assert sim.boots[-1]["bootdev"] == "network"
    # In Kubernetes it stays cordoned (by us) and is labelled sched=slurm (the paper's Table 1).
    kn = sim.kube.node("sn01")
    assert kn["spec"].get("unschedulable") and kn["metadata"]["labels"]["sched"] == "slurm"
    assert sim.serving("sn01") == {"slurm"}
    # Nothing else moved, the running jobs still run.
    assert all(sim.serving(n) == {"k8s"} for n in ("sn02", "sn03", "sn04"))
    assert all(sim.slurm.job_state(j)[0] == "RUNNING" for j in running)


def test_reverse_unschedulable_pods_get_an_idle_slurm_node(balance_site):
    sim = balance_site()  # every shared node idle in SLURM
    fill_kn01(sim)
    for i in range(3):
        sim.kube.add_pod(f"web-{i}", namespace="ml")
    for i in range(3):  # the real scheduler finds no room
        sim.kube.wait_unschedulable(f"web-{i}", "ml")

    def bound():
        pods = [p for p in sim.kube.pods() if p["metadata"]["name"].startswith("web")]
        return all(p["spec"].get("nodeName") for p in pods) and {p["spec"]["nodeName"] for p in pods}

    # The real scheduler may bind them as soon as the node's kubelet is Ready, a pass before the
    # balancer has seen it join: wait for both.
    reports = sim.passes_until(lambda: bound() and sim.state("sn01").phase == "steady", timeout=60,
                               what="the pods to bind to a shared node and its switch to end")
    assert bound() == {"sn01"}  # 3 x 100m fit on one node: one node moved
    moves = [(m["node"], m["to"]) for r in reports for m in r["moves"]]
    assert moves == [("sn01", "k8s")]
    reason = next(r["moves"][0]["reason"] for r in reports if r["moves"])
    assert "3 pods Pending (Unschedulable) in namespace ml; sn01 idle in slurm" in reason
    steps = [s["action"] for r in reports for s in r["steps"] if s["node"] == "sn01"]
    assert steps == ["requested", "draining", "rebooting", "booting", "joining", "done"]
    # Ready, labelled sched=k8s, schedulable; in SLURM: down with the paper's reason.
    node = sim.kube.node("sn01")
    assert node["metadata"]["labels"]["sched"] == "k8s" and not node["spec"].get("unschedulable")
    assert sim.serving("sn01") == {"k8s"}
    view = sim.slurm_view("sn01")
    assert view.down and view.reason == "k8s_connect"
    assert sim.booted_once("sn01")
    assert all(sim.serving(n) == {"slurm"} for n in ("sn02", "sn03", "sn04"))


def test_role_now_switches_through_the_state_machine_and_the_boot_script_follows(balance_site):
    """The foundation's walk-through, for real: `provisioner role sn01 k8s --reason x --now`."""
    sim = balance_site()
    before = kernel_args(sim.ipxe("sn01"))
    assert before["provisioner.role"] == "slurm"

    proc = sim.cli("role", "sn01", "k8s", "--reason", "walk-through", "--now")
    assert proc.returncode == 0, proc.stderr
    # --now goes as far as it can without waiting: drained, down, rebooted.
    assert "sn01: switch to k8s requested, pinned (walk-through)" in proc.stdout
    assert "sn01: booting: power ipmi boot with one-time network boot" in proc.stdout
    assert sim.state("sn01").pinned and sim.state("sn01").desired_role == "k8s"

    sim.passes_until(lambda: sim.state("sn01").phase == "steady", timeout=40, what="sn01 to finish", cli=False)
    assert sim.serving("sn01") == {"k8s"}
    after = sim.ipxe("sn01")
    args = kernel_args(after)
    assert args["provisioner.role"] == "k8s" and "/images/k8s/vmlinuz" in after
    rows = json.loads(sim.cli("nodes", "sn01", "--json").stdout)
    assert rows[0]["desired_role"] == rows[0]["booted_role"] == "k8s" and rows[0]["pinned"]
    assert rows[0]["phase"] == "steady"

    # Pinned: SLURM demand does not take it back.
    sim.fill_fixed()
    for n in ("sn02", "sn03", "sn04"):
        sim.slurm.wait_job_running(sim.slurm.sbatch(nodelist=n))
    sim.submit_pending()
    _, report = sim.balance()
    assert report["moves"] == [] and any("sn01: not moved to slurm: pinned to k8s by an admin" in n for n in report["notes"])

    # And back, also with --now; done means serving: the node is resumed only once its new
    # slurmd has registered (SLURM still believes the old one answers for a few seconds).
    sim.join_delay = 2.0
    proc = sim.cli("role", "sn01", "slurm", "--reason", "walk-through, back", "--now")
    assert proc.returncode == 0, proc.stderr

    def done():
        if sim.state("sn01").phase != "steady":
            return False
        assert sim.in_slurm("sn01"), f"sn01 reported switched but SLURM does not serve it: {sim.slurm_view('sn01')}"
        return True

    sim.passes_until(done, timeout=40, what="sn01 back in SLURM", cli=False)
    assert kernel_args(sim.ipxe("sn01"))["provisioner.role"] == "slurm"


def slurm_marks(sim) -> dict:
    """What a pass could change in SLURM, per shared node: its state without the flags slurmctld
    adds by itself over time (NOT_RESPONDING: a stopped slurmd missed its pings), and its reason."""
    out = {}
    for n in sim.shared:
        view = sim.slurm_view(n)
        out[n] = (sim.slurm.node_state(n).replace("+NOT_RESPONDING", "").rstrip("*"), view.reason)
    return out


def test_dry_run_changes_nothing(balance_site):
    sim = balance_site(roles={"sn01": "k8s"})
    sim.fill_fixed()
    for n in ("sn02", "sn03", "sn04"):
        sim.slurm.wait_job_running(sim.slurm.sbatch(nodelist=n))
    sim.submit_pending()
    last_event = sim.store.events(limit=1)[-1].id
    slurm_before = slurm_marks(sim)
    audit_mark = sim.kube.plane.audit_mark()

    proc, report = sim.balance("--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert report["dry_run"] and [(m["node"], m["to"]) for m in report["moves"]] == [("sn01", "slurm")]
    assert report["steps"] == []
    text = sim.cli("balance", "--dry-run")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    # Each line carries the pass's time, in UTC with its offset: cron appends every pass to one log.
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 ", line) for line in lines), lines
    assert lines[0].endswith(" dry run: nothing changed")
    assert any(line.endswith(" move sn01 -> slurm: 1 job Pending (Resources) in partition batch; sn01 idle in k8s; "
                             "its home is slurm")
               for line in lines)

    assert sim.store.events(limit=1)[-1].id == last_event  # no event, no state change
    assert sim.store.demand_since() == {}
    calls = sim.kube.plane.audit(audit_mark)
    assert calls and {r["verb"] for r in calls} == {"list"}  # the API server saw reads only
    assert slurm_marks(sim) == slurm_before
    assert sim.bmc_actions("sn01") == [] and sim.state("sn01").phase == "steady"


def test_pinned_nodes_and_minimums_are_respected(balance_site):
    sim = balance_site(policy={"min_nodes": {"slurm": 2, "k8s": 0}, "max_in_flight": 4})
    assert sim.cli("role", "sn01", "slurm", "--reason", "benchmarks").returncode == 0
    fill_kn01(sim)
    for i in range(4):  # each fills a whole shared node: Kubernetes wants 4 nodes
        sim.kube.add_pod(f"train-{i}", namespace="ml", requests={"cpu": "1", "memory": "128Mi"})
    for i in range(4):
        sim.kube.wait_unschedulable(f"train-{i}", "ml")

    reports = sim.passes_until(lambda: sim.serving("sn02") == sim.serving("sn03") == {"k8s"}, timeout=60,
                               what="sn02 and sn03 in Kubernetes", cli=False)
    for _ in range(2):  # and nothing more moves
        reports.append(sim.pass_in_process())
    moves = sorted((m["node"], m["to"]) for r in reports for m in r["moves"])
    assert moves == [("sn02", "k8s"), ("sn03", "k8s")]
    notes = [n for r in reports for n in r["notes"]]
    assert any("sn01: not moved to k8s: pinned to slurm by an admin" in n for n in notes)
    assert any("slurm keeps its minimum of 2 shared node(s)" in n for n in notes)
    assert sim.serving("sn01") == sim.serving("sn04") == {"slurm"}
    assert sim.bmc_actions("sn01") == sim.bmc_actions("sn04") == []
    assert len([p for p in sim.kube.pods() if p["spec"].get("nodeName") in ("sn02", "sn03")]) == 2


def test_no_flapping_when_demand_blinks(balance_site):
    sim = balance_site(policy={"demand_persist_s": 2})
    fill_kn01(sim)
    reports = []
    for i in range(3):  # a pod that is Unschedulable for one pass, then gone (its owner deleted it)
        sim.kube.add_pod(f"blink-{i}")
        sim.kube.wait_unschedulable(f"blink-{i}")
        reports.append(sim.pass_in_process())
        sim.kube.delete_pod(f"blink-{i}")
        reports.append(sim.pass_in_process())
    assert [m for r in reports for m in r["moves"]] == []
    assert any("k8s: demand seen for 0 s, waiting for 2 s" in n for r in reports for n in r["notes"])
    assert all(switch_events(sim, n) == [] for n in sim.shared)
    assert all(sim.bmc_actions(n) == [] for n in sim.shared)

    # Demand that stays does move a node, once it has lasted demand_persist_s.
    sim.kube.add_pod("stays")
    sim.kube.wait_unschedulable("stays")
    sim.passes_until(lambda: switch_events(sim, "sn01"), timeout=30, what="a move after 2 s", cli=False)
    assert "switch to k8s requested" in switch_events(sim, "sn01")[0]


def test_a_node_still_ready_from_before_its_reboot_is_not_taken_as_joined(balance_site):
    """sn01 left Kubernetes moments ago: its Node still says Ready, since the control plane
    notices a silent kubelet only after its grace period (40 s in production, 8 s here). Switched
    back to k8s, it counts as joined only once the kubelet of the new boot has reported (another
    status.nodeInfo.bootID), not on the old Ready condition."""
    sim = balance_site(join_delay=4.0)
    old_boot = sim.kube.add_node("sn01", labels={"sched": "slurm"}, unschedulable=True,
                                 cpu="1", memory="500Mi")
    sim.kube.patch_node("sn01", {"metadata": {"annotations": {"provisioner/cordoned": "true"}}})
    assert sim.kube.ready("sn01")

    proc = sim.cli("role", "sn01", "k8s", "--reason", "stale Ready", "--now")
    assert proc.returncode == 0, proc.stderr
    sim.passes_until(lambda: sim.state("sn01").phase == "steady", timeout=40, what="sn01 in Kubernetes", cli=False)

    (switched,) = sim.events(["sn01"], kinds=["switched"])
    joined = [b for b in sim.boots if b["node"] == "sn01"][-1].get("joined")
    assert joined and switched.ts >= joined, "declared joined on the Ready condition of the boot before the reboot"
    assert sim.state("sn01").k8s_boot_id == old_boot  # what the reboot was compared against
    node = sim.kube.node("sn01")
    assert node["status"]["nodeInfo"]["bootID"] != old_boot and not node["spec"].get("unschedulable")
    assert sim.serving("sn01") == {"k8s"}
