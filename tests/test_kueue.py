"""provisioner serves ProvisioningRequests of its class, all or nothing, against the real control
plane: Kueue's real controller manager creates them for a queued Job (the first test); the others
create them with kubectl, as any client may. Passes run through the real CLI
(`provisioner balance --json`) over the balancer's simulated world (testbed/simnodes.py)."""

from __future__ import annotations

import tempfile

import pytest
import yaml

from provisioner.provisioning_demand import CLASS_NAME, NODE_LABEL
from testbed.wait import wait_for
from tests.fixtures.kueue import EXAMPLE, JOBS, NS, PRS, cond

pytestmark = pytest.mark.integration

ON = {"provisioning_requests": True}


@pytest.fixture
def cleanup(kube, provreq_crds, kueue_work):
    """Requests, templates and Jobs of a test go when it ends."""
    yield


def request(kubectl, name: str, count: int, cpu: str = "1", template: str | None = None) -> None:
    """A ProvisioningRequest of our class and its PodTemplate, created with kubectl."""
    docs = []
    if template is None:
        template = f"{name}-pods"
        docs.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": template, "namespace": NS},
                     "template": {"spec": {"containers": [{"name": "c", "image": "busybox", "resources": {
                         "requests": {"cpu": cpu, "memory": "100Mi"}}}]}}})
    docs.append({"apiVersion": "autoscaling.x-k8s.io/v1", "kind": "ProvisioningRequest",
                 "metadata": {"name": name, "namespace": NS},
                 "spec": {"provisioningClassName": CLASS_NAME,
                          "podSets": [{"podTemplateRef": {"name": template}, "count": count}]}})
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
        yaml.safe_dump_all(docs, fh)
        fh.flush()
        kubectl("create", "-f", fh.name)


def booked_label(sim, name: str) -> dict[str, str]:
    return {n["metadata"]["name"]: n["metadata"]["labels"].get(NODE_LABEL) for n in sim.kube.api.items("/api/v1/nodes")
            if NODE_LABEL in n["metadata"]["labels"]}


def test_a_kueue_job_of_two_whole_node_pods_gets_two_shared_nodes_at_once(kueue, balance_site, kubectl, cleanup):
    sim = balance_site(kubernetes=ON)  # every shared node idle in SLURM
    kubectl("apply", "-f", str(EXAMPLE))
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "train", "namespace": NS, "labels": {"kueue.x-k8s.io/queue-name": "shared"}},
           "spec": {"parallelism": 2, "completions": 2, "suspend": True, "template": {"spec": {
               "restartPolicy": "Never",
               "containers": [{"name": "train", "image": "busybox", "command": ["sh", "-c", "echo trained"],
                               "resources": {"requests": {"cpu": "1", "memory": "100Mi"}}}]}}}}
    sim.kube.api.create(JOBS, job)
    # Kueue gives the workload quota, then creates the ProvisioningRequest of our class.
    pr = wait_for(lambda: next(iter(sim.kube.api.items(PRS)), None), 90,
                  f"Kueue to create a ProvisioningRequest; Kueue's log:\n{kueue.log_tail()}")
    assert pr["spec"]["provisioningClassName"] == CLASS_NAME
    assert pr["spec"]["podSets"][0]["count"] == 2
    name = pr["metadata"]["name"]

    def running():
        pods = [p for p in sim.kube.api.items(f"/api/v1/namespaces/{NS}/pods")
                if (p["metadata"].get("labels") or {}).get("job-name") == "train"]
        return len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods) and pods

    reports = sim.passes_until(running, timeout=150, what="the Job's two pods to run on the switched nodes")
    moves = [(m["node"], m["to"]) for r in reports for m in r["moves"]]
    assert moves == [("sn01", "k8s"), ("sn02", "k8s")]
    reason = next(r["moves"][0]["reason"] for r in reports if r["moves"])
    assert f"ProvisioningRequest {NS}/{name} asks for 2 node(s) at once (all or nothing)" in reason
    pods = running()
    assert sorted(p["spec"]["nodeName"] for p in pods) == ["sn01", "sn02"]
    label = booked_label(sim, name)
    assert sorted(label) == ["sn01", "sn02"] and all(p["spec"]["nodeSelector"][NODE_LABEL] == label["sn01"]
                                                     for p in pods)
    pr = sim.kube.api.get(f"{PRS}/{name}")
    assert cond(pr, "Accepted")["status"] == "True" and cond(pr, "Provisioned")["status"] == "True"
    j = sim.kube.api.get(f"{JOBS}/train")
    assert not j["spec"]["suspend"]  # Kueue admitted it
    kinds = [e.kind for e in sim.events(kinds=["provreq-accepted", "provreq-switching", "provreq-provisioned"])]
    assert kinds[0] == "provreq-accepted" and "provreq-switching" in kinds and kinds[-1] == "provreq-provisioned"
    out = sim.cli("history", "--json")
    assert f"ProvisioningRequest {NS}/{name}" in out.stdout
    dry = sim.cli("balance", "--dry-run")
    assert f"ProvisioningRequest {NS}/{name}: provisioned" in dry.stdout, dry.stdout + dry.stderr
    assert kueue.pid, f"Kueue's manager exited; its log:\n{kueue.log_tail()}"


def test_all_or_nothing_with_one_movable_node_nothing_switches_and_the_request_says_why(balance_site, kubectl,
                                                                                         cleanup):
    sim = balance_site(kubernetes=ON)
    jobs = [sim.slurm.sbatch(nodelist=n) for n in ("sn02", "sn03", "sn04")]  # busy in SLURM
    for j in jobs:
        sim.slurm.wait_job_running(j)
    request(kubectl, "pair", 2)
    for _ in range(3):
        proc, report = sim.balance()
        assert report and report["moves"] == [], report
    pr = sim.kube.api.get(f"{PRS}/pair")
    p = cond(pr, "Provisioned")
    assert (p["status"], p["reason"]) == ("False", "Waiting")
    assert "all or nothing: 1 of 2 pod(s)" in p["message"] and "3 busy in slurm" in p["message"]
    assert all(sim.state(n).phase == "steady" and sim.state(n).desired_role == "slurm" for n in sim.nodes)


def test_too_large_and_bad_requests_fail_with_the_reason_and_the_loop_goes_on(balance_site, kubectl, cleanup):
    sim = balance_site(kubernetes=ON, roles={"sn04": "k8s"})
    # sn04, idle in Kubernetes, is tainted: the requests' pods do not tolerate it, so it serves none.
    kubectl("taint", "nodes", "sn04", "dedicated=ml:NoSchedule")
    request(kubectl, "huge", 5)  # 5 whole nodes; the pool has 4
    request(kubectl, "four", 4)  # 4 whole nodes: sn04 is not one of them
    request(kubectl, "orphan", 1, template="no-such-template")
    request(kubectl, "fits", 1)
    proc, report = sim.balance()
    assert report is not None, proc.stderr
    huge, four, orphan, fits = (sim.kube.api.get(f"{PRS}/{n}") for n in ("huge", "four", "orphan", "fits"))
    assert cond(huge, "Failed")["reason"] == "CannotBeServed"
    assert "can never be served" in cond(huge, "Failed")["message"]
    assert cond(four, "Failed")["reason"] == "CannotBeServed"
    assert cond(orphan, "Failed")["reason"] == "PodTemplateNotFound"
    assert f"PodTemplate {NS}/no-such-template does not exist" in cond(orphan, "Failed")["message"]
    assert proc.stderr.count("ProvisioningRequest default/orphan: Failed") == 1  # one log line
    assert [(m["node"], m["to"]) for m in report["moves"]] == [("sn01", "k8s")]  # the good one is served


def test_a_request_deleted_while_its_nodes_switch_strands_nothing(balance_site, kubectl, cleanup):
    sim = balance_site(kubernetes=ON, join_delay=2.0)
    request(kubectl, "gone", 2)
    proc, report = sim.balance()
    assert [(m["node"], m["to"]) for m in report["moves"]] == [("sn01", "k8s"), ("sn02", "k8s")]
    kubectl("delete", "provisioningrequest", "gone", "-n", NS)
    sim.passes_until(lambda: all(sim.state(n).phase == "steady" for n in sim.nodes), timeout=90,
                     what="the switches to end")
    # The switches finished (the nodes are Kubernetes nodes now, usable by anyone), and no node
    # carries a booking for the request that is gone.
    assert {n: sim.state(n).desired_role for n in ("sn01", "sn02")} == {"sn01": "k8s", "sn02": "k8s"}
    assert booked_label(sim, "gone") == {}


def test_the_booking_expires_and_the_nodes_are_free_again(balance_site, kubectl, cleanup):
    sim = balance_site(kubernetes={**ON, "booking_s": 2})
    request(kubectl, "brief", 1)
    sim.passes_until(lambda: cond(sim.kube.api.get(f"{PRS}/brief"), "Provisioned").get("status") == "True",
                     timeout=90, what="the request to be Provisioned")
    assert booked_label(sim, "brief") == {"sn01": f"{NS}.brief"}
    # Nothing used the node within booking_s: the booking ends, the label goes.
    sim.passes_until(lambda: cond(sim.kube.api.get(f"{PRS}/brief"), "BookingExpired").get("status") == "True",
                     timeout=30, what="the booking to expire")
    sim.balance()
    assert booked_label(sim, "brief") == {}
    assert [e.kind for e in sim.events(kinds=["provreq-expired"])] == ["provreq-expired"]
